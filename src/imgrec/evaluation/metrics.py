"""Classification metrics as plain functions of logits and targets.

Everything derives from integer counts (the confusion matrix), so counts from several processes can simply
be summed before the ratios are taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    index = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the k largest logits."""
    k = min(k, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return (topk == targets[:, None]).any(dim=1).float().mean().item() if len(targets) else 0.0


def per_class_metrics(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    m = matrix.to(torch.float64)
    tp = m.diag()
    predicted = m.sum(0)
    support = m.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def classification_report(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """accuracy, top-5 (for >= 5 classes), loss, per-class P/R/F1/support, macro and weighted F1, matrix."""
    num_classes = len(classes)
    preds = logits.argmax(1)
    matrix = confusion_matrix(preds, targets, num_classes)
    per = per_class_metrics(matrix)
    support = per["support"]
    total = support.sum().clamp_min(1)
    report: dict[str, Any] = {
        "count": int(len(targets)),
        "accuracy": float(matrix.diag().sum() / total),
        "loss": float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="mean")) if len(targets) else 0.0,
    }
    if num_classes >= 5:
        report["top5_accuracy"] = topk_accuracy(logits, targets, 5)
    present = support > 0
    report["macro_f1"] = float(per["f1"][present].mean()) if present.any() else 0.0
    report["weighted_f1"] = float((per["f1"] * support).sum() / total)
    report["balanced_accuracy"] = float(per["recall"][present].mean()) if present.any() else 0.0
    report["per_class"] = {
        name: {"precision": round(float(per["precision"][i]), 6), "recall": round(float(per["recall"][i]), 6),
               "f1": round(float(per["f1"][i]), 6), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    report["confusion_matrix"] = matrix.tolist()
    return report
