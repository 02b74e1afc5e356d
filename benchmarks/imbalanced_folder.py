"""The learning-rate finder on an imbalanced photo folder: does `--lr find` train as well as the best of a grid?

Builds the folder once into CACHE/imb5 (reused when complete): the first 1,000 / 500 / 200 / 100 / 50 training
images of airplane / automobile / bird / cat / deer from the CIFAR-10 JPEG archive (`train/`; imgrec holds 10% of
it out for validation) and all 1,000 test images of each (`test/`, balanced). Then trains
`imgrec train --data CACHE/imb5 --model lenet --optimizer adam --batch-size 64 --balance sampler --epochs 10
--threads 1 --workers 0` once per rate and seed, one process at a time, and prints the test accuracy of each
(with the rate `find` chose), the mean per rate, and how far `find`'s mean is from the best grid rate's.

    python benchmarks/imbalanced_folder.py --cache /tmp/imb --seeds 0 1 2 --lrs 0.001 0.003 find --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import cpu_name, extract_cifar10, load_average  # a script's folder is on its path

REPO = Path(__file__).resolve().parents[1]
TRAIN_COUNTS = {"airplane": 1000, "automobile": 500, "bird": 200, "cat": 100, "deer": 50}
TEST_COUNTS = dict.fromkeys(TRAIN_COUNTS, 1000)


def build_folder(archive: Path, cache: Path) -> Path:
    """CACHE/imb5, extracted from the archive unless an earlier call finished it (its marker file exists)."""
    folder = cache / "imb5"
    done = cache / "imb5.complete"
    if not done.exists():
        extract_cifar10(archive, folder, TRAIN_COUNTS, TEST_COUNTS)
        done.write_text(json.dumps({"train": TRAIN_COUNTS, "test": TEST_COUNTS}))
    return folder


def train(data: Path, project: Path, lr: str, seed: int, args: argparse.Namespace) -> dict:
    """One `imgrec train` process; its summary plus the rate it trained with (find's suggestion) and time."""
    name = f"lr{lr}-seed{seed}"
    cmd = [sys.executable, "-m", "imgrec", "train", "--data", str(data), "--model", "lenet", "--optimizer", "adam",
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--balance", args.balance,
           "--lr", lr, "--seed", str(seed), "--threads", "1", "--workers", "0", "--device", "cpu",
           "--project", str(project), "--name", name, "--exist-ok"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((project / name / "summary.json").read_text())
    found = [line for line in (proc.stdout + proc.stderr).splitlines() if "lr-find:" in line]
    rate = yaml.safe_load((project / name / "config.yaml").read_text())["lr"]  # find: its suggestion
    return {"lr": lr, "seed": seed, "trained_lr": rate, "test_accuracy": summary["test_accuracy"],
            "test_macro_f1": summary["test_macro_f1"], "seconds": round(time.perf_counter() - started, 1),
            "lr_find": found[-1].split("lr-find:", 1)[1].strip() if found else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="folder for the image folder and the runs")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("IMGREC_DATA", "../shared/data")),
                        help="the folder holding cifar10-jpeg.tar.gz")
    parser.add_argument("--lrs", nargs="+", default=["0.0003", "0.001", "0.003", "0.01", "find"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--balance", default="sampler", choices=["none", "weights", "sampler"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    data = build_folder(args.data_dir / "cifar10-jpeg.tar.gz", args.cache)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; one thread per run; load {load_average()}", flush=True)
    runs = []
    for lr in args.lrs:
        for seed in args.seeds:
            run = train(data, args.cache / "runs", lr, seed, args)
            runs.append(run)
            print(f"--lr {lr:>6} seed {seed}: {run['test_accuracy']:.2%} (macro-F1 {run['test_macro_f1']:.3f}, "
                  f"lr {run['trained_lr']:.3g}, {run['seconds']:.0f}s)", flush=True)
    means = {lr: sum(r["test_accuracy"] for r in runs if r["lr"] == lr) / len(args.seeds) for lr in args.lrs}
    print("\n| --lr | " + " | ".join(args.lrs) + " |\n" + "|---" * (len(args.lrs) + 1) + "|")
    print("| mean test accuracy | " + " | ".join(f"{means[lr]:.2%}" for lr in args.lrs) + " |")
    for seed in args.seeds:
        print(f"| seed {seed} | " + " | ".join(f"{r['test_accuracy']:.2%}" for lr in args.lrs for r in runs
                                            if r["lr"] == lr and r["seed"] == seed) + " |")
    grid = {lr: m for lr, m in means.items() if lr != "find"}
    gap = None
    if "find" in means and grid:
        best = max(grid, key=grid.__getitem__)
        gap = 100 * (means["find"] - grid[best])
        suggested = ", ".join(f"{r['trained_lr']:.3g}" for r in runs if r["lr"] == "find")
        print(f"\nfind's mean is {gap:+.2f} points from the best grid rate's ({best}: {grid[best]:.2%}); "
              f"suggested: {suggested}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("cache", "data_dir", "json")},
                                         "machine": cpu_name(), "load_average": load_average(), "runs": runs,
                                         "mean_test_accuracy": means, "find_minus_best_grid_points": gap}, indent=2, default=str))


if __name__ == "__main__":
    main()
