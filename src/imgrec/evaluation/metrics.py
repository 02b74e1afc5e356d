"""Classification metrics as plain functions of logits and targets.

Everything derives from sums over examples (a confusion matrix, a loss sum, top-5 hits, and per-bin counts
and sums of confidence for the calibration error), gathered in MetricCounts. Counts of several batches or
processes add up (`counts_a + counts_b`, or an all-reduce with SUM of `counts.tensors()`) before any ratio
is taken, so distributed evaluation gives the same numbers as one process. Imports: torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

CALIBRATION_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 (https://arxiv.org/abs/1706.04599)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    index = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def confusion_matrix_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The confusion matrix of the argmax predictions of (N, num_classes) logits."""
    return confusion_matrix(logits.argmax(1), targets, logits.shape[1])


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the k largest logits."""
    return _topk_hits(logits, targets, k).item() / len(targets) if len(targets) else 0.0


def _topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()


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


def calibration_bins(logits: torch.Tensor, targets: torch.Tensor,
                     bins: int = CALIBRATION_BINS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin ((b-1)/bins, b/bins]: (count int64, sum of confidences float64, correct int64)."""
    probs = torch.softmax(logits.double(), dim=1)
    confidence, preds = probs.max(dim=1)
    inner_edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    index = torch.bucketize(confidence, inner_edges, right=False)  # edge e belongs to the bin below it
    count = torch.bincount(index, minlength=bins)
    confidence_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct = torch.bincount(index, weights=(preds == targets).double(), minlength=bins).round().to(torch.int64)
    return count, confidence_sum, correct


def expected_calibration_error(count: torch.Tensor, confidence_sum: torch.Tensor, correct: torch.Tensor) -> float:
    """ECE = sum over bins of |correct - confidence sum| / N: the mean gap between confidence and accuracy."""
    total = int(count.sum())
    if total == 0:
        return 0.0
    return float((correct.double() - confidence_sum).abs().sum() / total)


def reliability_table(count: torch.Tensor, confidence_sum: torch.Tensor, correct: torch.Tensor) -> list[dict[str, Any]]:
    """One row per bin: its confidence range, count, mean confidence and accuracy (None when empty)."""
    bins = len(count)
    rows = []
    for b in range(bins):
        n = int(count[b])
        rows.append({"low": round(b / bins, 6), "high": round((b + 1) / bins, 6), "count": n,
                     "confidence": float(confidence_sum[b] / n) if n else None,
                     "accuracy": float(correct[b]) / n if n else None})
    return rows


def ece(logits: torch.Tensor, targets: torch.Tensor, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of softmax(logits) with equal-width confidence bins."""
    return expected_calibration_error(*calibration_bins(logits, targets, bins))


@dataclass
class MetricCounts:
    """Sums over examples from which every reported number is derived; they add across batches and processes."""

    confusion: torch.Tensor  # (C, C) int64, row = true class
    loss_sum: torch.Tensor  # () float64, summed cross-entropy
    top5_hits: torch.Tensor  # () int64
    bin_count: torch.Tensor  # (bins,) int64
    bin_confidence: torch.Tensor  # (bins,) float64
    bin_correct: torch.Tensor  # (bins,) int64

    def __add__(self, other: MetricCounts) -> MetricCounts:
        return MetricCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce (SUM) in place, in a fixed order."""
        return [getattr(self, f.name) for f in fields(self)]


def count_predictions(logits: torch.Tensor, targets: torch.Tensor, bins: int = CALIBRATION_BINS) -> MetricCounts:
    """MetricCounts of one batch (or a whole split) of (N, num_classes) logits and (N,) targets."""
    logits, targets = logits.detach().float().cpu(), targets.detach().cpu().to(torch.int64)
    loss = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum") if len(targets) else None
    return MetricCounts(
        confusion=confusion_matrix_from_logits(logits, targets),
        loss_sum=loss if loss is not None else torch.zeros((), dtype=torch.float64),
        top5_hits=_topk_hits(logits, targets, 5) if len(targets) else torch.zeros((), dtype=torch.int64),
        **dict(zip(("bin_count", "bin_confidence", "bin_correct"), calibration_bins(logits, targets, bins))),
    )


def report_from_counts(counts: MetricCounts, classes: Sequence[str]) -> dict[str, Any]:
    """accuracy, top-1/top-5, loss, per-class P/R/F1/support, macro and weighted averages, balanced accuracy,
    ECE with its reliability table, and the confusion matrix (plain values, ready for JSON)."""
    matrix = counts.confusion
    per = per_class_metrics(matrix)
    support = per["support"]
    count = int(support.sum())
    total = max(count, 1)
    accuracy = float(matrix.diag().sum()) / total
    report: dict[str, Any] = {"count": count, "accuracy": accuracy, "top1_accuracy": accuracy,
                              "loss": float(counts.loss_sum) / total if count else 0.0}
    if len(classes) >= 5:
        report["top5_accuracy"] = float(counts.top5_hits) / total if count else 0.0
    present = support > 0
    for name in ("precision", "recall", "f1"):
        report[f"macro_{name}"] = float(per[name][present].mean()) if present.any() else 0.0
        report[f"weighted_{name}"] = float((per[name] * support).sum()) / total
    report["balanced_accuracy"] = report["macro_recall"]
    report["imbalanced"] = is_imbalanced(support)
    bins = (counts.bin_count, counts.bin_confidence, counts.bin_correct)
    report["ece"] = expected_calibration_error(*bins)
    report["reliability"] = reliability_table(*bins)
    report["per_class"] = {
        name: {"precision": round(float(per["precision"][i]), 6), "recall": round(float(per["recall"][i]), 6),
               "f1": round(float(per["f1"][i]), 6), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    report["confusion_matrix"] = matrix.tolist()
    return report


IMBALANCE_RATIO = 1.5  # largest / smallest class of a split at which accuracy alone misleads


def is_imbalanced(support: torch.Tensor) -> bool:
    """Whether a split's classes (those with images) differ in size by IMBALANCE_RATIO or more: then accuracy is
    mostly the large classes', and balanced accuracy and macro-F1 belong beside it."""
    present = support[support > 0]
    return bool(len(present) > 1 and present.max() >= IMBALANCE_RATIO * present.min())


def classification_report(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """report_from_counts of one whole split of logits and targets."""
    return report_from_counts(count_predictions(logits, targets), classes)


def worst_mistakes(logits: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of up to n misclassified rows, the most confident first: by the probability of the wrong class
    predicted (highest cross-entropy would rank a 48% guess between two wrong classes above a 95% mistake)."""
    confidence = torch.softmax(logits.double(), dim=1).amax(dim=1)
    wrong = (logits.argmax(1) != targets).nonzero().flatten()
    order = confidence[wrong].argsort(descending=True, stable=True)
    return wrong[order][:n]
