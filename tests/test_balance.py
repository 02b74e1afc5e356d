"""--balance: the sampler draws every class equally each epoch (seeded, resumable, sharded); class weights
reach the training loss; a run on an imbalanced folder trains with either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ListLoader, make_image_folder
from imgrec.config import RunConfig
from imgrec.data.info import ArraySplit
from imgrec.data.loaders import TensorLoader, make_loader
from imgrec.data.transforms import BatchTransform
from imgrec.engine.trainer import fit, inverse_frequency_weights
from imgrec.errors import UsageError

PLAIN = BatchTransform([0.5], [0.25])
COUNTS = (60, 24, 10, 3)  # 97 images, a 20x imbalance


def imbalanced_split() -> ArraySplit:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return ArraySplit(images, labels)  # image i's pixels are i: the order is visible in the batches


def epoch_labels(loader: TensorLoader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader])


def epoch_images(loader: TensorLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist()


def test_sampler_draws_every_class_equally_each_epoch() -> None:
    split = imbalanced_split()
    loader = make_loader(split, 10, PLAIN, train=True, seed=3, balanced=True)
    plain = make_loader(split, 10, PLAIN, train=True, seed=3)
    assert len(loader) == len(plain)  # as many steps per epoch as the plain order
    for epoch in (1, 2):
        counts = torch.bincount(epoch_labels(loader, epoch), minlength=len(COUNTS))
        assert counts.sum() == len(split) and counts.max() - counts.min() <= 1
    assert torch.bincount(epoch_labels(plain, 1)).tolist() == list(COUNTS)
    # the largest class is cut, not repeated; the smallest is repeated with all its images
    loader.set_epoch(1)
    drawn = torch.cat([y for _, y in loader])
    images = epoch_images(loader, 1)
    largest = [i for i, y in zip(images, drawn.tolist()) if y == 0]
    smallest = {i for i, y in zip(images, drawn.tolist()) if y == 3}
    assert len(set(largest)) == len(largest) and len(smallest) == COUNTS[3]


def test_sampler_is_seeded_and_changes_by_epoch() -> None:
    split = imbalanced_split()
    a = make_loader(split, 10, PLAIN, train=True, seed=5, balanced=True)
    b = make_loader(split, 10, PLAIN, train=True, seed=5, balanced=True)
    c = make_loader(split, 10, PLAIN, train=True, seed=6, balanced=True)
    assert epoch_images(a, 1) == epoch_images(b, 1)
    assert epoch_images(a, 1) != epoch_images(c, 1)
    assert epoch_images(a, 1) != epoch_images(a, 2)


def test_sampler_resumes_mid_epoch_with_the_same_order() -> None:
    split = imbalanced_split()
    whole = epoch_images(make_loader(split, 10, PLAIN, train=True, seed=1, balanced=True), 2)
    first = make_loader(split, 10, PLAIN, train=True, seed=1, balanced=True)
    first.set_epoch(2)
    seen = []
    for x, _ in first:
        seen += x[:, 0, 0, 0].tolist()
        if len(seen) == 30:
            break
    state = first.state_dict()
    again = make_loader(split, 10, PLAIN, train=True, seed=1, balanced=True)
    again.load_state_dict(state)
    rest = torch.cat([x[:, 0, 0, 0] for x, _ in again]).tolist()
    assert seen + rest == whole


def test_sampler_shards_the_same_order_across_processes() -> None:
    split = imbalanced_split()
    whole = epoch_images(make_loader(split, 10, PLAIN, train=True, seed=2, balanced=True), 1)
    parts = [epoch_images(make_loader(split, 5, PLAIN, train=True, seed=2, balanced=True, shard=(r, 2)), 1)
             for r in range(2)]
    padded = whole + whole[:1]  # 97 images padded by the first to 98: each process the same number of steps
    assert parts[0] == padded[0::2] and parts[1] == padded[1::2]


def test_inverse_frequency_weights() -> None:
    labels = torch.tensor([0] * 6 + [1] * 3 + [3] * 1)
    weights = inverse_frequency_weights(labels, 4)
    # 10 images, 3 classes present: 10 / (3 x n_c); a class without images weighs nothing
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 0.0, 10 / 3])
    assert float((weights[labels]).sum()) == pytest.approx(len(labels))  # on average an image weighs 1


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_class_weights_are_in_the_training_loss(tmp_path: Path, smoothing: float) -> None:
    """One plain SGD step at lr 1: the weights move by exactly the gradient of the weighted, smoothed loss."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 2, 2), torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    start = [p.detach().clone() for p in model.parameters()]
    weights = inverse_frequency_weights(y, 3)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    reference.load_state_dict(model.state_dict())
    nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing)(reference(x), y).backward()
    unweighted = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    unweighted.load_state_dict(model.state_dict())
    nn.CrossEntropyLoss(label_smoothing=smoothing)(unweighted(x), y).backward()
    cfg = RunConfig(model="mlp", epochs=1, lr=1.0, optimizer="sgd", momentum=0.0, label_smoothing=smoothing,
                    device="cpu", threads=1, precision="fp32", channels_last=False, balance="weights")
    meta = {"kind": "imgrec-weights", "model": {"name": "test"}, "classes": ["a", "b", "c"]}
    fit(model, ListLoader([(x, y)]), None, cfg, tmp_path, meta, class_weights=weights)
    for p, p0, ref, plain in zip(model.parameters(), start, reference.parameters(), unweighted.parameters()):
        torch.testing.assert_close(p.detach(), p0 - ref.grad)
        assert not torch.allclose(p.detach(), p0 - plain.grad)


