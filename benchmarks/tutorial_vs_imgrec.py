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

--repeat N runs the side-by-side comparison N times in a row (throughput ratios each time, then the lowest).
--chart PNG draws test accuracy against wall-clock seconds: the tutorial's pipeline after each of its epochs (the
last model's; from the start of its pipeline, its imports already done) and imgrec's --budgets runs (each a whole
command, imports included). --whole-command times the tutorial's script end to end in a fresh Python process
(its imports: torch, matplotlib.pyplot, numpy, torchvision; then its pipeline for the first model and --epochs)
against the whole `imgrec train --data DATA --model MODEL --epochs N` process, with where imgrec's time went
(summary.json's timing). --train-samples N trains both sides on N images (a stratified subset for imgrec, a
seeded random one for the tutorial): a quick check of a code path, not a result.

    python benchmarks/tutorial_vs_imgrec.py --data fashion-mnist --models mlp lenet --epochs 15 --budgets 0.3333 1
    python benchmarks/tutorial_vs_imgrec.py --data cifar10 --models lenet --epochs 15 --budgets 1 2.5
    python benchmarks/tutorial_vs_imgrec.py --models mlp --epochs 2 --whole-command
    python benchmarks/tutorial_vs_imgrec.py --models lenet --epochs 5 --tutorial-only --budgets 0.3333 1 \
        --chart benchmarks/time_to_accuracy-fashion-mnist.png
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


def load_average() -> str:
    """The 1/5/15-minute load averages: how busy the machine was."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
                 batch_size: int = 100, train_samples: int | None = None) -> dict:
    """The tutorial's training loop, as written there (per-sample transforms, .item() per step); curve: the test
    accuracy after each epoch against the seconds since the pipeline started."""
    start = time.perf_counter()
    training_dataset, validation_dataset, channels, size = tutorial_data(data, data_dir, work)
    if train_samples is not None and train_samples < len(training_dataset):  # a quick check, not the tutorial's
        keep = torch.randperm(len(training_dataset), generator=torch.Generator().manual_seed(0))[:train_samples]
        training_dataset = torch.utils.data.Subset(training_dataset, keep.tolist())
    training_loader = torch.utils.data.DataLoader(training_dataset, batch_size=batch_size, shuffle=True)
    validation_loader = torch.utils.data.DataLoader(validation_dataset, batch_size=batch_size, shuffle=False)
    torch.manual_seed(0)
    model = build_model(model_name, 10, channels, size)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_seconds, val_acc, curve = 0.0, 0.0, []
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
        curve.append([round(time.perf_counter() - start, 2), val_acc])
    return {
        "train_images": len(training_dataset), "epochs": epochs, "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start, "test_accuracy": val_acc,
        "images_per_second": epochs * len(training_dataset) / train_seconds, "curve": curve,
    }


def imgrec_run(args: argparse.Namespace, project: Path, name: str, *flags: str) -> dict:
    """One `imgrec train` process on the benchmark's data; its summary.json plus the command's wall time."""
    data = args.data if args.data == "fashion-mnist" else str(Path(args.data_dir) / "cifar10-jpeg.tar.gz")
    cache = project / f"cache-{name}"  # empty: imgrec prepares the data from scratch, inside its total
    subset = ["--train-samples", str(args.train_samples)] if args.train_samples else []
    cmd = [sys.executable, "-m", "imgrec", "train", "--data", data, "--data-dir", args.data_dir, "--project",
           str(project), "--name", name, *subset, *flags]
    env = {**os.environ, "IMGREC_CACHE": str(cache), "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((project / name / "summary.json").read_text())
    keep = ("train_images", "epochs", "best_epoch", "train_seconds", "test_accuracy", "images_per_second",
            "precision", "train_gflop_per_image", "train_gflops_per_second", "peak_rss_mb", "timing")
    return {"command": " ".join(["imgrec", *cmd[3:]]), "total_seconds": seconds, **{k: summary.get(k) for k in keep}}


def compare(args: argparse.Namespace, name: str, work: Path) -> dict:
    """Tutorial and imgrec on one model (and imgrec with each switch off, when asked); prints one line each."""
    tut = tutorial_run(name, args.data, args.data_dir, work, args.epochs, args.lr, train_samples=args.train_samples)
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


def tutorial_script(args: argparse.Namespace) -> None:
    """The tutorial's script in this fresh process (--tutorial-process): its other imports, then its pipeline;
    prints its result as JSON."""
    import matplotlib.pyplot  # noqa: F401  (the tutorial's first cell imports these with torch and torchvision)
    import numpy  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        result = tutorial_run(args.models[0], args.data, args.data_dir, Path(tmp), args.epochs, args.lr,
                              train_samples=args.train_samples)
    print(json.dumps(result))


def whole_command(args: argparse.Namespace, work: Path) -> dict:
    """The tutorial's script end to end in a fresh process against the whole `imgrec train` process."""
    name = args.models[0]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tutorial-process", "--data", args.data, "--data-dir",
           args.data_dir, "--models", name, "--epochs", str(args.epochs), "--lr", str(args.lr)]
    cmd += ["--train-samples", str(args.train_samples)] if args.train_samples else []
    load = load_average()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    tutorial_seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the tutorial's script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tut = json.loads(proc.stdout.splitlines()[-1])
    imr = imgrec_run(args, work, f"{name}-whole", "--model", name, "--epochs", str(args.epochs), "--lr", str(args.lr))
    timing = imr.get("timing") or {}
    rest = imr["total_seconds"] - sum(timing.values()) if timing else None
    result = {"load_average_before": load, "load_average_after": load_average(),
              "tutorial": {**tut, "script_seconds": tutorial_seconds}, "imgrec": imr,
              "ratio": tutorial_seconds / imr["total_seconds"],
              "imgrec_interpreter_and_exit_seconds": rest}
    print(f"whole command, {name}, {args.epochs} epochs: tutorial's script {tutorial_seconds:.1f} s (its pipeline "
          f"{tut['total_seconds']:.1f} s, test {tut['test_accuracy']:.2%}) | imgrec {imr['total_seconds']:.1f} s "
          f"(start-up to first batch {timing.get('startup_seconds', float('nan')):.2f} s, training "
          f"{timing.get('training_seconds', float('nan')):.2f} s, last batch to finished run folder "
          f"{timing.get('after_training_seconds', float('nan')):.2f} s, interpreter start and exit "
          f"{rest if rest is not None else float('nan'):.2f} s; test {imr['test_accuracy']:.2%}) | "
          f"x{result['ratio']:.2f} (load average {load} -> {result['load_average_after']})", flush=True)
    return result


