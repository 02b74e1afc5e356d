"""How hard a run made the machine work: model FLOPs per training image, the achieved GFLOP/s, the CPU's
own matrix-product peak to compare them with, and the process's peak memory.

FLOPs are counted by torch's FlopCounterMode (matrix products and convolutions, the work that dominates
these models; elementwise operations are not counted), on a copy of the model so the run's weights,
gradients and BatchNorm statistics stay untouched.
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_image(model: nn.Module, channels: int, size: Sequence[int], batch: int = 2) -> float:
    """Forward plus backward FLOPs of one training image (counted on a batch of `batch` random images)."""
    probe = copy.deepcopy(model).to("cpu").train()
    x = torch.randn(batch, channels, *size)
    with FlopCounterMode(display=False) as counter:
        out = probe(x)
        out.float().sum().backward()
    return counter.get_total_flops() / batch


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """The best GFLOP/s of an n x n matrix product in dtype on this CPU (repeated for about `seconds`)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool and kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def peak_rss_mb() -> float:
    """The largest resident set size this process has had so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
