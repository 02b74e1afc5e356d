"""Metrics against scikit-learn on random labels (classes missing from targets and predictions included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from imgrec.evaluation.metrics import (
    MetricCounts,
    calibration_bins,
    classification_report,
    confusion_matrix,
    confusion_matrix_from_logits,
    count_predictions,
    ece,
    expected_calibration_error,
    per_class_metrics,
    reliability_table,
    report_from_counts,
    topk_accuracy,
    worst_mistakes,
)

# sklearn warns about classes missing from y_true or y_pred: exactly the cases tested here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:sklearn.*")


@st.composite
def labelled_logits(draw: st.DrawFn, min_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits (N, C) float32, targets (N,), C): targets and argmax predictions each use a random subset of classes."""
    num_classes = draw(st.integers(min_classes, 12))
    n = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    target_classes = draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes, unique=True))
    targets = rng.choice(target_classes, size=n)
    logits = rng.normal(size=(n, num_classes)).astype(np.float32)
    if draw(st.booleans()):
        # push predictions onto a subset of classes, so some classes are never predicted
        favoured = draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes, unique=True))
        logits[:, favoured] += 3.0
    if draw(st.booleans()):
        # make some predictions right, so precision/recall are not all near zero
        right = rng.random(n) < 0.5
        logits[right, targets[right]] += 10.0
    return torch.from_numpy(logits), torch.from_numpy(targets.astype(np.int64)), num_classes


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(labelled_logits())
def test_confusion_matrix_matches_sklearn(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    logits, targets, num_classes = case
    preds = logits.argmax(1)
    ours = confusion_matrix(preds, targets, num_classes)
    theirs = skm.confusion_matrix(targets.numpy(), preds.numpy(), labels=list(range(num_classes)))
    assert ours.shape == (num_classes, num_classes)
    assert ours.dtype == torch.int64
    np.testing.assert_array_equal(ours.numpy(), theirs)


@SETTINGS
@given(labelled_logits())
def test_per_class_metrics_match_sklearn(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    logits, targets, num_classes = case
    preds = logits.argmax(1)
    per = per_class_metrics(confusion_matrix(preds, targets, num_classes))
    p, r, f, s = skm.precision_recall_fscore_support(
        targets.numpy(), preds.numpy(), labels=list(range(num_classes)), zero_division=0
    )
    np.testing.assert_allclose(per["precision"].numpy(), p, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(per["recall"].numpy(), r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(per["f1"].numpy(), f, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(per["support"].numpy(), s)


@SETTINGS
@given(labelled_logits())
def test_classification_report_matches_sklearn(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    logits, targets, num_classes = case
    classes = [f"c{i}" for i in range(num_classes)]
    y, yhat = targets.numpy(), logits.argmax(1).numpy()
    labels = list(range(num_classes))
    present = sorted(set(y.tolist()))
    report = classification_report(logits, targets, classes)

    assert report["count"] == len(y)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat), abs=1e-12)
    # balanced accuracy: mean recall over the classes that occur in the targets
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, yhat), abs=1e-9)
    # weighted F1 over all classes (absent classes weigh nothing)
    assert report["weighted_f1"] == pytest.approx(
        skm.f1_score(y, yhat, labels=labels, average="weighted", zero_division=0), abs=1e-9
    )
    # macro F1 over the classes that occur in the targets (a class nobody has cannot pull it down)
    assert report["macro_f1"] == pytest.approx(
        skm.f1_score(y, yhat, labels=present, average="macro", zero_division=0), abs=1e-9
    )
    probs = torch.softmax(logits.double(), 1).numpy()
    assert report["loss"] == pytest.approx(skm.log_loss(y, probs, labels=labels), rel=1e-5, abs=1e-6)
    if num_classes >= 5:
        expected = 1.0 if num_classes == 5 else skm.top_k_accuracy_score(y, logits.numpy(), k=5, labels=labels)
        assert report["top5_accuracy"] == pytest.approx(expected, abs=1e-6)
    else:
        assert "top5_accuracy" not in report

    p, r, f, s = skm.precision_recall_fscore_support(y, yhat, labels=labels, zero_division=0)
    assert list(report["per_class"]) == classes
    for i, name in enumerate(classes):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(p[i], abs=1e-6)
        assert row["recall"] == pytest.approx(r[i], abs=1e-6)
        assert row["f1"] == pytest.approx(f[i], abs=1e-6)
        assert row["support"] == s[i] and isinstance(row["support"], int)
    assert report["confusion_matrix"] == skm.confusion_matrix(y, yhat, labels=labels).tolist()
    assert report["top1_accuracy"] == report["accuracy"]
    for average, over in (("macro", present), ("weighted", labels)):
        for name, score in (("precision", skm.precision_score), ("recall", skm.recall_score)):
            expected = score(y, yhat, labels=over, average=average, zero_division=0)
            assert report[f"{average}_{name}"] == pytest.approx(expected, abs=1e-9), (average, name)


@SETTINGS
@given(labelled_logits(min_classes=3), st.data())
def test_topk_accuracy_matches_sklearn(case: tuple[torch.Tensor, torch.Tensor, int], data: st.DataObject) -> None:
    logits, targets, num_classes = case
    k = data.draw(st.integers(1, num_classes - 1))
    expected = skm.top_k_accuracy_score(targets.numpy(), logits.numpy(), k=k, labels=list(range(num_classes)))
    assert topk_accuracy(logits, targets, k) == pytest.approx(expected, abs=1e-6)


@SETTINGS
@given(labelled_logits())
def test_top1_is_accuracy_and_topk_of_all_classes_is_one(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    logits, targets, num_classes = case
    accuracy = (logits.argmax(1) == targets).double().mean().item()
    assert topk_accuracy(logits, targets, 1) == pytest.approx(accuracy, abs=1e-6)
    assert topk_accuracy(logits, targets, num_classes) == 1.0
    assert topk_accuracy(logits, targets, num_classes + 7) == 1.0  # k is capped at the class count


def test_hand_computed_confusion_matrix() -> None:
    # true:  0 0 0 1 1 2 2 2 2
    # pred:  0 1 0 1 2 2 2 0 2     class 3 never occurs
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 2])
    matrix = confusion_matrix(preds, targets, 4)
    assert matrix.tolist() == [
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [1, 0, 3, 0],
        [0, 0, 0, 0],
    ]
    per = per_class_metrics(matrix)
    # class 0: tp 2, predicted 3, support 3; class 1: tp 1, predicted 2, support 2; class 2: tp 3, predicted 4, support 4
    assert per["precision"].tolist() == pytest.approx([2 / 3, 1 / 2, 3 / 4, 0.0])
    assert per["recall"].tolist() == pytest.approx([2 / 3, 1 / 2, 3 / 4, 0.0])
    assert per["f1"].tolist() == pytest.approx([2 / 3, 1 / 2, 3 / 4, 0.0])
    assert per["support"].tolist() == [3, 2, 4, 0]


def test_hand_computed_report() -> None:
    # 3 classes; class 2 is in the targets but never predicted, class 1 is predicted but never a target
    targets = torch.tensor([0, 0, 2, 2])
    preds = torch.tensor([0, 1, 0, 1])
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5
    report = classification_report(logits, targets, ["a", "b", "c"])
    assert report["accuracy"] == 0.25
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 0, 0], [1, 1, 0]]
    # class a: precision 1/2, recall 1/2 -> f1 1/2; class c: 0
    assert report["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["macro_f1"] == pytest.approx(0.25)  # mean over a and c
    assert report["weighted_f1"] == pytest.approx(0.25)
    assert report["balanced_accuracy"] == pytest.approx(0.25)
    expected_loss = -math.log(math.exp(5) / (math.exp(5) + 2)) * 1 / 4 + -math.log(1 / (math.exp(5) + 2)) * 3 / 4
    assert report["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_report_is_json_ready_plain_values() -> None:
    import json

    logits = torch.randn(20, 6)
    targets = torch.arange(20) % 6
    report = classification_report(logits, targets, [str(i) for i in range(6)])
    json.dumps(report)  # plain floats, ints, lists and dicts only
    assert {"count", "accuracy", "top1_accuracy", "loss", "top5_accuracy", "macro_precision", "macro_recall",
            "macro_f1", "weighted_precision", "weighted_recall", "weighted_f1", "balanced_accuracy", "ece",
            "reliability", "per_class", "confusion_matrix"} <= set(report)


def test_counts_from_parts_add_up() -> None:
    """Matrices of disjoint parts sum to the matrix of the whole (what distributed evaluation relies on)."""
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 7, (200,), generator=gen)
    targets = torch.randint(0, 7, (200,), generator=gen)
    whole = confusion_matrix(preds, targets, 7)
    parts = confusion_matrix(preds[:77], targets[:77], 7) + confusion_matrix(preds[77:], targets[77:], 7)
    assert torch.equal(whole, parts)
    assert whole.sum() == 200


def test_empty_input() -> None:
    logits = torch.zeros(0, 4)
    targets = torch.zeros(0, dtype=torch.int64)
    assert confusion_matrix(logits.argmax(1), targets, 4).sum() == 0
    assert topk_accuracy(logits, targets, 2) == 0.0
    report = classification_report(logits, targets, ["a", "b", "c", "d"])
    assert report["count"] == 0
    assert report["accuracy"] == 0.0
    assert report["loss"] == 0.0
    assert report["macro_f1"] == 0.0


# --- calibration error, counts that add up ---------------------------------------------------------------------


def _numpy_ece(logits: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """An independent ECE: bins ((b-1)/bins, b/bins], found with a loop over the bins."""
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probs = shifted / shifted.sum(1, keepdims=True)
    confidence, preds = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence > low) & (confidence <= high) if b else (confidence <= high)
        if inside.any():
            total += inside.sum() * abs((preds[inside] == targets[inside]).mean() - confidence[inside].mean())
    return total / len(targets)


def test_ece_by_hand() -> None:
    # two classes, logits chosen so the confidences are exactly 0.9, 0.9, 0.6 and 0.6
    def logit(p: float) -> list[float]:
        return [math.log(p), math.log(1 - p)]

    logits = torch.tensor([logit(0.9), logit(0.9), logit(0.6), logit(0.6)], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 0])  # bin (0.867, 0.933]: 1 of 2 right; bin (0.533, 0.6]: 2 of 2 right
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.2 + 0.2
    assert ece(logits, targets) == pytest.approx(0.4, abs=1e-12)
    count, confidence_sum, correct = calibration_bins(logits, targets)
    assert count.sum() == 4 and count[13] == 2 and count[8] == 2  # 0.9 -> bin 13 (0.867, 0.933], 0.6 -> bin 8
    assert correct[13] == 1 and correct[8] == 2
    rows = reliability_table(count, confidence_sum, correct)
    assert rows[13]["confidence"] == pytest.approx(0.9) and rows[13]["accuracy"] == 0.5
    assert rows[0]["count"] == 0 and rows[0]["accuracy"] is None


