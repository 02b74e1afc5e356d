"""--keep-hardest: a proxy net's hardest images of each class, chosen the same way every time, saved with the run
and read back on resume (a missing or hand-edited selection.json is one line); the run resumes bit-exactly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import assert_same_run, run_stopped_at, snapshots, train_run  # noqa: F401 (a fixture)
from torch import nn

from conftest import REPO, make_photo_folder
from imgrec import workflows
from imgrec.config import RunConfig, check_settings
from imgrec.data.info import ArraySplit
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import BatchTransform
from imgrec.engine.selection import SELECTION_FILE, Selection, choose_hardest, proxy_input, read_selection
from imgrec.engine.state import Progress, load_state
from imgrec.engine.system import Compute
from imgrec.errors import ImgrecError, UsageError

CPU = Compute(torch.device("cpu"), None, torch.contiguous_format, 1)


def two_classes_with_wrong_labels(n: int = 200, wrong: int = 10) -> tuple[ArraySplit, torch.Tensor]:
    """Dark images are class 0 and bright ones class 1, except `wrong` of each class that carry the other label:
    the images any proxy finds hardest. Returns the split and the indices of the wrongly labelled images."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    bright = labels.clone()
    mislabelled = torch.cat([(labels == k).nonzero().flatten()[:wrong] for k in (0, 1)])
    bright[mislabelled] = 1 - bright[mislabelled]
    images = (torch.rand(n, 1, 8, 8, generator=g) * 60 + bright.view(-1, 1, 1, 1) * 150).to(torch.uint8)
    return ArraySplit(images, labels), mislabelled.sort().values


def choose(split: ArraySplit, fraction: float, seed: int = 0) -> Selection:
    plain = BatchTransform([0.5], [0.25])
    def proxy() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))

    return choose_hardest(proxy, make_loader(split, 32, plain, train=True, seed=seed),
                          make_loader(split, 64, plain, train=False), split.labels, fraction, CPU, seed)


def test_the_hardest_images_of_each_class_are_kept() -> None:
    split, mislabelled = two_classes_with_wrong_labels()
    selection = choose(split, 0.25)
    kept = selection.kept
    assert torch.equal(kept, kept.sort().values) and len(kept.unique()) == len(kept) == 50
    assert [int((split.labels[kept] == k).sum()) for k in (0, 1)] == [25, 25]  # the same share of each class
    assert set(mislabelled.tolist()) <= set(kept.tolist())  # every wrongly labelled image is among the hardest
    assert selection.total == 200 and selection.seconds > 0


