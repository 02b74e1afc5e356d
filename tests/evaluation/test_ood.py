"""Out-of-distribution scores and their threshold, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from imgrec.evaluation.ood import OOD_SCORES, energy, max_softmax, ood_threshold


def test_max_softmax_and_energy_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert max_softmax(logits).tolist() == pytest.approx([0.5, 0.75])
    assert energy(logits).tolist() == pytest.approx([math.log(2.0), math.log(4.0)])


def test_energy_keeps_the_scale_that_softmax_drops() -> None:
    small, large = torch.tensor([[1.0, 0.0]]), torch.tensor([[11.0, 10.0]])
    assert max_softmax(small) == pytest.approx(max_softmax(large))
    assert energy(large) > energy(small) + 9


def test_threshold_keeps_the_asked_fraction() -> None:
    scores = torch.arange(100, dtype=torch.float32)  # 0..99
    threshold = ood_threshold(scores, keep=0.95)
    assert threshold == 4.0  # the 5% quantile (lower): 96 of the 100 scores are >= 4
    assert (scores >= threshold).float().mean() >= 0.95
    assert ood_threshold(scores, keep=1.0) == 0.0
    assert set(OOD_SCORES) == {"max_softmax", "energy"}


def test_threshold_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        ood_threshold(torch.tensor([]))
    with pytest.raises(ValueError):
        ood_threshold(torch.tensor([1.0]), keep=0.0)
