"""--optimizer muon: torch's Muon for the conv filter banks (as out x in*k*k matrices), SGD for the rest."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine.optimizers import MUON_MOMENTUM, MuonSGD
from imgrec.errors import UsageError


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_filters_take_muons_step_and_the_rest_sgds(layout: torch.memory_format) -> None:
    """One step equals torch's Muon on each filter bank flattened to out x (in*k*k) (after its norm is set to
    sqrt(out)) and torch's SGD on everything else; the model's parameters stay 4-D in their layout."""
    model = _net().to(memory_format=layout)
    reference = _net()
    x, y = torch.randn(6, 3, 6, 6).to(memory_format=layout), torch.arange(6) % 5
    optimizer = MuonSGD(model.parameters(), lr=0.1, momentum=0.85, weight_decay=1e-3, muon_lr=0.05)
    _loss(model, x, y).backward()
    optimizer.step()

    _loss(reference, x.contiguous(), y).backward()
    filters = [p for p in reference.parameters() if p.ndim == 4]
    others = [p for p in reference.parameters() if p.ndim != 4]
    matrices = []
    with torch.no_grad():
        for p in filters:
            p.mul_(math.sqrt(len(p)) / p.norm())
            matrix = p.detach().reshape(len(p), -1).clone()
            matrix.grad = p.grad.reshape(len(p), -1)
            matrices.append(matrix)
    torch.optim.Muon(matrices, lr=0.05, momentum=MUON_MOMENTUM, nesterov=True, weight_decay=0.0).step()
    torch.optim.SGD(others, lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3).step()

    trained = dict(model.named_parameters())
    for (name, p), matrix in zip(((n, p) for n, p in reference.named_parameters() if p.ndim == 4), matrices):
        assert trained[name].shape == p.shape and trained[name].is_contiguous(memory_format=layout)
        torch.testing.assert_close(trained[name].contiguous().reshape(len(p), -1), matrix, rtol=0, atol=1e-6)
    for name, p in reference.named_parameters():
        if p.ndim != 4:
            torch.testing.assert_close(trained[name], p, rtol=0, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_schedule_scales_both_parts_and_the_state_continues_exactly() -> None:
    """A learning-rate schedule reaches Muon's groups and SGD's; a fresh optimiser that loads the state dict
    takes the same next step as the one that saved it."""
    model, twin = _net(), _net()
    x, y = torch.randn(6, 3, 6, 6), torch.arange(6) % 5
    first = MuonSGD(model.parameters(), lr=0.1, momentum=0.85, weight_decay=0.0, muon_lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(first, lambda step: 0.5 ** step)
    for _ in range(2):
        first.zero_grad()
        _loss(model, x, y).backward()
        first.step()
        scheduler.step()
    assert [g["lr"] for g in first.param_groups] == [0.05 / 4, 0.1 / 4]
    twin.load_state_dict(model.state_dict())
    second = MuonSGD(twin.parameters(), lr=0.1, momentum=0.85, weight_decay=0.0, muon_lr=0.05)
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as if saved and loaded
    assert [g["lr"] for g in second.param_groups] == [0.05 / 4, 0.1 / 4]
    for model_, optimizer in ((model, first), (twin, second)):
        optimizer.zero_grad()
        _loss(model_, x, y).backward()
        optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_muon_needs_conv_filters_and_not_fp16() -> None:
    with pytest.raises(UsageError, match="conv layers"):
        MuonSGD(nn.Linear(4, 2).parameters(), lr=0.1, momentum=0.9, weight_decay=0.0, muon_lr=0.05)
    with pytest.raises(UsageError, match="fp16"):
        RunConfig(optimizer="muon", precision="fp16")
    with pytest.raises(UsageError, match="muon-lr"):
        RunConfig(muon_lr=0)