def test_the_choice_is_the_same_every_time_and_leaves_the_runs_generator_alone() -> None:
    split, _ = two_classes_with_wrong_labels()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = choose(split, 0.5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(choose(split, 0.5).kept, first.kept)


def test_a_class_keeps_at_least_one_image() -> None:
    split, _ = two_classes_with_wrong_labels(n=6, wrong=0)
    assert len(choose(split, 0.01).kept) == 2


@pytest.mark.parametrize("size, expected", [((28, 28), (28, 28)), ((32, 32), (32, 32)), ((224, 224), (32, 32)),
                                            ((375, 500), (24, 32)), ((1, 4000), (1, 32)), ((4000, 1), (32, 1))])
def test_the_proxy_sees_large_images_pooled_to_32_pixels_a_side(size: tuple[int, int],
                                                                expected: tuple[int, int]) -> None:
    assert proxy_input(size) == expected


def test_a_saved_selection_reads_back_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    split, _ = two_classes_with_wrong_labels()
    selection = choose(split, 0.3)
    path = tmp_path / SELECTION_FILE
    path.write_text(json.dumps(selection.to_dict()))
    again = read_selection(path, 200, 0.3)
    assert torch.equal(again.kept, selection.kept)
    record = selection.to_dict()
    damaged = [{**record, "train_images": 199}, {**record, "kept": 59}, {**record, "keep_hardest": 0.5},
               {**record, "kept_images": "not base64!"}, {**record, "kept_images": "AAAA"}, [1, 2], "{"]
    for bad in damaged:
        path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(ImgrecError, match="is not the selection this run saved"):
            read_selection(path, 200, 0.3)
    path.write_text(json.dumps(record))
    with pytest.raises(ImgrecError, match="it is for 200 training images, this split has 150"):
        read_selection(path, 150, 0.3)
    path.unlink()
    with pytest.raises(ImgrecError, match="is missing"):
        read_selection(path, 200, 0.3)


def test_a_run_keeping_the_hardest_trains_on_them_and_resumes_exactly(tmp_path: Path,
                                                                      snapshots: list[Path]) -> None:  # noqa: F811
    """Photos of camera sizes (pooled for the proxy): the run trains on 60% of each class, writes selection.json,
    and a run resumed mid-epoch and at an epoch end ends bit-exactly like one never stopped."""
    photos = make_photo_folder(tmp_path / "photos", per_class=10, splits=(), sizes=((120, 90), (90, 120)))
    reference = train_run(photos, tmp_path / "runs", "reference", keep_hardest=0.6, image_size=48)
    record = json.loads((reference / SELECTION_FILE).read_text())
    assert 0.5 * record["train_images"] < record["kept"] < 0.7 * record["train_images"]
    assert load_state(snapshots[-1])["train_images"] == record["kept"]  # what the run trained on
    assert "keep_hardest: 0.6" in (reference / "config.yaml").read_text()
    saved = list(snapshots)
    at = {(p.epoch, p.step): s for s, p in ((s, Progress.from_dict(load_state(s)["progress"])) for s in saved)}
    for position in ((1, 1), (2, 0)):
        run = run_stopped_at(reference, at[position], tmp_path / f"resumed-{position[0]}-{position[1]}")
        workflows.resume(run, {})
        assert_same_run(run, reference)


@pytest.mark.parametrize("name, fitted", [("mlp", False), ("lenet", False), ("airnet-small", True)])
def test_the_proxy_is_the_named_model_on_pooled_images(tmp_path: Path, name: str, fitted: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """--proxy-model: the registry's model for images pooled to at most 32 pixels a side; a whitening stem is
    fitted to those pooled images (not left random), and the proxy takes the split's full-size batches."""
    from imgrec.data.datasets import DataOptions, load_data
    from imgrec.models.registry import build_model

    photos = make_photo_folder(tmp_path / "photos", per_class=6, splits=(), sizes=((120, 90), (90, 120)))
    bundle = load_data(str(photos), DataOptions(str(tmp_path), str(tmp_path / "cache"), image_size=64, workers=0))
    plain = BatchTransform([0.5] * 3, [0.25] * 3, size=(64, 64), channels=3)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="imgrec.workflows"):
        proxy = workflows._proxy_model(RunConfig(proxy_model=name, seed=0), bundle, plain)
    assert ("keep-hardest proxy: first layer fitted" in caplog.text) == fitted
    pool, model = proxy
    assert isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == (32, 32)
    torch.manual_seed(0)
    fresh = build_model(name, bundle.info.num_classes, 3, (32, 32))
    assert type(model) is type(fresh)
    first = next(model.parameters())
    assert torch.equal(first, next(fresh.parameters())) != fitted  # the whitening stem: fitted, not random
    images, _ = next(iter(make_loader(bundle.train, 4, plain, train=False)))
    assert images.shape[2:] == (64, 64) and proxy.eval()(images).shape == (4, bundle.info.num_classes)


def test_a_run_with_a_conv_proxy_keeps_its_choice_and_a_misspelt_proxy_is_one_line(tmp_path: Path) -> None:
    """The CLI: --proxy-model lenet chooses the images and is saved in config.yaml; a misspelt name stops the run
    with one line naming the models, exit 2."""
    photos = make_photo_folder(tmp_path / "photos", per_class=8, splits=())
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    common = ["train", "-d", str(photos), "-m", "lenet", "-e", "1", "--keep-hardest", "0.5", "--project",
              str(tmp_path / "runs"), "--threads", "1", "--workers", "0", "--device", "cpu", "--batch-size", "8"]

    def imgrec(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imgrec", *common, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    done = imgrec("--proxy-model", "lenet", "--name", "r")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "r"
    assert "proxy_model: lenet" in (run / "config.yaml").read_text()
    record = json.loads((run / SELECTION_FILE).read_text())
    assert 0.4 * record["train_images"] <= record["kept"] <= 0.6 * record["train_images"]
    done = imgrec("--proxy-model", "lenett", "--name", "typo")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("imgrec train: error: unknown model 'lenett': use one of")


@pytest.mark.parametrize("bad", [0, -0.5, 1.5])
def test_keep_hardest_is_refused_outside_its_range(bad: float) -> None:
    with pytest.raises(UsageError, match="keep.hardest"):
        check_settings(RunConfig(keep_hardest=bad))


def test_resuming_without_its_selection_or_with_a_hand_edited_one_is_one_line(tmp_path: Path) -> None:
    """The CLI: a run whose selection.json was deleted or edited stops its resume with one line and exit 1."""
    photos = make_photo_folder(tmp_path / "photos", per_class=8, splits=())
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    common = ["--threads", "1", "--workers", "0", "--device", "cpu", "--batch-size", "8"]

    def imgrec(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    done = imgrec("train", "-d", str(photos), "-m", "lenet", "-e", "1", "--keep-hardest", "0.5", "--project",
                  str(tmp_path / "runs"), "--name", "r", *common)
    assert done.returncode == 0, done.stderr
    assert "keep-hardest: a proxy trained 2 epochs" in done.stderr + done.stdout
    run = tmp_path / "runs" / "r"
    record = json.loads((run / SELECTION_FILE).read_text())
    (run / SELECTION_FILE).write_text(json.dumps({**record, "kept": record["kept"] + 1}))
    done = imgrec("train", "--resume", str(run), "-e", "2", *common)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("(its counts do not match its images)"), done.stderr
    (run / SELECTION_FILE).unlink()
    done = imgrec("train", "--resume", str(run), "-e", "2", *common)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "selection.json is missing" in done.stderr.strip().splitlines()[-1], done.stderr
