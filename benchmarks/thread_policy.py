"""How torch's OpenMP threads should wait, and how many there should be: spinning (OpenMP's default) or sleeping
(OMP_WAIT_POLICY=PASSIVE), on every core or on one, on an idle machine and next to one busy process; and what the
`imgrec` command chooses by itself (it measures how busy the CPUs are when it starts, and makes the threads sleep
when other processes use half a CPU or more; it keeps a thread on every core).

Each case is one `imgrec train --data fashion-mnist --model MODEL --epochs 1 --train-samples N` process with
all cores as threads unless the case says one; "busy" runs a pure-Python busy loop on one core alongside it, as
an editor, a browser or a second job would. Printed: training images/s per case.

    python benchmarks/thread_policy.py --data-dir ../shared/data --models airnet-small lenet mlp
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = {"spin (OpenMP default)": "ACTIVE_DEFAULT", "sleep (PASSIVE)": "PASSIVE",
            "sleep, one thread": "PASSIVE_ONE", "imgrec's choice": "AUTO"}


def spin() -> None:
    while True:
        pass


def train(args: argparse.Namespace, model: str, policy: str, project: Path, name: str) -> float:
    """Training images/s of one imgrec process under the given OMP_WAIT_POLICY."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)  # AUTO: imgrec decides
    if policy == "ACTIVE_DEFAULT":
        env["OMP_WAIT_POLICY"] = ""  # set but empty: OpenMP's own default, and imgrec leaves it alone
    elif policy in ("PASSIVE", "PASSIVE_ONE"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        if policy == "PASSIVE_ONE":
            env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "imgrec", "train", "--data", "fashion-mnist", "--data-dir", args.data_dir,
           "--model", model, "--epochs", "1", "--train-samples", str(args.train_samples), "--project", str(project),
           "--name", name]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
    return json.loads((project / name / "summary.json").read_text())["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("IMGREC_DATA", "../shared/data"))
    parser.add_argument("--models", nargs="+", default=["lenet", "mlp"])
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for load in ("idle", "busy"):
                hog = multiprocessing.Process(target=spin, daemon=True) if load == "busy" else None
                if hog:
                    hog.start()
                try:
                    for label, policy in POLICIES.items():
                        rate = train(args, model, policy, Path(tmp), f"{model}-{load}-{policy.lower()}")
                        results.setdefault(model, {}).setdefault(load, {})[label] = rate
                        print(f"{model}, {load} machine, threads {label}: {rate:,.0f} img/s", flush=True)
                finally:
                    if hog:
                        hog.terminate()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
