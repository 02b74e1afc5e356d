"""Transfer learning on CIFAR-10, offline: pretrain on five classes, transfer to the other five with 50 images each.

1. From the JPEG archive, extract image folders (once, into --cache):
     source: airplane, automobile, bird, cat, deer: --source-per-class training images each, 500 test images each
     target: dog, frog, horse, ship, truck: 50 training images each (seeded choice), all 1,000 test images each
2. `imgrec train` (each run as a user types it, in a subprocess):
     pretrain   the backbone from scratch on the source classes
     scratch    the same backbone from scratch on the 250 target images
     transfer   the same, starting from the pretraining run (--weights): 1 frozen epoch, then fine-tuned
     frozen / frozen-cached   --freeze with and without --cache-features, for the per-epoch time
   scratch and transfer share every setting but --weights; imgrec carves 10% of the 250 images for validation.
3. Print a Markdown report (commands, accuracies on the 5,000 target test images, times, machine) and write it
   with the raw numbers to --out.

    python benchmarks/transfer.py --archive ../shared/data/cifar10-jpeg.tar.gz --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SOURCE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TARGET_CLASSES = ("dog", "frog", "horse", "ship", "truck")


def extract(archive: Path, root: Path, source_per_class: int, target_per_class: int, seed: int) -> tuple[Path, Path]:
    """Write source/ and target/ image folders (train/ and test/ of class folders) under root, once."""
    source, target = root / f"source-{source_per_class}", root / f"target-{target_per_class}-seed{seed}"
    if (source / "done").is_file() and (target / "done").is_file():
        return source, target
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_folder: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            _, split, cls, _ = m.name.split("/")[-4:]
            by_folder.setdefault((split, cls), []).append(m)
        rng = random.Random(seed)
        plan: list[tuple[tarfile.TarInfo, Path]] = []
        for (split, cls), files in sorted(by_folder.items()):
            files = sorted(files, key=lambda m: m.name)
            if cls in SOURCE_CLASSES:
                keep, dest = files[: source_per_class if split == "train" else 500], source
            elif cls in TARGET_CLASSES:
                keep, dest = (rng.sample(files, target_per_class) if split == "train" else files), target
            else:
                continue
            plan += [(m, dest / split / cls / Path(m.name).name) for m in keep]
        for member, path in plan:
            path.parent.mkdir(parents=True, exist_ok=True)
            fileobj = tf.extractfile(member)
            assert fileobj is not None
            path.write_bytes(fileobj.read())
    for folder in (source, target):
        (folder / "done").write_text("ok\n")
    return source, target


def imgrec(args: list[str], project: Path, name: str, threads: int) -> dict:
    """Run `imgrec train ...` in a subprocess; return its summary.json plus the command and wall time."""
    argv = ["train", *args, "--threads", str(threads), "--device", "cpu", "--project", str(project), "--name", name,
            "--exist-ok"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imgrec", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"imgrec {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((project / name / "summary.json").read_text())
    with (project / name / "results.csv").open(newline="") as f:
        epochs = [float(row["seconds"]) for row in csv.DictReader(f)]
    summary.update(command="imgrec " + shlex.join(argv), wall_seconds=round(wall, 1), epoch_seconds=epochs)
    print(f"{name}: test accuracy {summary['test_accuracy']:.2%}, {wall:.0f}s", flush=True)
    return summary


def machine() -> str:
    """CPU model, cores, load and library versions, for the report."""
    import torch
    import torchvision

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, load average {load:.1f} at the end; Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}")


def per_epoch(summary: dict) -> float:
    """Mean seconds of the epochs after the first (the first also warms up)."""
    times = summary["epoch_seconds"][1:] or summary["epoch_seconds"]
    return sum(times) / len(times)


def report(runs: dict[str, dict], opts: argparse.Namespace, total: float) -> str:
    """The Markdown section for benchmarks/RESULTS.md."""
    scratch, transfer = runs["scratch"]["test_accuracy"], runs["transfer"]["test_accuracy"]
    frozen, cached = per_epoch(runs["frozen"]), per_epoch(runs["frozen-cached"])
    lines = [
        f"Pretrained on {len(SOURCE_CLASSES)} CIFAR-10 classes ({', '.join(SOURCE_CLASSES)}; "
        f"{opts.source_per_class} training images each, 10% of them held out for validation), transferred to the other "
        f"five ({', '.join(TARGET_CLASSES)}) with {opts.target_per_class} training images per class "
        f"(250 in all, of which imgrec holds out 25 for validation), tested on all 5,000 of their test images. "
        f"Model `{opts.model}` at 32x32; every run on the CPU with `--threads {opts.threads}`.",
        "",
        "| run | test accuracy (5 target classes) | training time | wall time |",
        "|---|---|---|---|",
        f"| pretrain (source classes; its own test: 2,500 images) | {runs['pretrain']['test_accuracy']:.2%} | "
        f"{runs['pretrain']['train_seconds']:.0f} s | {runs['pretrain']['wall_seconds']:.0f} s |",
    ]
    for name in ("scratch", "transfer", "frozen", "frozen-cached"):
        r = runs[name]
        lines.append(f"| {name} | **{r['test_accuracy']:.2%}** | {r['train_seconds']:.1f} s | {r['wall_seconds']:.0f} s |")
    lines += [
        "",
        f"Transfer beats training from scratch by **{(transfer - scratch) * 100:.1f} points** "
        f"({transfer:.2%} vs {scratch:.2%}).",
        f"Feature cache: with `--freeze`, an epoch takes {frozen:.3f} s through the backbone and {cached:.4f} s on "
        f"cached features (**{frozen / max(cached, 1e-9):.0f}x**; mean of epochs 2-{len(runs['frozen']['epoch_seconds'])}); "
        f"the features are computed once in {runs['frozen-cached'].get('feature_cache_seconds') or 0:.2f} s. Both "
        f"train without augmentation, so they reach the same accuracy.",
        "",
        "Commands (paths shortened to `SOURCE`, `TARGET` and `runs`):",
        "",
        "```sh",
    ]
    for r in runs.values():
        command = (r["command"].replace(str(opts.source), "SOURCE").replace(str(opts.target), "TARGET")
                   .replace(str(opts.project), "runs"))
        lines.append(command)
    lines += ["```", "", f"Machine: {machine()}. Whole benchmark: {total / 60:.1f} min "
              f"(`python benchmarks/transfer.py {' '.join(sys.argv[1:])}`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path("../shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "imgrec" / "bench-transfer")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--source-per-class", type=int, default=5000)
    parser.add_argument("--target-per-class", type=int, default=50)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the scratch and transfer runs")
    parser.add_argument("--frozen-epochs", type=int, default=5, help="epochs of the two --freeze runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/transfer-results"))
    opts = parser.parse_args()
    started = time.perf_counter()
    opts.source, opts.target = extract(opts.archive, opts.cache, opts.source_per_class, opts.target_per_class, opts.seed)
    opts.project = opts.cache / "runs"
    common = ["--model", opts.model, "--seed", str(opts.seed), "--workers", "0"]
    small = [*common, "--data", str(opts.target), "--batch-size", "32"]
    source_run = str(opts.project / "pretrain")
    runs = {
        "pretrain": imgrec([*common, "--data", str(opts.source), "--epochs", str(opts.pretrain_epochs),
                            "--batch-size", "128", "--schedule", "onecycle", "--lr", "0.003"], opts.project,
                           "pretrain", opts.threads),
        "scratch": imgrec([*small, "--epochs", str(opts.epochs)], opts.project, "scratch", opts.threads),
        "transfer": imgrec([*small, "--epochs", str(opts.epochs), "--weights", source_run], opts.project, "transfer",
                           opts.threads),
        "frozen": imgrec([*small, "--epochs", str(opts.frozen_epochs), "--weights", source_run, "--freeze",
                          "--augment", "none"], opts.project, "frozen", opts.threads),
        "frozen-cached": imgrec([*small, "--epochs", str(opts.frozen_epochs), "--weights", source_run, "--freeze",
                                 "--cache-features"], opts.project, "frozen-cached", opts.threads),
    }
    text = report(runs, opts, time.perf_counter() - started)
    print(text)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "report.md").write_text(text)
    (opts.out / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
