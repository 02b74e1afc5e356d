"""What the benchmarks record about the machine they ran on: its CPU and how busy it was."""

from __future__ import annotations

import platform
from pathlib import Path


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
