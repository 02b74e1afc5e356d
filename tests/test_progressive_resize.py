"""--progressive-resize: the first epochs train on scaled-down images, the rest (and always the last epoch) at full
size; validation, calibration and test always at full size; models that take only their full size are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import imgrec
from conftest import error_line, make_image_folder, run_main
from imgrec.config import RunConfig
from imgrec.engine.trainer import downscale, resized_side, scaled_size
from imgrec.errors import UsageError


class Recorder(nn.Module):
    """A size-agnostic net (global max-pool) that notes the size and mode of every batch it sees."""

    seen: list[tuple[bool, int, tuple[int, int]]] = []  # (training, batch, (H, W)) in order

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Recorder.seen.append((self.training, len(x), (x.shape[-2], x.shape[-1])))
        return self.head(self.conv(x).amax((2, 3)))


def test_each_epoch_trains_at_its_size_and_evaluation_stays_at_full_size(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "photos", size=16)  # 36 images: 32 train, 4 val -> 4 steps of 8
    Recorder.seen = []
    run = imgrec.train(str(folder), model=Recorder, epochs=4, batch_size=8, val_fraction=0.1, threads=1, workers=0,
                       progressive_resize=[8, 12], augment="translate,flip", project=str(tmp_path / "runs"),
                       verbose=False)
    first_step = next(i for i, (training, _, _) in enumerate(Recorder.seen) if training)
    steps = [size for training, _, size in Recorder.seen[first_step:] if training][:16]
    assert steps == [(8, 8)] * 4 + [(12, 12)] * 4 + [(16, 16)] * 8
    # before training, the check of the model: two blank images at each size; after it, everything at 16x16
    probes = [(batch, size) for training, batch, size in Recorder.seen[:first_step] if size != (16, 16)]
    assert probes == [(2, (8, 8)), (2, (12, 12))]
    evaluated = [size for training, _, size in Recorder.seen[first_step:] if not training]
    assert evaluated and set(evaluated) == {(16, 16)}
    assert run.summary["epochs"] == 4 and "progressive_resize:\n- 8\n- 12\n" in (run.dir / "config.yaml").read_text()
    # the FLOPs done per second count epochs 1 and 2 at a quarter and 9/16 of the full size's work
    summary, share = run.summary, (0.25 + 0.5625 + 1 + 1) / 4
    done = summary["train_gflop_per_image"] * summary["images_per_second"] * share
    assert summary["train_gflops_per_second"] == pytest.approx(done, rel=0.05, abs=0.006)


def test_the_last_epoch_is_always_at_full_size() -> None:
    cfg = RunConfig(progressive_resize=[20, 24, 28], time_budget="1m", epochs=3)  # a budget may plan fewer epochs
    assert [resized_side(cfg, epoch, 3) for epoch in (1, 2, 3)] == [20, 24, None]
    assert [resized_side(cfg, epoch, 5) for epoch in (1, 2, 3, 4, 5)] == [20, 24, 28, None, None]
    assert scaled_size((32, 48), 24) == (24, 36)  # the shorter side, the other alike


def test_features_computed_once_cannot_be_scaled_down() -> None:
    with pytest.raises(UsageError, match="--cache-features trains on features computed once from full-size images: "
                                         "drop --progressive-resize"):
        RunConfig(model="resnet18", pretrained=True, freeze=True, cache_features=True, progressive_resize=[16])


def test_downscaling_is_antialiased_and_keeps_the_layout() -> None:
    stripes = torch.zeros(2, 3, 32, 32)
    stripes[..., ::2] = 1.0  # one-pixel stripes: an unfiltered shrink would keep some columns and drop others
    small = downscale(stripes.contiguous(memory_format=torch.channels_last), 12)
    assert small.shape == (2, 3, 12, 12) and small.is_contiguous(memory_format=torch.channels_last)
    inner = small[..., 1:-1]  # each pixel averages the 2.7 columns it covers: grey (plain bilinear: 0.17 to 0.83)
    assert inner.min() > 0.45 and inner.max() < 0.55
    assert downscale(stripes, None) is stripes and downscale(stripes, 32) is stripes


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "airnet-small", "--progressive-resize", "16"], "--progressive-resize 16: the model's input is "
                                                                "16x16; give sizes below 16"),
    (["--model", "airnet-small", "--progressive-resize", "3"], "--progressive-resize takes sizes of at least 4 pixels, "
                                                               "or 0 alone (off); got 3"),
    (["--model", "airnet-small", "--progressive-resize", "0", "8"], "or 0 alone (off); got 0 8"),
    (["--model", "airnet-small", "--progressive-resize", "8", "8", "--epochs", "2"],
     "--progressive-resize gives 2 epoch(s) at smaller sizes but the run has 2: leave at least the last epoch"),
    (["--model", "airnet-small", "--progressive-resize", "x"], "argument --progressive-resize: invalid int value"),
    (["--model", "mlp", "--progressive-resize", "8"], "model 'mlp' built for 16x16 images does not take 8x8 ones"),
    (["--model", "airnet-small", "--progressive-resize", "12", "8"],  # its third max-pool would leave nothing at 8
     "model 'airnet-small' built for 16x16 images does not take 8x8 ones (Given input size: (128x1x1)"),
])
def test_bad_sizes_are_one_usage_error(argv: list[str], fragment: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "photos", size=16, per_class=4)
    code, _, err = run_main(["train", "--data", str(folder), "--project", str(tmp_path / "runs"), "--threads", "1",
                             "--device", "cpu", "--epochs", "3", *argv], capsys)
    assert code == 2 and fragment in error_line(err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_command_refuses_a_model_of_one_size_in_one_line(tmp_path: Path) -> None:
    """LeNet flattens into a Linear layer sized for its input: refused before any run folder is made; an earlier run
    in the project is left as it was."""
    folder = make_image_folder(tmp_path / "photos", size=16, per_class=4)
    earlier = tmp_path / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("model: lenet\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "imgrec", "train", "--data", str(folder), "--model", "lenet",
                           "--progressive-resize", "8", "--epochs", "2", "--threads", "1", "--project",
                           str(tmp_path / "runs"), "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("imgrec train: error: --progressive-resize 8: model 'lenet' built for 16x16 images "
                                  "does not take 8x8 ones (mat1 and mat2 shapes cannot be multiplied")
    assert "a model with global pooling (airnet, airnet-small, resnet8, speednet)" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["earlier"]
    assert (earlier / "config.yaml").read_text() == "model: lenet\n"


def test_a_scaled_down_epoch_is_never_the_best_and_early_stopping_waits_for_full_size() -> None:
    """Validated at full size, a net trained on smaller images reads low (its BatchNorm statistics are the small
    images'): such an epoch neither becomes best.pt nor counts toward --patience."""
    from imgrec.engine.state import Progress

    progress = Progress()
    row = {"val_acc": 0.9}
    assert not progress.end_epoch(row, 0.9, candidate=False) and not progress.end_epoch(row, 0.5, candidate=False)
    assert progress.stale == 0 and progress.best_epoch == 0 and not progress.finished(5, patience=1)
    assert progress.end_epoch({"val_acc": 0.6}, 0.6) and progress.best_epoch == 3
    assert not progress.end_epoch({"val_acc": 0.55}, 0.55) and progress.finished(5, patience=1)