def draw_chart(results: dict, path: Path) -> None:
    """Test accuracy against wall-clock seconds: the tutorial's pipeline after each epoch, imgrec's budgeted runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tutorial_model = list(results["models"])[-1]
    tut = results["models"][tutorial_model]["tutorial"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs, ys = zip(*tut["curve"])
    ax.plot(xs, [100 * y for y in ys], "o-", color="#888888",
            label=f"tutorial's pipeline, {tutorial_model} (test set after each epoch)")
    budgets = sorted(results.get("budgets", {}).items(), key=lambda item: item[1]["total_seconds"])
    if budgets:
        runs = [r for _, r in budgets]
        ax.plot([r["total_seconds"] for r in runs], [100 * r["test_accuracy"] for r in runs], "s-",
                color="#1f5fb4", label="imgrec --recipe fast --time-budget (whole command; T: the tutorial's time)")
        for fraction, r in budgets:
            point = (r["total_seconds"], 100 * r["test_accuracy"])
            ax.annotate(f"budget {r['budget_seconds']} s ({float(fraction):g} T)", point, textcoords="offset points",
                        xytext=(4, -14), ha="right", fontsize=8, color="#1f5fb4")
    for name, entry in results["models"].items():  # imgrec's plain runs of the same models, when they ran
        if "imgrec" in entry:
            run = entry["imgrec"]
            ax.plot(run["total_seconds"], 100 * run["test_accuracy"], "^", color="#2e8b57",
                    label=f"imgrec {name}, {run['epochs']} epochs (whole command)")
    subset = f", {results['train_samples']:,} training images" if results.get("train_samples") else ""
    ax.set_title(f"{results['data']}{subset}: test accuracy against wall-clock time\n(load average "
                 f"{results['load_average_before']} at the start, {results['load_average_after']} at the end)",
                 fontsize=10)
    ax.set_xlabel("seconds since the start (tutorial: of its pipeline; imgrec: of the command)")
    ax.set_ylabel("test accuracy (%)")
    ax.margins(x=0.1, y=0.1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"chart: {path}", flush=True)


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
    parser.add_argument("--repeat", type=int, default=1, help="run the side-by-side comparison this many times")
    parser.add_argument("--whole-command", action="store_true", help="the tutorial's script and the imgrec command "
                        "end to end, each a fresh process (the first model, --epochs), instead of the comparison")
    parser.add_argument("--train-samples", type=int, help="train both sides on this many images (a quick check)")
    parser.add_argument("--chart", help="draw test accuracy against wall-clock seconds into this PNG")
    parser.add_argument("--tutorial-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.tutorial_process:
        tutorial_script(args)
        return
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; 2048^2 matmul peak {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} "
          f"bf16; {versions()}; load average {load_average()}", flush=True)
    results: dict = {"data": args.data, "matmul_peak_gflops": peaks, "train_samples": args.train_samples,
                     "load_average_before": load_average(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.whole_command:
            results["whole_command"] = whole_command(args, Path(tmp))
        else:
            rounds = []
            for i in range(args.repeat):
                rounds.append({name: compare(args, name, Path(tmp) / f"round-{i}") for name in args.models})
            results["models"] = rounds[-1]
            if args.repeat > 1:
                results["rounds"] = rounds
                for name in args.models if not args.tutorial_only else []:
                    ratios = [r[name]["throughput_ratio"] for r in rounds]
                    print(f"{name}: throughput x{' x'.join(f'{x:.2f}' for x in ratios)} in {args.repeat} runs "
                          f"(lowest x{min(ratios):.2f})", flush=True)
        if args.budgets:
            yardstick = results["models"][args.models[-1]]["tutorial"]["total_seconds"]
            results["budgets"] = budget_runs(args, yardstick, Path(tmp))
    results["load_average_after"] = load_average()
    results["benchmark_peak_rss_mb"] = peak_rss_mb()
    print(f"load average at the end: {results['load_average_after']}", flush=True)
    if args.chart:
        draw_chart(results, Path(args.chart))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
