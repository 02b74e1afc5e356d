"""Weights files: atomic saves, weights-only loads (no code ever runs), clear errors for damaged or foreign files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from imgrec.config import RunConfig
from imgrec.engine import checkpoint
from imgrec.engine.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_model_state,
    load_weights_file,
    resolve_weights,
    run_dir_of,
    save_atomic,
)
from imgrec.errors import ImgrecError
from imgrec.models.registry import build_model
from imgrec.workflows import train

WEIGHTS_KEYS = {"format_version", "kind", "model", "state_dict", "classes", "channels", "image_size", "mean", "std",
                "input_channels", "input_size", "data", "config", "epoch", "metrics", "params", "versions", "git_commit",
                "temperature"}  # fitted on the validation split once training ends
# added after training for prediction (inference.calibrate)
PREDICTION_KEYS = {"ood", "background", "object_extent", "object_centred"}


def train_run(data: Path, project: Path, **overrides: Any) -> Path:
    """A real, short training run on a tiny image folder; returns the run folder."""
    values: dict[str, Any] = dict(data=str(data), model="mlp", epochs=2, batch_size=8, project=str(project),
                                  threads=1, workers=0, lr=3e-3, device="cpu")
    values.update(overrides)
    return train(RunConfig(**values)).run_dir


@pytest.fixture
def run_dir(image_folder: Path, tmp_path: Path) -> Path:
    return train_run(image_folder, tmp_path / "runs")


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality with bit-exact tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


def _plain(value: Any) -> bool:
    """Only values the weights-only unpickler allows without extra globals."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_weights_file_of_a_real_run_loads_weights_only(run_dir: Path, image_folder: Path) -> None:
    for name in ("best.pt", "last.pt"):
        path = run_dir / "weights" / name
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == WEIGHTS_KEYS | PREDICTION_KEYS
        assert _plain(raw)
        assert raw["format_version"] == FORMAT_VERSION
        assert raw["temperature"] is None  # a few validation images fit none (a fitted one: test_reporting)
        assert raw["kind"] == "imgrec-weights"
        assert raw["model"] == {"name": "mlp", "num_classes": 3, "in_channels": 3, "image_size": [16, 16]}
        assert raw["classes"] == ["cat", "dog", "fox"]
        assert raw["channels"] == 3 and raw["image_size"] == [16, 16]
        assert len(raw["mean"]) == 3 and len(raw["std"]) == 3 and all(s > 0 for s in raw["std"])
        assert raw["data"] == str(image_folder)
        assert RunConfig.from_dict(raw["config"]).model == "mlp"
        assert raw["epoch"] in (1, 2)
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(raw["metrics"])
        assert raw["params"] == sum(v.numel() for k, v in raw["state_dict"].items())
        assert set(raw["versions"]) >= {"imgrec", "torch", "torchvision", "python"}
        assert all(type(v) is str for v in raw["versions"].values())
        for tensor in raw["state_dict"].values():
            assert tensor.device.type == "cpu" and tensor.is_contiguous() and torch.isfinite(tensor).all()
        # and through imgrec's own loader
        assert_same(load_weights_file(path), raw)
    assert torch.load(run_dir / "weights" / "last.pt", weights_only=True)["epoch"] == 2


def test_save_atomic_round_trip(run_dir: Path, tmp_path: Path) -> None:
    ckpt = load_weights_file(run_dir / "weights" / "best.pt")
    target = tmp_path / "copies" / "nested" / "copy.pt"  # missing folders are made
    save_atomic(ckpt, target)
    again = load_checkpoint(target)
    assert_same(again, ckpt)
    # every key survives a second round trip too, and the model rebuilds from it
    save_atomic(again, target)
    assert_same(load_weights_file(target), ckpt)
    spec = ckpt["model"]
    model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"])
    load_model_state(model, again["state_dict"], target)
    assert not [p for p in target.parent.iterdir() if p.name != "copy.pt"]  # no temp files left