def test_the_report_leads_with_balanced_metrics_on_an_imbalanced_split() -> None:
    from imgrec.evaluation.html import _cards
    from imgrec.evaluation.metrics import classification_report

    logits = torch.eye(3)[torch.tensor([0] * 9 + [1, 2, 0])]  # 9 a's right, b and c right, one c called a
    balanced = classification_report(logits, torch.tensor([0] * 9 + [1, 2, 2]), ["a", "b", "c"])
    assert balanced["imbalanced"] and balanced["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    even = classification_report(torch.eye(3)[torch.arange(3).repeat(3)], torch.arange(3).repeat(3), ["a", "b", "c"])
    assert not even["imbalanced"]
    html = _cards({**balanced, "split": "test", "calibration": {}}, None)
    assert html.index("balanced accuracy") < html.index(">accuracy<") and "test split is imbalanced" in html
    html = _cards({**even, "split": "test", "calibration": {}}, None)
    assert html.index(">accuracy<") < html.index("balanced accuracy") and "imbalanced" not in html


def test_balance_is_a_checked_setting() -> None:
    assert RunConfig().balance == "none"
    with pytest.raises(UsageError, match="--balance must be one of none, weights, sampler"):
        RunConfig(balance="oversample")


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_cli_trains_an_imbalanced_folder(tmp_path: Path, balance: str) -> None:
    root = tmp_path / "photos"
    make_image_folder(root, classes=("cat",), per_class=24, size=12)
    make_image_folder(root, classes=("cat", "dog"), per_class=4, size=12)  # dog: 4 images; cat keeps 24
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "imgrec", "train", "--data", str(root), "--model", "mlp",
                           "--epochs", "1", "--batch-size", "8", "--balance", balance, "--project",
                           str(tmp_path / "runs"), "--workers", "0", "--threads", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    config = (tmp_path / "runs" / "photos-mlp" / "config.yaml").read_text()
    assert f"balance: {balance}" in config
    if balance == "weights":
        assert "class weights in the loss" in done.stderr
    # the test split (about 5 cats, 1 dog) is imbalanced: the headline adds balanced accuracy and macro-F1
    assert "balanced accuracy:" in done.stdout and "macro-F1" in done.stdout
    summary = json.loads((tmp_path / "runs" / "photos-mlp" / "summary.json").read_text())
    assert summary["test_imbalanced"] is True and 0 <= summary["test_balanced_accuracy"] <= 1