def test_ece_bin_edges_belong_to_the_bin_below() -> None:
    # confidence exactly 0.6 = 9/15 is the top edge of bin 8, (8/15, 9/15]
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]], dtype=torch.float64)
    count, _, _ = calibration_bins(logits, torch.tensor([0]))
    assert count.nonzero().flatten().tolist() == [8]


def test_perfectly_confident_and_right_has_zero_ece() -> None:
    logits = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).double() * 100
    assert ece(logits, torch.arange(6) % 3) == pytest.approx(0.0, abs=1e-12)
    assert ece(logits, (torch.arange(6) + 1) % 3) == pytest.approx(1.0, abs=1e-12)  # sure and always wrong


@SETTINGS
@given(labelled_logits())
def test_ece_matches_an_independent_implementation(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    logits, targets, _ = case
    expected = _numpy_ece(logits.double().numpy(), targets.numpy())
    assert ece(logits, targets) == pytest.approx(expected, abs=1e-9)


@SETTINGS
@given(labelled_logits(), st.lists(st.integers(0, 80), max_size=4))
def test_counts_of_parts_sum_to_the_counts_of_the_whole(case: tuple[torch.Tensor, torch.Tensor, int],
                                                        cuts: list[int]) -> None:
    """What distributed evaluation does: each process counts its shard, the counts are summed (all-reduce)."""
    logits, targets, num_classes = case
    edges = sorted({0, len(targets), *(min(c, len(targets)) for c in cuts)})
    parts = [count_predictions(logits[a:b], targets[a:b]) for a, b in zip(edges, edges[1:])]
    summed = parts[0]
    for part in parts[1:]:
        summed = summed + part
    whole = count_predictions(logits, targets)
    for mine, theirs in zip(summed.tensors(), whole.tensors()):
        assert torch.allclose(mine.double(), theirs.double(), atol=1e-9), (mine, theirs)
    classes = [f"c{i}" for i in range(num_classes)]
    merged, direct = report_from_counts(summed, classes), classification_report(logits, targets, classes)
    assert merged["confusion_matrix"] == direct["confusion_matrix"]
    for key in ("accuracy", "loss", "ece", "macro_f1", "weighted_f1", "balanced_accuracy"):
        assert merged[key] == pytest.approx(direct[key], abs=1e-9), key


def test_counts_can_be_all_reduced_in_place() -> None:
    """tensors() hands out the fields themselves, so an in-place all-reduce updates the counts."""
    counts = count_predictions(torch.randn(10, 4), torch.arange(10) % 4)
    for tensor in counts.tensors():
        tensor.mul_(2)  # what all_reduce(SUM) does with two identical processes
    assert int(counts.confusion.sum()) == 20 and int(counts.bin_count.sum()) == 20
    assert isinstance(counts, MetricCounts) and len(counts.tensors()) == 6


def test_expected_calibration_error_of_no_examples_is_zero() -> None:
    empty = torch.zeros(15, dtype=torch.int64)
    assert expected_calibration_error(empty, empty.double(), empty) == 0.0


@SETTINGS
@given(labelled_logits())
def test_confusion_matrix_from_logits(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    logits, targets, num_classes = case
    assert torch.equal(confusion_matrix_from_logits(logits, targets),
                       confusion_matrix(logits.argmax(1), targets, num_classes))


def test_worst_mistakes_are_the_most_confident_among_the_wrong() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 1.0], [3.0, 0.0], [0.0, 9.0]])
    targets = torch.tensor([0, 0, 0, 1, 1])  # wrong: rows 1 (99.3% for the wrong class), 2 (73%), 3 (95%)
    assert worst_mistakes(logits, targets, 10).tolist() == [1, 3, 2]
    assert worst_mistakes(logits, targets, 2).tolist() == [1, 3]
    assert worst_mistakes(logits[:1], targets[:1], 3).tolist() == []


def test_worst_mistakes_rank_by_the_wrong_class_probability_not_the_loss() -> None:
    """Row 0 splits its belief between two wrong classes (52% for class 2, loss 5.75); row 1 is 95% sure of a wrong
    class (loss 3.05): row 1 is the more confident mistake."""
    logits = torch.tensor([[0.0, 5.0, 5.1], [2.0, 5.0, 0.0]])
    assert worst_mistakes(logits, torch.tensor([0, 0]), 2).tolist() == [1, 0]
