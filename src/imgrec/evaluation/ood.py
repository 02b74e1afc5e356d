"""Out-of-distribution scores: how much an image looks like one of the model's classes, from its raw logits.

Higher scores mean "more like the training data". The threshold is set on held-out images of the known classes,
so that a chosen fraction of them (95% by default) scores above it; an image below it is "none of my classes".
Pure functions of logits; imports torch only.

- max_softmax: the largest softmax probability (Hendrycks & Gimpel, 2017, https://arxiv.org/abs/1610.02136).
- energy: logsumexp of the logits, the negative free energy (Liu et al., 2020, https://arxiv.org/abs/2010.03759);
  it keeps the logits' scale, which softmax throws away, and separates far-away inputs better.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_SCORE = "energy"
DEFAULT_KEEP = 0.95  # fraction of held-out in-distribution images that must score above the threshold


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) raw logits -> (N,) largest softmax probability."""
    return torch.softmax(logits.float(), dim=1).amax(dim=1)


def energy(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) raw logits -> (N,) logsumexp (negative energy at temperature 1)."""
    return torch.logsumexp(logits.float(), dim=1)


OOD_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"max_softmax": max_softmax, "energy": energy}


def ood_threshold(scores: torch.Tensor, keep: float = DEFAULT_KEEP) -> float:
    """The score above which `keep` of these (in-distribution) scores lie: their (1 - keep) quantile."""
    if scores.numel() == 0:
        raise ValueError("no scores to set a threshold from")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return float(torch.quantile(scores.double(), 1.0 - keep, interpolation="lower"))
