"""Does torch.compile pay for airnet's training step on this CPU? Eager against compiled, in alternating blocks.
With --against muon: the eager step with SGD against the same with --optimizer muon (what Muon's step costs).

The step is imgrec's own (bf16 autocast where native, channels-last, SGD with Nesterov momentum, label smoothing),
on random images of the recipe's shapes: airnet-small on 1x28x28, airnet on 3x32x32. Prints images/s of each and
the compile time; writes --json.

    PYTHONPATH=src python benchmarks/compile_probe.py --model airnet-small --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine.system import autocast_dtype, select_device
from imgrec.engine.trainer import OPTIMIZERS, _make_step, optimizer_kernels, parameter_groups
from imgrec.models.registry import build_model

SHAPES = {"airnet-small": (1, 28), "airnet": (3, 32)}


def make_step(model_name: str, compiled: bool, batch: int, optimizer_name: str = "sgd") -> tuple:
    torch.manual_seed(0)
    channels, size = SHAPES[model_name]
    model = build_model(model_name, 10, channels, (size, size)).to(memory_format=torch.channels_last)
    cfg = RunConfig(optimizer=optimizer_name, lr=0.1, momentum=0.85, weight_decay=1e-3, label_smoothing=0.1)
    device = select_device("cpu")
    optimizer = OPTIMIZERS[optimizer_name](parameter_groups(model, cfg), cfg, optimizer_kernels(device))
    target = torch.compile(model) if compiled else model
    step = _make_step(target, optimizer, None, torch.amp.GradScaler("cpu", enabled=False),
                      nn.CrossEntropyLoss(label_smoothing=0.1), None, device, autocast_dtype("auto", device),
                      torch.channels_last)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    return step, x, y


def timed(step, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = step(x, y)
    loss.item()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="airnet-small", choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", default="compiled", choices=["compiled", "muon"])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eager = make_step(args.model, False, args.batch)
    compiled = (make_step(args.model, True, args.batch) if args.against == "compiled"
                else make_step(args.model, False, args.batch, "muon"))
    start = time.perf_counter()
    timed(*compiled, 2)  # compiles (forward and backward)
    compile_seconds = time.perf_counter() - start  # with --against muon: two warm-up steps
    timed(*eager, 2)
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):  # alternating blocks: a busy neighbour slows both alike
        rates["eager"].append(timed(*eager, args.steps))
        rates["compiled"].append(timed(*compiled, args.steps))
    result = {"model": args.model, "against": args.against, "threads": args.threads, "batch": args.batch, "compile_seconds": compile_seconds,
              **{k: [round(v) for v in r] for k, r in rates.items()},
              "ratio": sum(rates["compiled"]) / sum(rates["eager"])}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
