"""What several benchmarks share: the machine they ran on (its CPU, how busy it was) and a quick run to measure."""

from __future__ import annotations

import platform
from pathlib import Path

from imgrec.config import RunConfig
from imgrec.workflows import train


def load_average() -> str:
    """The 1/5/15-minute load averages (how busy the machine was), or "" where unknown."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quick_run(data_dir: str, threads: int, project: str, name: str) -> Path:
    """A LeNet trained for one epoch on 10,000 Fashion-MNIST images."""
    cfg = RunConfig(data="fashion-mnist", data_dir=data_dir, model="lenet", epochs=1, train_samples=10_000,
                    threads=threads, project=project, name=name, exist_ok=True)
    return train(cfg).run_dir