def test_save_atomic_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    save_atomic({"a": torch.zeros(2)}, path)
    save_atomic({"a": torch.ones(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  error: BaseException) -> None:
    path = tmp_path / "weights" / "best.pt"
    previous = {"state_dict": {"w": torch.arange(10.0)}, "epoch": 1}
    save_atomic(previous, path)
    real_save = torch.save

    def broken_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        # write a real-looking first half, then fail the way a full disk or Ctrl-C would
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    # a full disk is one line naming the file (and what it needed); Ctrl-C goes on as it is
    expected = ImgrecError if isinstance(error, OSError) else type(error)
    with pytest.raises(expected, match=rf"^cannot write {path}: no space left on device \(it needs about 40 bytes\)$"
                       if expected is ImgrecError else None):
        save_atomic({"state_dict": {"w": torch.zeros(10)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert_same(load_checkpoint(path), previous)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]


class _Evil:
    """Unpickling this creates the marker file: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _write_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _write_pickle(obj: Any, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _write_pickle_new(obj: Any, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", [_write_torch, _write_pickle, _write_pickle_new])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, writer: Any) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights" / "best.pt"
    path.parent.mkdir()
    writer({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(ImgrecError) as info:
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code"
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and "Traceback" not in message
    with pytest.raises(ImgrecError):
        load_weights_file(path)
    assert not marker.exists()


def test_code_in_a_torch_checkpoint_is_named_as_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Evil(tmp_path / "pwned")}, path)
    with pytest.raises(ImgrecError, match=r"refused.*(open|Unsupported global)"):
        load_checkpoint(path)
    assert len(str(pytest.raises(ImgrecError, load_checkpoint, path).value)) < 300  # the reason, not torch's essay


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(5000))


def _text(path: Path) -> None:
    path.write_text("this is not a checkpoint\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _zero_tail(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-64] + b"\0" * 64)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _text, _empty, _zero_tail])
def test_damaged_file_names_it_and_the_other_weights_file(run_dir: Path, damage: Any) -> None:
    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    damage(best)
    with pytest.raises(ImgrecError) as info:
        load_checkpoint(best)
    message = str(info.value)
    assert str(best) in message
    assert "damaged" in message
    assert str(last) in message  # the user learns where good weights may still be
    assert "\n" not in message
    load_weights_file(last)  # and it is indeed good


def test_damaged_file_without_a_sibling(tmp_path: Path) -> None:
    path = tmp_path / "lonely.pt"
    save_atomic({"a": torch.ones(100)}, path)
    _truncate(path)
    with pytest.raises(ImgrecError, match="damaged") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "may still be good" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImgrecError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_a_dict_or_not_imgrec_weights(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ImgrecError, match="not an imgrec or torchvision weights file"):
        load_checkpoint(path)
    path = tmp_path / "sd.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)  # a bare state dict
    assert "fc.weight" in load_checkpoint(path)
    with pytest.raises(ImgrecError, match=r"not an imgrec weights file \(missing model, state_dict"):
        load_weights_file(path)


def test_newer_format_is_refused(run_dir: Path, tmp_path: Path) -> None:
    ckpt = load_weights_file(run_dir / "weights" / "best.pt")
    ckpt["format_version"] = FORMAT_VERSION + 1
    save_atomic(ckpt, tmp_path / "future.pt")
    with pytest.raises(ImgrecError, match="newer imgrec"):
        load_weights_file(tmp_path / "future.pt")


def test_resolve_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    # an empty run folder (training never finished an epoch)
    with pytest.raises(ImgrecError, match="holds no weights"):
        resolve_weights(run)
    save_atomic({"x": torch.zeros(1)}, run / "weights" / "last.pt")
    assert resolve_weights(run) == run / "weights" / "last.pt"
    save_atomic({"x": torch.zeros(1)}, run / "weights" / "best.pt")
    assert resolve_weights(run) == run / "weights" / "best.pt"
    assert resolve_weights(str(run)) == run / "weights" / "best.pt"
    # a file is itself, wherever it lives
    assert resolve_weights(run / "weights" / "last.pt") == run / "weights" / "last.pt"
    loose = tmp_path / "model.pt"
    save_atomic({"x": torch.zeros(1)}, loose)
    assert resolve_weights(loose) == loose
    # a folder with no weights/ at all, and a path that does not exist
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgrecError, match="holds no weights"):
        resolve_weights(tmp_path / "empty")
    with pytest.raises(ImgrecError, match="no such run folder or weights file"):
        resolve_weights(tmp_path / "missing")


def test_run_dir_of(tmp_path: Path) -> None:
    assert run_dir_of(tmp_path / "runs" / "a" / "weights" / "best.pt") == tmp_path / "runs" / "a"
    assert run_dir_of(tmp_path / "model.pt") == tmp_path


def test_load_model_state_with_another_class_count(run_dir: Path) -> None:
    ckpt = load_weights_file(run_dir / "weights" / "best.pt")
    model = build_model("mlp", 5, 3, (16, 16))  # trained with 3 classes
    with pytest.raises(ImgrecError) as info:
        load_model_state(model, ckpt["state_dict"], run_dir / "weights" / "best.pt")
    message = str(info.value)
    assert "do not fit this model" in message and str(run_dir / "weights" / "best.pt") in message
    assert "size mismatch" in message and "\n" not in message


def test_load_model_state_with_another_model(run_dir: Path) -> None:
    ckpt = load_weights_file(run_dir / "weights" / "best.pt")
    model = build_model("lenet", 3, 3, (16, 16))
    with pytest.raises(ImgrecError, match="do not fit this model"):
        load_model_state(model, ckpt["state_dict"], "w.pt")


def test_load_model_state_loads_the_exact_tensors(run_dir: Path) -> None:
    ckpt = load_weights_file(run_dir / "weights" / "best.pt")
    model = build_model("mlp", 3, 3, (16, 16))
    load_model_state(model, ckpt["state_dict"], "w.pt")
    assert_same({k: v for k, v in model.state_dict().items()}, ckpt["state_dict"])


def test_weights_names() -> None:
    assert checkpoint.WEIGHTS_NAMES == ("best.pt", "last.pt")
