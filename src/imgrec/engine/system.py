"""Devices, precision, threads, seeds and version stamps: the compute set-up of a run."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from imgrec.errors import UsageError

if TYPE_CHECKING:
    from imgrec.config import RunConfig

EVAL_BATCH_SIZE = 500  # images per batch wherever a model is only evaluated (validation, test, calibration, features)


def select_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device, optimizer: str = "") -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32. 'auto' on a GPU without bf16 picks fp16,
    except for --optimizer muon (fp32 there): fp16's loss scaling does not reach Muon's view of the filters."""
    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return None if optimizer == "muon" else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes in bf16 natively (AVX512-BF16 or AMX): there bf16 autocast trains the
    registry's models faster than fp32 (benchmarks/RESULTS.md); elsewhere it is emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume no native bf16
        return False


def precision_name(dtype: torch.dtype | None) -> str:
    """The precision a resolved autocast dtype stands for, as the --precision flag spells it."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed-precision autocast when dtype is set; weights stay fp32."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


@dataclass(frozen=True)
class Compute:
    """Where and how a run's model computes: made once from the config (Compute.of) and handed to everything that
    runs the model (training, the speed probe, evaluation, calibration, feature extraction)."""

    device: torch.device
    dtype: torch.dtype | None  # autocast's; None: plain fp32
    memory_format: torch.memory_format  # of the image batches and conv weights
    threads: int  # torch's CPU threads

    @classmethod
    def of(cls, cfg: RunConfig) -> Compute:
        """The config's device, precision and memory format (a bad --device or --precision fails here)."""
        device = select_device(cfg.device)
        return cls(device, autocast_dtype(cfg.precision, device, cfg.optimizer),
                   torch.channels_last if cfg.channels_last else torch.contiguous_format, torch.get_num_threads())

    def fp32(self) -> Compute:
        """The same device without autocast and with contiguous batches: raw logits as prediction computes them."""
        return replace(self, dtype=None, memory_format=torch.contiguous_format)

    def describe(self) -> str:
        """One line for the log: device, precision, memory format, threads."""
        layout = "channels_last" if self.memory_format == torch.channels_last else "contiguous"
        return (f"{self.device.type}, {precision_name(self.dtype)}{' autocast' if self.dtype else ''}, {layout}, "
                f"{self.threads} thread{'' if self.threads == 1 else 's'}")


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally insist on deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def set_threads(threads: int | None) -> None:
    """Use the given number of CPU threads (torch defaults to one per physical core)."""
    if threads:
        torch.set_num_threads(threads)


def versions() -> dict[str, str]:
    """Library versions to stamp into runs and checkpoints."""
    import imgrec

    return {
        "imgrec": imgrec.__version__,
        "torch": str(torch.__version__),  # TorchVersion is not a plain str: weights-only loading refuses it
        "torchvision": torchvision_version(),
        "python": platform.python_version(),
    }


def torchvision_version() -> str:
    """torchvision.__version__ (with its build's tag, e.g. 0.29.1+cu130) without importing torchvision, which
    takes seconds (it loads torch's compiler): read from its version.py, else the installed distribution's."""
    spec = importlib.util.find_spec("torchvision")
    try:
        text = Path(spec.origin).with_name("version.py").read_text() if spec and spec.origin else ""
    except OSError:
        text = ""
    found = re.search(r"^__version__ = ['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else importlib.metadata.version("torchvision")


def git_commit(path: str | Path = ".") -> str | None:
    """The commit of the git work tree holding path, or None."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
