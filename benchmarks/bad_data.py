"""Bad files in a real image folder: does skipping them cost accuracy against the clean folder?

Takes a subset of the CIFAR-10 JPEG archive (all 10 classes; --train-per-class from its train/, --test-per-class
from its test/), makes a copy with 5% of all files replaced by bad files (zero-byte, truncated, not an image,
a decompression bomb, corrupt pixel data, in turn), and trains `imgrec train --data FOLDER --model lenet` on
both, with the same settings, for several seeds. Printed: test accuracy of both per seed, the gap, and the
mean gap over seeds. Each run is a separate `imgrec` process with one thread.

    python benchmarks/bad_data.py --data-dir ../shared/data --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from common import CIFAR10_CLASSES, extract_cifar10  # noqa: E402  (a script's folder is on its path)

from conftest import write_bad_file  # noqa: E402  (the tests' bad-file writers: one definition of each kind)

KINDS = ("zero-byte", "truncated", "not-an-image", "too-large", "corrupt")


def plant(root: Path, fraction: float, seed: int) -> dict[str, str]:
    """Replace fraction of all images under root with bad files, each kind in turn; returns file -> kind."""
    files = sorted(root.rglob("*.jpg"))
    chosen = random.Random(seed).sample(files, round(fraction * len(files)))
    planted = {}
    for i, path in enumerate(chosen):
        kind = KINDS[i % len(KINDS)]
        write_bad_file(path, kind)
        planted[str(path)] = kind
    return planted


def train(data: Path, project: Path, name: str, seed: int, args: argparse.Namespace) -> dict:
    """One `imgrec train` process; returns its summary.json plus the skipped files it named."""
    cmd = [sys.executable, "-m", "imgrec", "train", "--data", str(data), "--model", "lenet", "--project", str(project),
           "--name", name, "--seed", str(seed), "--split-seed", str(seed), "--epochs", str(args.epochs),
           "--lr", str(args.lr), "--schedule", args.schedule, "--batch-size", str(args.batch_size), "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((project / name / "summary.json").read_text())
    skipped = project / name / "skipped.txt"
    summary["skipped"] = [line.split("\t")[0] for line in skipped.read_text().splitlines()] if skipped.exists() else []
    summary["warnings"] = proc.stderr.count("warning: skipped")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("IMGREC_DATA", "../shared/data"))
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine", "onecycle"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; one thread per run")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clean = extract_cifar10(Path(args.data_dir) / "cifar10-jpeg.tar.gz", work / "clean",
                                dict.fromkeys(CIFAR10_CLASSES, args.train_per_class),
                                dict.fromkeys(CIFAR10_CLASSES, args.test_per_class))
        bad_folder = Path(shutil.copytree(clean, work / "bad"))
        planted = plant(bad_folder, args.fraction, seed=1234)
        print(f"{sum(1 for _ in clean.rglob('*.jpg'))} files; {len(planted)} replaced by bad files "
              f"({', '.join(f'{k}: {list(planted.values()).count(k)}' for k in KINDS)})", flush=True)
        runs = []
        for seed in args.seeds:
            result = {"seed": seed}
            for name, folder in (("clean", clean), ("bad", bad_folder)):
                summary = train(folder, work / "runs", f"{name}-{seed}", seed, args)
                result[name] = summary["test_accuracy"]
                if name == "bad":
                    named_once = sorted(summary["skipped"]) == sorted(planted) and summary["warnings"] == 1
                    result["every_bad_file_named_once"] = named_once
            result["gap_points"] = 100 * (result["bad"] - result["clean"])
            runs.append(result)
            print(f"seed {seed}: clean {result['clean']:.2%}, bad {result['bad']:.2%}, gap "
                  f"{result['gap_points']:+.2f} points, every bad file named once: {result['every_bad_file_named_once']}",
                  flush=True)
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("clean", "bad", "gap_points")}
    print(f"mean over {len(runs)} seeds: clean {mean['clean']:.2%}, bad {mean['bad']:.2%}, "
          f"gap {mean['gap_points']:+.2f} points")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "runs": runs, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
