"""The learning-rate range test: it finds the best rate of a problem whose best rate is known, leaves the model
and the random generators alone, and stops when the loss diverges; `lr-find` and `train --lr find` use it."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from imgrec.config import RunConfig
from imgrec.data.info import ArraySplit
from imgrec.data.loaders import TensorLoader
from imgrec.engine.lr_finder import centred_mean, range_test
from imgrec.errors import UsageError

FEATURES, CLASSES, IMAGES = 16, 4, 512
GRID = [2.0**k for k in range(-12, 8)]


def unchanged(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return x


def problem(scale: float) -> ArraySplit:
    """Softmax regression on Gaussian features times scale, labels of a linear teacher with 30% of them random
    (so the loss has a finite minimum). Plain gradient descent on the whole set (one batch a step): its best
    rate falls as 1 / scale^2, so two scales a factor 10 apart have best rates about 100 times apart."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(IMAGES, 1, 1, FEATURES, generator=g)
    y = (x.flatten(1) @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(1)
    noisy = torch.rand(IMAGES, generator=g) < 0.3
    y[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=g)
    return ArraySplit(x * scale, y)


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, CLASSES))


def sgd() -> RunConfig:
    return RunConfig(optimizer="sgd", momentum=0.0, device="cpu", channels_last=False, precision="fp32")


@functools.cache
def grid_best(scale: float, steps: int = 20) -> float:
    """The known best rate: the one of GRID (factors of 2) whose short run ends with the lowest loss."""
    split = problem(scale)
    final = {}
    for lr in GRID:
        model = linear_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(split.images), split.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            final[lr] = float(nn.functional.cross_entropy(model(split.images), split.labels))
    finite = {lr: v for lr, v in final.items() if v == v}
    return min(finite, key=finite.__getitem__)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_the_suggestion_is_within_a_factor_of_3_of_the_known_best_rate(scale: float) -> None:
    split = problem(scale)
    best = grid_best(scale)
    found = range_test(linear_model(), TensorLoader(split, IMAGES, unchanged, shuffle=True), sgd(), steps=200,
                       start_lr=1e-5, end_lr=1e3)
    assert found.diverged and len(found.lrs) < 200
    assert best / 3 <= found.suggestion <= best * 3, (found.suggestion, best)


def test_the_best_rates_of_the_two_scales_differ() -> None:
    """What makes the test above meaningful: a fixed guess cannot pass at both scales."""
    assert grid_best(1.0) / grid_best(10.0) >= 30


def test_the_model_and_the_random_generators_are_left_alone() -> None:
    split = problem(1.0)
    model = linear_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    range_test(model, TensorLoader(split, 64, unchanged, shuffle=True), sgd(), steps=30)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_centred_mean_has_no_lag() -> None:
    assert centred_mean([0, 0, 3, 0, 0], 1) == [0, 1, 1, 1, 0]
    assert centred_mean([1.0, 2.0, 3.0, 4.0], 5) == [2.5] * 4


def test_lr_accepts_find_or_a_number() -> None:
    assert RunConfig(lr="find").lr == "find" and RunConfig(lr="FIND").lr == "find"
    assert RunConfig(lr="1e-3").lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string
    for bad in ("fast", -1, 0, True):
        with pytest.raises(UsageError, match="--lr"):
            RunConfig(lr=bad)


def _imgrec(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    return subprocess.run([sys.executable, "-m", "imgrec", *args], capture_output=True, text=True, timeout=180,
                          env=env, cwd=cwd)


def test_lr_find_command_and_train_with_lr_find(tmp_path: Path) -> None:
    common = ["--data", "digits", "--model", "mlp", "--threads", "1", "--workers", "0", "--device", "cpu"]
    done = _imgrec(["lr-find", *common, "--steps", "60", "--out", "figs/lr.png"], tmp_path)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith("suggested --lr ") and (tmp_path / "figs" / "lr.png").stat().st_size > 1000
    suggestion = float(line.split()[2])
    done = _imgrec(["train", *common, "--lr", "find", "--epochs", "1", "--project", "runs"], tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "digits-mlp"
    recorded = yaml.safe_load((run / "config.yaml").read_text())["lr"]
    assert isinstance(recorded, float) and (run / "lr_find.png").is_file()
    assert f"suggested --lr {recorded:.3g}" in done.stderr
    assert 1e-5 < suggestion < 1 and 1e-5 < recorded < 1
    bad = _imgrec(["lr-find", *common, "--lr", "fast"], tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_python_lr_find(tmp_path: Path) -> None:
    import numpy as np

    import imgrec

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = (rng.random((120, 8, 8)) * 60 + y[:, None, None] * 60).astype(np.uint8)  # brightness tells the class
    outcome = imgrec.lr_find((x, y), "mlp", steps=40, out=tmp_path / "lr.png", threads=1, device="cpu",
                             verbose=False)
    assert 1e-7 < outcome.suggestion < 10 and outcome.plot.stat().st_size > 1000
    assert len(outcome.result.lrs) <= 40 and outcome.suggestion == outcome.result.suggestion
    with pytest.raises(TypeError, match="lrr"):
        imgrec.lr_find((x, y), "mlp", lrr=0.1)


def test_the_range_test_trains_on_the_runs_images_mixed_as_the_run_mixes_them(monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path) -> None:
    """lr-find with --mixup sees mixed batches (soft targets), and with --keep-hardest only the kept images, as
    the run would; without them, plain labels and every training image."""
    import numpy as np

    import imgrec
    from imgrec import workflows

    seen: list[tuple[int, int]] = []
    real = workflows.range_test

    def spy(model: Any, loader: Any, cfg: Any, **kwargs: Any) -> Any:
        batches = list(loader)
        seen.append((sum(len(y) for _, y in batches), batches[0][1].ndim))  # (images an epoch, target dims)
        return real(model, loader, cfg, **kwargs)

    monkeypatch.setattr(workflows, "range_test", spy)
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = (rng.random((200, 8, 8)) * 60 + y[:, None, None] * 90).astype(np.uint8)
    common = dict(steps=10, threads=1, device="cpu", verbose=False, val_fraction=0.1, batch_size=20)
    imgrec.lr_find((x, y), "mlp", out=tmp_path / "a.png", **common)
    imgrec.lr_find((x, y), "mlp", out=tmp_path / "b.png", mixup=0.4, keep_hardest=0.5, **common)
    (plain_images, plain_dims), (kept_images, mixed_dims) = seen
    assert plain_dims == 1 and mixed_dims == 2
    assert kept_images == plain_images // 2
