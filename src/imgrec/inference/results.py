"""What a prediction returns: one Prediction (or Failure) per image, and BatchPrediction, the tensors behind them.

Plain dataclasses; torch is only named in type hints, so the output formats can use them without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    source: str  # the file's path, or "<kind index>" for an image given in memory
    label: str  # the most probable class
    index: int  # its index in the model's classes
    probability: float  # its probability (temperature-scaled when the weights hold a temperature)
    topk: tuple[tuple[str, float], ...]  # the k most probable (class, probability), best first
    in_distribution: bool | None  # False: looks like none of the classes; None: the weights hold no threshold
    ood_score: float  # the out-of-distribution score (higher: more like the training data)
    model_input: torch.Tensor | None = field(default=None, repr=False, compare=False)  # uint8 (C, H, W), on request

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: path, label, probability, topk [[label, probability], ...], in_distribution."""
        return {"path": self.source, "label": self.label, "probability": round(self.probability, 6),
                "topk": [[name, round(p, 6)] for name, p in self.topk], "in_distribution": self.in_distribution}


@dataclass(frozen=True)
class Failure:
    """An input that could not be predicted: its name and why (a message that names it)."""

    source: str
    message: str


@dataclass
class BatchPrediction:
    """A batch's predictions as tensors, in input order (the vectorised path, no per-image Python)."""

    indices: torch.Tensor  # (B,) int64, most probable class
    probabilities: torch.Tensor  # (B,) float32, its probability
    topk_indices: torch.Tensor  # (B, k) int64
    topk_probabilities: torch.Tensor  # (B, k) float32
    ood_scores: torch.Tensor  # (B,) float32, from the raw logits
    in_distribution: torch.Tensor | None  # (B,) bool, or None without a threshold

    def __len__(self) -> int:
        return int(self.indices.shape[0])
