"""What --optimizer muon's step costs beside a training step, and whether its Newton-Schulz iterations would be
cheaper in fp32 on this CPU.

For airnet (3x32x32) and airnet-small (1x28x28), batch 256, bf16 autocast, channels-last: the forward and backward
pass, an SGD step and imgrec's MuonSGD step; then, for each conv filter bank as Muon sees it (out x in*k*k),
torch's Newton-Schulz iterations (bf16, as torch.optim.Muon runs them) against the same five iterations in fp32.

    PYTHONPATH=src python benchmarks/muon_step_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch.optim import _muon

from imgrec.engine.optimizers import MuonSGD
from imgrec.models.registry import build_model

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults
STEPS = 5


def milliseconds(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1000


def newton_schulz_fp32(grad: torch.Tensor) -> torch.Tensor:
    a, b, c = COEFFICIENTS
    x = grad.T if grad.size(0) > grad.size(1) else grad
    x = x / x.norm()
    for _ in range(STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def model_costs(name: str, channels: int, size: int) -> None:
    model = build_model(name, 10, channels, (size, size)).to(memory_format=torch.channels_last)
    x = torch.randn(256, channels, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,))

    def forward_backward() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()

    forward_backward()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.85, nesterov=True, foreach=True)
    muon = MuonSGD(model.parameters(), lr=0.1, momentum=0.85, weight_decay=0, muon_lr=0.1,
                   kernels={"foreach": True})
    print(f"{name}: forward+backward {milliseconds(forward_backward, 5):.1f} ms, SGD step "
          f"{milliseconds(sgd.step):.2f} ms, MuonSGD step {milliseconds(muon.step):.2f} ms")
    total_bf16 = total_fp32 = 0.0
    for shape in (tuple(p.shape) for p in model.parameters() if p.ndim == 4):
        grad = torch.randn(shape[0], math.prod(shape[1:]))
        bf16 = milliseconds(lambda g=grad: _muon._zeropower_via_newtonschulz(g, COEFFICIENTS, STEPS, 1e-7))
        fp32 = milliseconds(lambda g=grad: newton_schulz_fp32(g))
        total_bf16, total_fp32 = total_bf16 + bf16, total_fp32 + fp32
        print(f"  {shape}: Newton-Schulz bf16 {bf16:.2f} ms, fp32 {fp32:.2f} ms")
    print(f"  all banks: bf16 {total_bf16:.1f} ms, fp32 {total_fp32:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_costs("airnet", 3, 32)
    model_costs("airnet-small", 1, 28)


if __name__ == "__main__":
    main()
