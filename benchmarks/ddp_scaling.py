"""The scaling model of docs/distributed.md: what one data-parallel step costs in compute and in gradient traffic.

For each model it measures, here: the parameters (fp32 gradient bytes per step), the forward FLOPs per image
(torch's FlopCounterMode; forward+backward taken as 3x), and the forward+backward+optimiser time of one batch on this CPU (median of
--repeats, after a warm-up). It then models N GPUs with the stated assumptions: a GPU step time, and a ring
all-reduce that moves 2(N-1)/N x the gradient bytes over the slowest link, plus 2(N-1) latencies.

    python benchmarks/ddp_scaling.py --threads 2 --out benchmarks/ddp-scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imgrec.engine.system import versions
from imgrec.models.registry import build_model, count_parameters

# (name, model, channels, size); every GPU takes a batch of GPU_BATCH
MODELS = [
    ("Fashion-MNIST LeNet", "lenet", 1, 28),
    ("CIFAR-10 MobileNetV3-Large", "mobilenet_v3_large", 3, 32),
    ("CIFAR-10 ResNet-18", "resnet18", 3, 32),
]
GPU_BATCH = 256
# The assumed GPU step: the measured FLOPs at an achieved 40 TFLOP/s (bf16 on an A100/H100-class GPU runs small
# 32 px convolutions far below its peak of 300-1000 TFLOP/s), and never under 1 ms (kernel launches, Python).
GPU_FLOPS, GPU_FLOOR = 40e12, 1e-3
# Links: (name, bytes/s, latency s) for the slowest link a ring crosses.
NVLINK = ("NVLink within a node", 300e9, 5e-6)
NETWORK = ("100 Gb/s InfiniBand/Ethernet between nodes", 12.5e9, 10e-6)
GPUS = (2, 8, 64)  # 2 and 8: one node (NVLink); 64: 8 nodes of 8, the ring crosses the network


def measure(model_name: str, channels: int, size: int, batch: int, repeats: int) -> dict[str, Any]:
    """Parameters, FLOPs per image (forward + backward) and CPU seconds per training step of one batch."""
    model = build_model(model_name, 10, channels, (size, size)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), foreach=True)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter, torch.no_grad():  # two images: BatchNorm needs more than one
        model(x[:2])
    step()  # warm-up: oneDNN builds its kernels for these shapes
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    # forward + backward = 3 x forward (the backward computes gradients of inputs and of weights): the usual rule,
    # used because the counter's backward of grouped (depthwise) convolutions overcounts
    return {"params": count_parameters(model), "flops_per_image": 3 * counter.get_total_flops() / 2,
            "cpu_step_seconds_median": statistics.median(seconds), "cpu_step_seconds_best": min(seconds),
            "batch": batch}


def ring_seconds(nbytes: float, gpus: int, link: tuple[str, float, float]) -> float:
    """A ring all-reduce: 2(N-1)/N x bytes over the link, and 2(N-1) latencies."""
    _, bandwidth, latency = link
    return 2 * (gpus - 1) / gpus * nbytes / bandwidth + 2 * (gpus - 1) * latency


def model_rows(grad_bytes: float, gpu_step: float) -> list[dict[str, Any]]:
    """Speed-up at each GPU count: without overlap (compute then all-reduce) and with full overlap (DDP's buckets
    reduce during the backward pass: the longer of the two)."""
    out = []
    for n in GPUS:
        link = NVLINK if n <= 8 else NETWORK
        comm = ring_seconds(grad_bytes, n, link)
        out.append({"gpus": n, "link": link[0], "allreduce_ms": comm * 1e3,
                    "speedup_no_overlap": n * gpu_step / (gpu_step + comm),
                    "speedup_full_overlap": n * gpu_step / max(gpu_step, comm)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-batch", type=int, default=64, help="batch of the CPU timing (default: 64)")
    parser.add_argument("--out", default="benchmarks/ddp-scaling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for title, name, channels, size in MODELS:
        m = measure(name, channels, size, args.cpu_batch, args.repeats)
        grad_bytes = 4 * m["params"]
        gpu_step = max(m["flops_per_image"] * GPU_BATCH / GPU_FLOPS, GPU_FLOOR)
        results.append({"title": title, "model": name, **m, "grad_bytes": grad_bytes, "gpu_batch": GPU_BATCH,
                        "assumed_gpu_step_seconds": gpu_step, "gpu_batch_gflop": m["flops_per_image"] * GPU_BATCH / 1e9,
                        "scaling": model_rows(grad_bytes, gpu_step)})
        r = results[-1]
        print(f"{title}: {r['params']:,} params, {grad_bytes / 1e6:.2f} MB of fp32 gradients, "
              f"{r['flops_per_image'] / 1e6:.1f} MFLOP/image fwd+bwd, CPU {args.threads} threads: "
              f"{r['cpu_step_seconds_median'] * 1e3:.0f} ms per batch of {args.cpu_batch}; assumed GPU step "
              f"{gpu_step * 1e3:.2f} ms per batch of {GPU_BATCH}")
        for row in r["scaling"]:
            print(f"  {row['gpus']:>2} GPUs ({row['link']}): all-reduce {row['allreduce_ms']:.2f} ms, speed-up "
                  f"{row['speedup_no_overlap']:.1f}x (no overlap) to {row['speedup_full_overlap']:.1f}x (overlap)")
    meta = {"threads": args.threads, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "versions": versions(), "links": [NVLINK, NETWORK],
            "gpu_flops": GPU_FLOPS, "gpu_floor_seconds": GPU_FLOOR}
    Path(args.out).write_text(json.dumps({"meta": meta, "models": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
