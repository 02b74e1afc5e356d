"""--optimizer muon: torch.optim.Muon for the conv filter banks, SGD with Nesterov momentum for everything else.

The split of the CIFAR-10 speed runs (airbench94_muon): each conv filter bank (out, in, k, k) is optimised as the
matrix out x (in*k*k) with Newton-Schulz orthogonalised momentum, its norm held at sqrt(out) before each update
(the convs feed BatchNorm, so only their direction matters; they take no weight decay); BatchNorm shifts, biases,
the head and every other parameter follow SGD as --optimizer sgd would. torch's Muon takes 2-D tensors only, so it
gets a 2-D view of each filter bank that shares its storage: the model's own parameters stay 4-D, and checkpoints,
export and Grad-CAM see an ordinary model. Imports: torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from imgrec.errors import UsageError

MUON_MOMENTUM = 0.6  # airbench94_muon's (its SGD part keeps 0.85)


def _matrix_of(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-D filter bank (or its gradient) as out x (in*k*k): a view when the layout allows, else a copy. The
    columns of a channels-last bank are in (k, k, in) order, which orthogonalisation does not mind."""
    if channels_last:
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.reshape(len(tensor), -1)


class MuonSGD(torch.optim.Optimizer):
    """Muon over 2-D views of the 4-D parameters, SGD over the rest; one optimiser to the trainer.

    param_groups are the two inner optimisers' groups (the Muon ones first), so a learning-rate schedule scales
    both; state_dict() holds both inner states, and load_state_dict() restores them.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float, weight_decay: float, muon_lr: float,
                 kernels: dict[str, bool] | None = None) -> None:
        given = list(params)  # tensors (one group) or dicts (groups)
        groups = given if given and isinstance(given[0], dict) else [{"params": given}]
        self._filters: list[torch.Tensor] = []
        self._channels_last: list[bool] = []
        muon_groups, sgd_groups = [], []
        for group in groups:
            tensors = list(group["params"])
            filters = [p for p in tensors if p.ndim == 4]
            rest = [p for p in tensors if p.ndim != 4]
            scale = group.get("lr", lr) / lr  # a group's rate relative to --lr (transfer models' lower rates)
            if filters:
                matrices = []
                for p in filters:
                    channels_last = not p.is_contiguous()
                    if channels_last and not p.is_contiguous(memory_format=torch.channels_last):
                        raise ValueError("Muon needs contiguous or channels-last conv weights")
                    matrices.append(_matrix_of(p.detach(), channels_last))  # shares p's storage
                    self._filters.append(p)
                    self._channels_last.append(channels_last)
                muon_groups.append({"params": matrices, "lr": muon_lr * scale})
            if rest:
                sgd_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": rest})
        if not muon_groups:
            raise UsageError("--optimizer muon needs a model with conv layers (4-D weights) to train; use sgd")
        self.muon = torch.optim.Muon(muon_groups, lr=muon_lr, momentum=MUON_MOMENTUM, nesterov=True, weight_decay=0.0)
        self.sgd = (torch.optim.SGD(sgd_groups, lr=lr, momentum=momentum, nesterov=momentum > 0,
                                    weight_decay=weight_decay, **(kernels or {})) if sgd_groups else None)
        super().__init__([p for g in groups for p in g["params"]], {})
        self._share_groups()

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [self.muon] + ([self.sgd] if self.sgd is not None else [])

    def _share_groups(self) -> None:
        self.param_groups = [g for opt in self._inner() for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices = [m for g in self.muon.param_groups for m in g["params"]]
        for p, matrix, channels_last in zip(self._filters, matrices, self._channels_last):
            matrix.grad = None if p.grad is None else _matrix_of(p.grad, channels_last)
            if p.grad is not None:  # the bank's norm back to sqrt(out): only the update's direction then counts
                matrix.mul_(math.sqrt(len(matrix)) / matrix.norm().clamp_min(1e-12))
        for opt in self._inner():
            opt.step()
        for matrix in matrices:
            matrix.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._inner():
            opt.zero_grad(set_to_none)
        for p in self._filters:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "sgd": self.sgd.state_dict() if self.sgd is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "sgd"} or (state_dict["sgd"] is None) != (self.sgd is None):
            raise ValueError("this optimiser state is not --optimizer muon's for this model")
        self.muon.load_state_dict(state_dict["muon"])
        if self.sgd is not None:
            self.sgd.load_state_dict(state_dict["sgd"])
        self._share_groups()  # loading replaces the inner groups


def build_muon(params: Iterable[Any], cfg: Any, kernels: dict[str, bool]) -> MuonSGD:
    """The trainer's factory for --optimizer muon: --muon-lr for the filters, --lr/--momentum/--weight-decay (SGD)
    for the rest."""
    return MuonSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, muon_lr=cfg.muon_lr,
                   kernels=kernels)
