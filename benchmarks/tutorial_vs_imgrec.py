"""The tutorial's pipeline and imgrec, side by side in one run, on the same model, data and batch size.

The tutorial's pipelines, as written there (per-sample transforms through a DataLoader, batch 100, Adam 1e-3,
`.item()` per step, the test set evaluated after every epoch):
  fashion-mnist: torchvision FashionMNIST with ToTensor + Normalize([0.5], [0.5]);
  cifar10: an ImageFolder over the JPEG tree with the tutorial's augmentations (Resize 32, horizontal flip,
  rotation 10, affine shear 10 / scale 0.8-1.2, colour jitter 0.2) + ToTensor + Normalize(0.5, 0.5).
imgrec: `imgrec train --data DATA --model MODEL --epochs N --lr LR` in its own process, every other setting
default; for cifar10 DATA is the archive itself and imgrec's cache starts empty, so extraction and decoding
count in its total. Both sides build the model from imgrec's registry.

Printed per model: training images/s of both and their ratio, total wall time of both, test accuracy,
imgrec's achieved GFLOP/s and peak memory. --switches also trains imgrec with each speed switch turned off
(fp32 instead of bf16, contiguous instead of channels-last). --budgets F... then runs
`imgrec train --data DATA --recipe fast --time-budget T` with T = F x the tutorial's total time for the last
model (the tutorial's 15-epoch LeNet time is the yardstick).

    python benchmarks/tutorial_vs_imgrec.py --data fashion-mnist --models mlp lenet --epochs 15 --budgets 0.3333 1
    python benchmarks/tutorial_vs_imgrec.py --data cifar10 --models lenet --epochs 15 --budgets 1 2.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from imgrec.engine.flops import matmul_peak_gflops, peak_rss_mb
from imgrec.engine.system import versions
from imgrec.models.registry import build_model

REPO = Path(__file__).resolve().parents[1]


def tutorial_data(data: str, data_dir: str, work: Path) -> tuple:
    """The tutorial's training and test datasets, its channels and image size."""
    if data == "fashion-mnist":
        plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        train = datasets.FashionMNIST(root=data_dir, train=True, download=False, transform=plain)
        return train, datasets.FashionMNIST(root=data_dir, train=False, download=False, transform=plain), 1, (28, 28)
    root = work / "cifar10-tree"
    if not root.exists():  # the tutorial would download; extracting the same images is not counted against it
        with tarfile.open(Path(data_dir) / "cifar10-jpeg.tar.gz") as tf:
            tf.extractall(root, filter="data")
    augment = transforms.Compose([
        transforms.Resize((32, 32)), transforms.RandomHorizontalFlip(), transforms.RandomRotation(10),
        transforms.RandomAffine(0, shear=10, scale=(0.8, 1.2)),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    plain = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(),
                                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    train = datasets.ImageFolder(root / "cifar10" / "train", transform=augment)
    return train, datasets.ImageFolder(root / "cifar10" / "test", transform=plain), 3, (32, 32)


def tutorial_run(model_name: str, data: str, data_dir: str, work: Path, epochs: int, lr: float,
                 batch_size: int = 100) -> dict:
    """The tutorial's training loop, as written there (per-sample transforms, .item() per step)."""
    start = time.perf_counter()
    training_dataset, validation_dataset, channels, size = tutorial_data(data, data_dir, work)
    training_loader = torch.utils.data.DataLoader(training_dataset, batch_size=batch_size, shuffle=True)
    validation_loader = torch.utils.data.DataLoader(validation_dataset, batch_size=batch_size, shuffle=False)
    torch.manual_seed(0)
    model = build_model(model_name, 10, channels, size)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_seconds, val_acc = 0.0, 0.0
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        model.train()
        running_loss, running_corrects = 0.0, 0.0
        for inputs, labels in training_loader:
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _, preds = torch.max(outputs, 1)
            running_loss += loss.item()
            running_corrects += torch.sum(preds == labels.data)
        train_seconds += time.perf_counter() - epoch_start
        model.eval()
        val_corrects = 0.0
        with torch.no_grad():
            for val_inputs, val_labels in validation_loader:
                val_outputs = model(val_inputs)
                _, val_preds = torch.max(val_outputs, 1)
                val_corrects += torch.sum(val_preds == val_labels.data)
        val_acc = float(val_corrects) / len(validation_dataset)
    return {
        "train_images": len(training_dataset), "epochs": epochs, "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start, "test_accuracy": val_acc,
        "images_per_second": epochs * len(training_dataset) / train_seconds,
    }


def imgrec_run(args: argparse.Namespace, project: Path, name: str, *flags: str) -> dict:
    """One `imgrec train` process on the benchmark's data; its summary.json plus the command's wall time."""
    data = args.data if args.data == "fashion-mnist" else str(Path(args.data_dir) / "cifar10-jpeg.tar.gz")
    cache = project / f"cache-{name}"  # empty: imgrec prepares the data from scratch, inside its total
    cmd = [sys.executable, "-m", "imgrec", "train", "--data", data, "--data-dir", args.data_dir, "--project",
           str(project), "--name", name, *flags]
    env = {**os.environ, "IMGREC_CACHE": str(cache), "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((project / name / "summary.json").read_text())
    keep = ("train_images", "epochs", "best_epoch", "train_seconds", "test_accuracy", "images_per_second",
            "precision", "train_gflop_per_image", "train_gflops_per_second", "peak_rss_mb")
    return {"command": " ".join(["imgrec", *cmd[3:]]), "total_seconds": seconds, **{k: summary.get(k) for k in keep}}


def compare(args: argparse.Namespace, name: str, work: Path) -> dict:
    """Tutorial and imgrec on one model (and imgrec with each switch off, when asked); prints one line each."""
    tut = tutorial_run(name, args.data, args.data_dir, work, args.epochs, args.lr)
    if args.tutorial_only:
        print(f"{name}: tutorial {tut['images_per_second']:,.0f} img/s, {tut['total_seconds']:.1f} s total, test "
              f"{tut['test_accuracy']:.2%}", flush=True)
        return {"tutorial": tut}
    common = ["--model", name, "--epochs", str(args.epochs), "--lr", str(args.lr)]
    imr = imgrec_run(args, work, f"{name}-default", *common)
    result = {"tutorial": tut, "imgrec": imr, "throughput_ratio": imr["images_per_second"] / tut["images_per_second"],
              "wall_ratio": tut["total_seconds"] / imr["total_seconds"]}
    print(f"{name}: tutorial {tut['images_per_second']:,.0f} img/s, {tut['total_seconds']:.1f} s total, test "
          f"{tut['test_accuracy']:.2%} | imgrec {imr['images_per_second']:,.0f} img/s, {imr['total_seconds']:.1f} s "
          f"total, test {imr['test_accuracy']:.2%}, {imr['precision']}, {imr['train_gflops_per_second']} GFLOP/s, "
          f"peak {imr['peak_rss_mb']:.0f} MB | throughput x{result['throughput_ratio']:.2f}, wall time "
          f"x{result['wall_ratio']:.2f}", flush=True)
    if args.switches:
        result["switches"] = {}
        for label, flags in (("fp32", ["--precision", "fp32"]), ("contiguous", ["--no-channels-last"])):
            run = imgrec_run(args, work, f"{name}-{label}", *common, *flags)
            result["switches"][label] = run
            print(f"  {name} {label}: {run['images_per_second']:,.0f} img/s (default x"
                  f"{imr['images_per_second'] / run['images_per_second']:.2f}), test {run['test_accuracy']:.2%}",
                  flush=True)
    return result


def budget_runs(args: argparse.Namespace, yardstick: float, work: Path) -> dict:
    """`imgrec train --recipe fast --time-budget T` for each fraction F, T = F x the tutorial's total time."""
    results = {}
    for fraction in args.budgets:
        budget = round(fraction * yardstick)
        run = imgrec_run(args, work, f"fast-{budget}s", "--recipe", "fast", "--time-budget", f"{budget}s")
        results[str(fraction)] = {"budget_seconds": budget, **run}
        print(f"recipe fast, budget {budget} s ({fraction:g} x tutorial): test {run['test_accuracy']:.2%} in "
              f"{run['total_seconds']:.1f} s, {run['epochs']} epochs, {run['images_per_second']:,.0f} img/s, "
              f"{run['train_gflops_per_second']} GFLOP/s, peak {run['peak_rss_mb']:.0f} MB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["fashion-mnist", "cifar10"], default="fashion-mnist")
    parser.add_argument("--data-dir", default=os.environ.get("IMGREC_DATA", "../shared/data"))
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--switches", action="store_true", help="also run imgrec with each speed switch off")
    parser.add_argument("--tutorial-only", action="store_true", help="run only the tutorial's pipeline for --models "
                        "(the yardstick of --budgets), not imgrec's run of the same model")
    parser.add_argument("--budgets", type=float, nargs="*", default=[], help="time budgets as fractions of the "
                        "tutorial's total time for the last model")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; 2048^2 matmul peak {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} "
          f"bf16; {versions()}", flush=True)
    results: dict = {"data": args.data, "matmul_peak_gflops": peaks, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results["models"][name] = compare(args, name, Path(tmp))
        if args.budgets:
            yardstick = results["models"][args.models[-1]]["tutorial"]["total_seconds"]
            results["budgets"] = budget_runs(args, yardstick, Path(tmp))
    results["benchmark_peak_rss_mb"] = peak_rss_mb()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
