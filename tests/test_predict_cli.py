"""`imgrec predict`: output formats, paths, folders and globs, every kind of bad input, --show-input, usage errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.data.photo import CAPTION_HEIGHT
from imgrec.engine.checkpoint import load_weights_file, save_atomic
from imgrec.inference import Predictor
from inference_helpers import train_tiny, write_bomb_png, write_truncated
from test_cli import error_line, run_cli, run_main

JSON_KEYS = {"path", "label", "probability", "topk", "in_distribution"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A colour and a grey run on make_image_folder trees, and their image folders."""
    root = tmp_path_factory.mktemp("predict-cli")
    return {"colour": train_tiny(root, 3), "grey": train_tiny(root, 1), "colour_images": root / "data3",
            "grey_images": root / "data1"}


def images_of(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_predict_help_and_it_stays_torch_free(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["predict", "--help"], capsys)
    assert code == 0
    for flag in ("RUN_OR_WEIGHTS", "PATH", "--topk", "--format", "--batch-size", "--no-auto-preprocess",
                 "--show-input", "--device", "--threads"):
        assert flag in out, flag
    code = textwrap.dedent("""
        import sys
        from imgrec.cli import main
        try:
            main(["predict", "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "numpy")]
        print("light")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("light"), proc.stderr


def test_table_by_default(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["predict", str(tiny["colour"]), str(tiny["colour_images"])], capsys)
    assert code == 0, err
    assert not err.strip()  # a fresh run lacks nothing: no notes
    lines = out.strip().splitlines()
    assert lines[0].split() == ["image", "prediction", "prob", "top", "3"]
    rows = lines[1:]
    paths = images_of(tiny["colour_images"])
    assert len(rows) == len(paths)
    # long paths keep their end: "…cli0/data3/cat/000.png"
    assert all(str(path).endswith(row.split()[0].lstrip("…")) for row, path in zip(rows, paths))
    right = sum(row.split()[1] == path.parent.name for row, path in zip(rows, paths))
    assert right >= 0.9 * len(paths)
    assert all(row.split()[2].endswith("%") for row in rows)


def test_images_like_none_of_the_classes_read_unsure(tiny: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = load_weights_file(tiny["colour"] / "weights" / "best.pt")
    ckpt["ood"]["threshold"] = 1e9  # nothing scores this high
    save_atomic(ckpt, tmp_path / "strict.pt")
    image = str(images_of(tiny["colour_images"])[0])
    code, out, _ = run_main(["predict", str(tmp_path / "strict.pt"), image], capsys)
    assert code == 0 and out.splitlines()[1].split()[1] == "unsure"
    code, out, _ = run_main(["predict", str(tmp_path / "strict.pt"), image, "--format", "json"], capsys)
    record = json.loads(out)
    assert record["in_distribution"] is False and record["label"] == "cat"  # the best guess is still given


def test_json_lines(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    paths = images_of(tiny["colour_images"])[:5]
    code, out, err = run_main(["predict", str(tiny["colour"]), *map(str, paths), "--format", "json", "--topk", "2"],
                              capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    for r in records:
        assert set(r) == JSON_KEYS
        assert len(r["topk"]) == 2 and r["topk"][0] == [r["label"], r["probability"]]
        assert r["topk"][0][1] >= r["topk"][1][1] and isinstance(r["in_distribution"], bool)


def test_csv(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["predict", str(tiny["colour"]), str(tiny["colour_images"]), "--format", "csv",
                               "--topk", "5"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(images_of(tiny["colour_images"]))
    assert list(rows[0]) == ["path", "label", "probability", "in_distribution", "label_1", "probability_1",
                             "label_2", "probability_2", "label_3", "probability_3"]  # 3 classes: top-5 is top-3
    for row in rows:
        assert row["label"] == row["label_1"] and float(row["probability"]) == float(row["probability_1"])
        assert row["in_distribution"] in ("true", "false")


def test_folders_and_globs_expand(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = tiny["colour_images"]
    pattern = str(folder / "d*" / "*.png")  # quoted: imgrec expands it, not the shell
    code, out, err = run_main(["predict", str(tiny["colour"]), str(folder / "cat"), pattern,
                               str(folder / "cat" / "000.png"), "--format", "json"], capsys)
    assert code == 0, err
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert paths == [str(p) for p in images_of(folder / "cat") + images_of(folder / "dog")]  # once each


def test_every_bad_input_is_named_and_the_rest_predicted(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Through `python -m imgrec`, as a user runs it."""
    good = images_of(tiny["colour_images"])[:2]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in good:
        shutil.copy(p, folder / p.name)
    picture = Image.open(good[0]).convert("RGB").resize((64, 64))
    bad = {
        "truncated PNG": write_truncated(folder / "cut.png", picture),
        "truncated JPEG": write_truncated(folder / "cut.jpg", picture),
        "zero bytes": folder / "zero.png",
        "not an image": folder / "text.jpg",
        "bomb": write_bomb_png(folder / "bomb.png"),
    }
    bad["zero bytes"].touch()
    bad["not an image"].write_text("hello")
    missing = tmp_path / "missing.png"
    proc = run_cli("predict", str(tiny["colour"]), str(folder), str(missing), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    predicted = [json.loads(line)["path"] for line in proc.stdout.splitlines()]
    assert predicted == [str(folder / p.name) for p in good]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("imgrec predict: error:")]
    assert len(errors) == len(bad) + 1
    for kind, path in bad.items():
        assert any(str(path) in line for line in errors), kind
    assert any(f"{missing}: file not found" in line for line in errors)
    assert any("too large" in line for line in errors if "bomb.png" in line)
    assert "6 input(s) could not be predicted" in proc.stderr.splitlines()[-1]
    ok = run_cli("predict", str(tiny["colour"]), *map(str, good), cwd=tmp_path)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 3 and not ok.stderr.strip()


def test_show_input_saves_what_the_model_saw(tiny: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    source = np.asarray(Image.open(images_of(tiny["grey_images"])[0]))
    photo = tmp_path / "photo.png"
    Image.fromarray(255 - source).resize((120, 120), Image.Resampling.BICUBIC).save(photo)  # dark on light
    sheet = tmp_path / "out" / "seen.png"
    code, _, err = run_main(["predict", str(tiny["grey"]), str(photo), "--show-input", str(sheet)], capsys)
    assert code == 0, err
    assert f"model inputs: {sheet}" in err
    with Image.open(sheet) as img:
        whole = np.asarray(img)
    assert img.format == "PNG" and whole.shape == (96 + CAPTION_HEIGHT, 96)  # one 16x16 input, enlarged 6 times
    seen, caption = whole[:96], whole[96:]
    assert (caption > 200).any()  # the caption's text (file name and prediction) is drawn under the image
    expected = Predictor.from_run(tiny["grey"]).prepare(photo)[0].numpy()
    assert np.array_equal(seen[::6, ::6], expected)
    assert expected[:8, :8].mean() > 150  # the light photo was inverted: a bright square, top-left, as trained
    plain = tmp_path / "plain.png"
    code, _, err = run_main(["predict", str(tiny["grey"]), str(photo), "--show-input", str(plain),
                             "--no-auto-preprocess"], capsys)
    assert code == 0, err
    with Image.open(plain) as img:
        assert np.asarray(img)[:96][::6, ::6][:8, :8].mean() < 100  # resized only: still dark on light


def test_weights_without_the_new_keys_say_so_once(tiny: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    ckpt = load_weights_file(tiny["grey"] / "weights" / "best.pt")
    for key in ("ood", "background", "object_extent", "object_centred"):
        ckpt.pop(key)
    save_atomic(ckpt, tmp_path / "old.pt")
    paths = [str(p) for p in images_of(tiny["grey_images"])[:3]]
    code, out, _ = run_main(["predict", str(tmp_path / "old.pt"), *paths, "--format", "json"], capsys)
    assert code == 0
    notes = [r.getMessage() for r in caplog.records]  # in this process, pytest holds the log lines
    assert sum("does not record its training images' background" in n for n in notes) == 1
    assert sum("holds no out-of-distribution threshold" in n for n in notes) == 1
    assert [json.loads(line)["in_distribution"] for line in out.splitlines()] == [None, None, None]


@pytest.mark.parametrize("argv,fragment", [
    (["--topk", "0"], "--topk must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--format", "xml"], "invalid choice"),
])
def test_usage_errors(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str],
                      fragment: str) -> None:
    code, _, err = run_main(["predict", str(tiny["colour"]), str(tiny["colour_images"]), *argv], capsys)
    assert code == 2 and fragment in err


def test_missing_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["predict", str(tmp_path / "nothing"), str(tmp_path)], capsys)
    assert code == 1 and "no such run folder or weights file" in error_line(err)
