"""What several benchmarks share: the machine they ran on (its CPU, how busy it was) and a quick run to measure."""

from __future__ import annotations

import platform
import tarfile
from pathlib import Path

from imgrec.config import RunConfig
from imgrec.workflows import train

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def extract_cifar10(archive: Path, target: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    """The first train[c] / test[c] files of each class c from the CIFAR-10 JPEG archive
    (cifar10/{train,test}/<class>/NNNN.jpg) as an image folder target/{train,test}/<class>/."""
    wanted = {f"cifar10/{split}/{cls}/{i:04d}.jpg": target / split / cls / f"{i:04d}.jpg"
              for split, counts in (("train", train), ("test", test))
              for cls, count in counts.items() for i in range(count)}
    with tarfile.open(archive) as tf:
        for member in tf:
            dest = wanted.pop(member.name, None)
            if dest is not None:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tf.extractfile(member).read())  # type: ignore[union-attr]
            if not wanted:
                break
    if wanted:
        raise SystemExit(f"the archive lacks {len(wanted)} of the wanted files, e.g. {sorted(wanted)[0]}")
    return target


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
