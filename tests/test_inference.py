"""Predictor end to end on runs trained here: own images back, every input kind and file mode, photos,
"none of my classes", temperature, older weights files, bad files, and the Fashion-MNIST photo check."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from imgrec.config import RunConfig
from imgrec.data.imageio import ImageDecodeError, read_image
from imgrec.engine.checkpoint import load_weights_file, save_atomic
from imgrec.evaluation.ood import OOD_SCORES
from imgrec.inference import BatchPrediction, Failure, Prediction, Predictor, expand_paths
from imgrec.workflows import train
from inference_helpers import photo_like, train_tiny

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny runs: colour and grey make_image_folder trees (a bright square whose position is the class)."""
    root = tmp_path_factory.mktemp("tiny-runs")
    return {"colour": train_tiny(root, 3), "grey": train_tiny(root, 1), "root": root}


def own_images(runs: dict[str, Path], kind: str) -> list[Path]:
    return sorted((runs["root"] / ("data3" if kind == "colour" else "data1")).rglob("*.png"))


def test_the_threshold_takes_at_most_a_sample_of_the_training_images() -> None:
    """Without (enough) validation images the threshold comes from training images: an evenly spaced sample, so
    a run without validation does not pass over its whole training set once more."""
    from imgrec.data.info import ArraySplit, DataBundle, FileSplit
    from imgrec.inference.calibrate import MAX_CALIBRATION_TRAIN, calibration_split

    n = 2 * MAX_CALIBRATION_TRAIN + 1
    train = ArraySplit(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n))
    small = ArraySplit(torch.zeros(3, 1, 1, 1, dtype=torch.uint8), torch.full((3,), -1))
    test = ArraySplit(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    name, split = calibration_split(DataBundle(None, train, None, test))  # type: ignore[arg-type]
    assert name == "train" and len(split) <= MAX_CALIBRATION_TRAIN
    assert split.labels[0] == 0 and split.labels[-1] > n - 4  # spread over the whole split, not its start
    name, split = calibration_split(DataBundle(None, train, small, test))  # type: ignore[arg-type]
    assert name == "val+train" and len(split) <= MAX_CALIBRATION_TRAIN + 3 and (split.labels == -1).sum() == 3
    files = FileSplit([f"{i}.png" for i in range(n)], torch.arange(n), 1, (8, 8))
    name, split = calibration_split(DataBundle(None, files, None, test))  # type: ignore[arg-type]
    assert len(split) <= MAX_CALIBRATION_TRAIN and split.paths[1] == f"{split.labels[1].item()}.png"
    enough = ArraySplit(torch.zeros(300, 1, 1, 1, dtype=torch.uint8), torch.zeros(300, dtype=torch.int64))
    assert calibration_split(DataBundle(None, train, enough, test))[1] is enough  # type: ignore[arg-type]


def test_a_fresh_weights_file_holds_the_threshold_and_the_background(runs: dict[str, Path]) -> None:
    for kind in ("colour", "grey"):
        for name in ("best.pt", "last.pt"):
            ckpt = load_weights_file(runs[kind] / "weights" / name)
            ood = ckpt["ood"]
            assert ood["score"] in OOD_SCORES and isinstance(ood["threshold"], float) and ood["keep"] == 0.95
            assert ood["split"] == "val+train" and ood["count"] > 20  # 3 validation images are too few alone
            assert ckpt["background"] == "dark" and ckpt["object_extent"] == pytest.approx(0.5)
            assert ckpt["object_centred"] is False  # the classes are told apart by where the square is


@pytest.mark.parametrize("kind", ["colour", "grey"])
def test_it_predicts_its_own_images(runs: dict[str, Path], kind: str) -> None:
    paths = own_images(runs, kind)
    predictions = Predictor.from_run(runs[kind]).predict(paths)
    assert [p.source for p in predictions] == [str(p) for p in paths]
    right = sum(p.label == path.parent.name for p, path in zip(predictions, paths))
    assert right / len(paths) >= 0.95


def _save_variants(image: Image.Image, folder: Path) -> dict[str, Path]:
    """One RGB image saved as PNG, EXIF-rotated JPEG, RGBA, 16-bit grey, palette with transparency, CMYK JPEG."""
    out = {"png": folder / "a.png"}
    image.save(out["png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the viewer turns the stored pixels 90 degrees clockwise
    out["jpeg_exif"] = folder / "rotated.jpg"
    image.transpose(Image.Transpose.ROTATE_90).save(out["jpeg_exif"], quality=98, exif=exif)
    out["rgba"] = folder / "rgba.png"
    image.convert("RGBA").save(out["rgba"])
    grey16 = (np.asarray(image.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    out["grey16"] = folder / "grey16.png"
    Image.fromarray(grey16).save(out["grey16"])
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    out["palette"] = folder / "palette.png"
    palette.save(out["palette"], transparency=255)  # index 255 is unused by a 64-colour palette
    out["cmyk"] = folder / "cmyk.jpg"
    image.convert("CMYK").save(out["cmyk"], quality=98)
    return out


def test_the_same_image_in_every_mode_gets_the_same_answer(runs: dict[str, Path], tmp_path: Path) -> None:
    predictor = Predictor.from_run(runs["colour"])
    for i, path in enumerate(own_images(runs, "colour")[::12]):  # one image per class
        folder = tmp_path / str(i)
        folder.mkdir()
        variants = _save_variants(Image.open(path).convert("RGB"), folder)
        with Image.open(variants["grey16"]) as img:
            assert img.mode.startswith("I")  # a real 16-bit file
        labels = {name: predictor.predict(p)[0].label for name, p in variants.items()}
        assert set(labels.values()) == {path.parent.name}, labels
        # the EXIF orientation is applied: the JPEG's pixels come out as the PNG's, and not without it
        upright = predictor.prepare(variants["jpeg_exif"]).float()
        assert (upright - predictor.prepare(variants["png"]).float()).abs().mean() < 6
        with Image.open(variants["jpeg_exif"]) as raw:
            stored = torch.from_numpy(np.array(raw.convert("RGB"))).permute(2, 0, 1).float()
        assert (stored - predictor.prepare(variants["png"]).float()).abs().mean() > 20


def test_a_grey_model_reads_dark_on_light_photos(runs: dict[str, Path], tmp_path: Path) -> None:
    predictor = Predictor.from_run(runs["grey"])
    assert predictor.preprocessing.photo and not predictor.preprocessing.object_centred
    for path in own_images(runs, "grey")[::12]:
        image = np.asarray(Image.open(path))
        scan = Image.fromarray(255 - image).resize((96, 96), Image.Resampling.BICUBIC)  # dark square on light
        scan.save(tmp_path / "scan.png")
        assert predictor.predict(tmp_path / "scan.png")[0].label == path.parent.name
        plain = Predictor.from_run(runs["grey"], auto_preprocess=False)
        assert not plain.preprocessing.photo
        assert torch.equal(plain.prepare(tmp_path / "scan.png"), read_image(tmp_path / "scan.png", 1, (16, 16)))


def test_every_input_kind_gives_the_same_prediction(runs: dict[str, Path]) -> None:
    predictor = Predictor.from_run(runs["colour"])
    path = own_images(runs, "colour")[13]
    pil = Image.open(path)
    array = np.array(pil.convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    opaque = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)  # (H, W, 4)
    results = predictor.predict([str(path), path, pil, array, tensor, opaque])
    results.append(predictor.predict(tensor.unsqueeze(0))[0])  # a ready batch of the model's shape
    assert [r.source for r in results][2:] == ["<image 2>", "<array 3>", "<tensor 4>", "<array 5>", "<tensor 0>"]
    assert len({r.label for r in results}) == 1
    assert all(r.probability == pytest.approx(results[0].probability, abs=1e-5) for r in results)
    assert all([name for name, _ in r.topk] == [name for name, _ in results[0].topk] for r in results)
    with pytest.raises(TypeError, match="uint8"):
        predictor.predict(tensor.float())
    with pytest.raises(TypeError, match="uint8"):
        predictor.predict(array.astype(np.float32))
    with pytest.raises(TypeError, match="cannot predict"):
        predictor.predict([3.5])
    grey = Predictor.from_run(runs["grey"])
    grey_path = own_images(runs, "grey")[30]
    grey_array = np.asarray(Image.open(grey_path))
    as_16bit = grey.predict([grey_array, grey_array.astype(np.uint16) * 257])
    assert as_16bit[0].label == as_16bit[1].label == grey_path.parent.name
    assert as_16bit[0].probability == as_16bit[1].probability


def test_predict_batch_is_the_vectorised_core(runs: dict[str, Path]) -> None:
    predictor = Predictor.from_run(runs["colour"])
    batch = torch.stack([predictor.prepare(p) for p in own_images(runs, "colour")])
    out = predictor.predict_batch(batch, topk=3)
    assert isinstance(out, BatchPrediction) and len(out) == len(batch)
    assert out.topk_indices.shape == (len(batch), 3) and out.in_distribution is not None
    assert torch.equal(out.indices, out.topk_indices[:, 0])
    assert bool((out.topk_probabilities[:, :-1] >= out.topk_probabilities[:, 1:]).all())
    assert torch.allclose(out.topk_probabilities.sum(1), torch.ones(len(batch)), atol=1e-5)  # 3 classes: all of them
    listed = predictor.predict(batch, topk=2, batch_size=7)
    assert [p.index for p in listed] == out.indices.tolist() and all(len(p.topk) == 2 for p in listed)
    assert predictor.predict(batch[:1], topk=10)[0].topk.__len__() == 3  # never more than the classes
    with pytest.raises(ValueError, match="uint8 batch"):
        predictor.predict_batch(batch.float())


def test_random_noise_is_mostly_none_of_my_classes(runs: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    for kind, shape in (("colour", (16, 16, 3)), ("grey", (16, 16))):
        # last.pt: on a 3-image validation split best.pt is an early epoch, the first to get all 3 right
        predictor = Predictor.from_run(runs[kind] / "weights" / "last.pt")
        noise = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(40)]
        flagged = [p.in_distribution is False for p in predictor.predict(noise)]
        assert sum(flagged) / len(flagged) >= 0.8, kind
        own = predictor.predict(own_images(runs, kind))
        assert sum(p.in_distribution is True for p in own) / len(own) >= 0.9, kind


def test_temperature_scales_probabilities_not_the_ood_score(runs: dict[str, Path], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ckpt = load_weights_file(runs["colour"] / "weights" / "last.pt")
    plain = Predictor.from_checkpoint(ckpt)
    ckpt["temperature"] = 2.0
    save_atomic(ckpt, tmp_path / "t.pt")
    scaled = Predictor.from_run(tmp_path / "t.pt")
    assert scaled.temperature == 2.0
    batch = torch.stack([plain.prepare(p) for p in own_images(runs, "colour")])
    a, b = plain.predict_batch(batch, topk=3), scaled.predict_batch(batch, topk=3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.ood_scores, b.ood_scores)
    with torch.inference_mode():
        logits = plain.model(torch.addcmul(plain._shift, batch.float(), plain._scale))
    assert torch.allclose(b.probabilities, torch.softmax(logits / 2, 1).amax(1), atol=1e-6)
    assert bool((b.probabilities <= a.probabilities + 1e-6).all())
    ckpt["temperature"] = -1.0
    with caplog.at_level(logging.WARNING):
        assert Predictor.from_checkpoint(ckpt).temperature is None
    assert "invalid temperature" in caplog.text


def test_older_weights_files_still_predict_and_say_what_is_missing(runs: dict[str, Path], tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    ckpt = load_weights_file(runs["grey"] / "weights" / "best.pt")
    for key in ("ood", "background", "object_extent", "object_centred"):
        del ckpt[key]
    save_atomic(ckpt, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING):
        predictor = Predictor.from_run(tmp_path / "old.pt")
    assert len(caplog.records) == 2  # once each, at start-up
    assert "background" in caplog.records[0].getMessage() and "out-of-distribution" in caplog.records[1].getMessage()
    assert predictor.notes == [r.getMessage() for r in caplog.records]
    path = own_images(runs, "grey")[0]
    assert torch.equal(predictor.prepare(path), read_image(path, 1, (16, 16)))  # no photo conversion
    result = predictor.predict(path)[0]
    assert result.in_distribution is None and result.label == "cat"


def test_bad_files_are_named(runs: dict[str, Path], tmp_path: Path) -> None:
    predictor = Predictor.from_run(runs["colour"])
    good = own_images(runs, "colour")[:2]
    empty = tmp_path / "empty.png"
    empty.touch()
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageDecodeError, match="missing.png: file not found"):
        predictor.predict([good[0], tmp_path / "missing.png"])
    items = list(predictor.predict_files([good[0], empty, text, good[1]], batch_size=3))
    assert [type(i) for i in items] == [Prediction, Failure, Failure, Prediction]
    assert items[1].message == f"{empty}: empty file (0 bytes)"
    assert str(text) in items[2].message and "not an image" in items[2].message
    assert items[3].source == str(good[1])
    assert list(predictor.predict_files([empty])) == [Failure(str(empty), items[1].message)]


def test_expand_paths_walks_folders_and_globs(tmp_path: Path) -> None:
    for name in ("a/1.png", "a/b/2.jpg", "a/.hidden/3.png", "a/.4.png", "a/readme.txt", "c.png", "d.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    specs = [tmp_path / "a", str(tmp_path / "*.png"), str(tmp_path / "a" / "**" / "*.jpg"), tmp_path / "c.png",
             tmp_path / "d.txt", tmp_path / "gone.png", tmp_path / "empty", str(tmp_path / "z*.png")]
    files, failures = expand_paths(specs)
    assert files == [str(tmp_path / n) for n in ("a/1.png", "a/b/2.jpg", "c.png", "d.txt")]  # once each, in order
    assert [f.message for f in failures] == [
        f"{tmp_path / 'gone.png'}: file not found",
        f"{tmp_path / 'empty'}: folder holds no image files (.jpg, .jpeg, .png, ...)",
        f"{tmp_path / 'z*.png'}: no image files match this pattern",
    ]


def test_predictor_is_importable_lazily_from_the_package(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        import imgrec
        assert "torch" not in sys.modules and "Predictor" in dir(imgrec)
        from imgrec import Predictor
        assert "torch" in sys.modules and Predictor.__module__ == "imgrec.inference.predictor"
        try:
            imgrec.Nothing
        except AttributeError as exc:
            print("ok", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok") and "Nothing" in proc.stdout


@pytest.mark.slow
def test_fashion_mnist_photos_are_read_like_the_test_images(shared_data: Path, tmp_path: Path) -> None:
    """A short LeNet run; 300 test images as dark-on-light 200x200 noisy photos vs. the plain test images."""
    cfg = RunConfig(data="fashion-mnist", data_dir=str(shared_data), epochs=2, train_samples=12_000, threads=1,
                    workers=0, device="cpu", project=str(tmp_path), name="fm")
    run = train(cfg).run_dir
    predictor = Predictor.from_run(run)
    assert predictor.preprocessing.photo and predictor.preprocessing.object_centred
    assert predictor.preprocessing.object_extent > 0.9  # Fashion-MNIST objects fill the frame
    test = tvd.FashionMNIST(str(shared_data), train=False)
    images, labels = test.data[:300], test.targets[:300].tolist()
    plain = predictor.predict(images.unsqueeze(1))
    rng = np.random.default_rng(0)
    photos = [photo_like(image.numpy(), rng) for image in images]
    as_photos = predictor.predict(photos)
    plain_acc = np.mean([p.index == y for p, y in zip(plain, labels)])
    photo_acc = np.mean([p.index == y for p, y in zip(as_photos, labels)])
    assert plain_acc > 0.75
    assert photo_acc >= plain_acc - 0.10, (plain_acc, photo_acc)
    raw = Predictor.from_run(run, auto_preprocess=False).predict(photos[:100])
    assert np.mean([p.index == y for p, y in zip(raw, labels)]) < photo_acc - 0.2  # the conversion is what works
    noise = predictor.predict([rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(50)])
    assert np.mean([p.in_distribution is False for p in noise]) >= 0.8
