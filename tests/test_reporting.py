"""What a run shows of its model, end to end: the files train and evaluate write (metrics.json, figures,
report.html), the temperature stored with the weights, `imgrec explain` and `imgrec compare`, and their errors.

Runs are tiny (the embedded digits, a 36-image folder) and trained in-process with one thread.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import error_line, make_image_folder, run_main
from imgrec.cli import main
from imgrec.data.transforms import BatchTransform
from imgrec.engine.checkpoint import load_weights_file
from imgrec.engine.system import autocast, autocast_dtype
from imgrec.evaluation.calibration import fit_temperature
from imgrec.evaluation.html import SECTIONS
from imgrec.models import registry
from imgrec.saved_runs import load_run, load_run_data

FAST = ["--threads", "1", "--workers", "0", "--device", "cpu"]
FIGURES = ("confusion_matrix.png", "confusion_matrix_normalized.png", "mistakes.png", "samples.png", "calibration.png")


def train(capsys: pytest.CaptureFixture[str], *args: str) -> Path:
    code, out, err = run_main(["train", *args, *FAST], capsys)
    assert code == 0, err
    return Path(re.search(r"^run folder: (.+)$", out, re.MULTILINE).group(1))


def open_png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.copy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lenet (3 epochs) and mlp (2 epochs) on the embedded digits."""
    project = tmp_path_factory.mktemp("report-runs")
    made = {}
    for model, epochs in (("lenet", "3"), ("mlp", "2")):
        code = main(["train", "--data", "digits", "--model", model, "--epochs", epochs, "--project", str(project),
                     *FAST])
        assert code == 0
        made[model] = project / f"digits-{model}"
    return made


def embedded_pngs(html: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.load()
            assert img.format == "PNG"
            images.append(img.copy())
    return images


# --- train and evaluate write the report ----------------------------------------------------------------------


def test_train_writes_metrics_figures_and_report(runs: dict[str, Path]) -> None:
    run = runs["lenet"]
    for name in FIGURES:
        assert open_png(run / name).width > 300, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["count"] == 269
    assert metrics["top1_accuracy"] == metrics["accuracy"] and 0 <= metrics["top5_accuracy"] <= 1
    for key in ("macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall",
                "weighted_f1", "balanced_accuracy", "ece", "loss"):
        assert isinstance(metrics[key], float), key
    assert len(metrics["reliability"]) == 15 and sum(r["count"] for r in metrics["reliability"]) == 269
    cal = metrics["calibration"]
    assert cal["fitted_on"] == "val" and cal["ece_before"] == metrics["ece"]
    assert 0 <= cal["ece_after"] <= 1 and cal["loss_after"] > 0
    assert metrics["dataset"]["split_sizes"] == {"train": 1259, "val": 269, "test": 269}
    assert metrics["timing"]["device"] == "cpu" and metrics["timing"]["images_per_second"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_ece"] == metrics["ece"] and summary["test_macro_f1"] == metrics["macro_f1"]
    assert summary["test_images"] == 269 and summary["temperature"] == cal["temperature"]


def test_the_temperature_is_fitted_on_validation_and_stored_with_both_weights(runs: dict[str, Path]) -> None:
    run = runs["lenet"]
    best, last = (load_weights_file(run / "weights" / name) for name in ("best.pt", "last.pt"))
    assert isinstance(best["temperature"], float) and isinstance(last["temperature"], float)
    assert best["temperature"] == json.loads((run / "metrics.json").read_text())["calibration"]["temperature"]
    # refit here on the validation logits of best.pt: the same T
    _, ckpt, cfg, model = load_run(run)
    bundle = load_run_data(cfg, ckpt, run)
    x = BatchTransform(ckpt["mean"], ckpt["std"])(bundle.val.images)
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, autocast_dtype(cfg.precision, cpu)):  # in the run's precision, as fitted
        logits = model.eval()(x).float()
    assert fit_temperature(logits, bundle.val.labels) == pytest.approx(best["temperature"], rel=1e-4)
    if best["epoch"] == last["epoch"]:
        assert best["temperature"] == last["temperature"]


def test_report_html_has_every_section_and_its_images_decode(runs: dict[str, Path]) -> None:
    html = (runs["lenet"] / "report.html").read_text()
    for key, title in SECTIONS:
        assert f'<section id="{key}">' in html and title in html, key
    images = embedded_pngs(html)
    assert len(images) == 6  # results.png and the five figures
    expected = sorted(open_png(runs["lenet"] / name).size for name in ("results.png", *FIGURES))
    assert sorted(img.size for img in images) == expected
    assert "digits-lenet" in html and "temperature T" in html and "T = " in html


def test_evaluate_writes_the_report_into_out(runs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    code, stdout, err = run_main(["evaluate", str(runs["lenet"]), "--split", "val", "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout.startswith("val accuracy:") and "ECE:" in stdout and "after temperature scaling" in stdout
    assert "expected calibration error, the mean gap between how sure" in stdout
    assert f"report: {out / 'report.html'}" in stdout
    for name in (*FIGURES, "metrics.json", "report.html"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["count"] == 269
    # curves and config come from the run folder
    html = (out / "report.html").read_text()
    assert len(embedded_pngs(html)) == 6 and "val split" in html


def test_a_loose_weights_file_still_gets_a_report(runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "model.pt"
    loose.write_bytes((runs["mlp"] / "weights" / "best.pt").read_bytes())
    code, _, err = run_main(["evaluate", str(loose)], capsys)
    assert code == 0, err
    html = (tmp_path / "report.html").read_text()
    assert "no training curves" in html and len(embedded_pngs(html)) == 5
    assert "No configuration recorded" not in html and "<code>batch_size</code>" in html  # from the weights file


def test_no_validation_split_means_no_temperature(image_folder: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = train(capsys, "--data", str(image_folder), "--val-fraction", "0", "--epochs", "2", "--batch-size", "8",
                "--project", str(tmp_path / "runs"))
    assert "temperature" not in load_weights_file(run / "weights" / "best.pt")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] is None and "ece_after" not in metrics["calibration"]
    assert "No temperature was fitted" in (run / "report.html").read_text()
    code, out, err = run_main(["evaluate", str(run)], capsys)
    assert code == 0, err
    assert "ECE:" in out and "temperature" not in out


# --- explain --------------------------------------------------------------------------------------------------


def _digit_png(path: Path) -> Path:
    """A digit-like grey PNG at 32x32 (the decoder resizes it to the run's 8x8)."""
    array = np.zeros((32, 32), dtype=np.uint8)
    array[4:28, 12:20] = 255  # a "1"
    Image.fromarray(array).save(path)
    return path


def test_explain_lenet_images_and_mistakes(runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    one = _digit_png(tmp_path / "one.png")
    other = tmp_path / "b" / "one.png"
    other.parent.mkdir()
    _digit_png(other)
    out = tmp_path / "explained"
    code, stdout, err = run_main(["explain", str(runs["lenet"]), str(one), str(other), "--mistakes", "2",
                                  "--out", str(out)], capsys)
    assert code == 0, err
    assert "note:" not in stdout
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith("Grad-CAM on LAYER (HxW): the heat-map marks")  # the words explained, once
    lines = lines[:-1]
    assert len(lines) == 4 and all("Grad-CAM on features." in ln for ln in lines)
    assert lines[0].startswith(f"{one}: ") and lines[2].startswith("test image #")
    mistake = re.match(r"test image #\d+: (\w) [\d.]+%, true: (\w) ", lines[2])
    assert mistake and mistake.group(1) != mistake.group(2)
    names = sorted(p.name for p in out.iterdir())
    assert names[0] == f"mistake-01-{mistake.group(2)}-as-{mistake.group(1)}.png"
    assert names[1].startswith("mistake-02-") and names[2:] == ["one-2.png", "one.png"]
    for png in out.iterdir():
        assert open_png(png).width > 400


def test_explain_mlp_falls_back_to_saliency_and_says_so(runs: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run_main(["explain", str(runs["mlp"]), "--mistakes", "1", "--method", "gradcam"], capsys)
    assert code == 0, err
    assert stdout.startswith("note: MLP has no convolution layer: input-gradient saliency instead of Grad-CAM")
    assert "(input-gradient saliency)" in stdout
    pngs = list((runs["mlp"] / "explanations").glob("mistake-01-*.png"))
    assert len(pngs) == 1 and open_png(pngs[0]).width > 400


def test_explain_a_torchvision_resnet18_without_weights(image_folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A transfer-learning backbone (here unweighted, as nothing may be downloaded) run through the commands."""
    entry = registry.ModelEntry(lambda n, c, s: torchvision.models.resnet18(weights=None, num_classes=n), "resnet18")
    monkeypatch.setitem(registry.MODELS, "resnet18", entry)
    run = train(capsys, "--data", str(image_folder), "--model", "resnet18", "--image-size", "32", "--epochs", "1",
                "--batch-size", "8", "--project", str(tmp_path / "runs"))
    image = next((image_folder / "fox").iterdir())
    code, stdout, err = run_main(["explain", str(run), str(image)], capsys)
    assert code == 0, err
    assert "Grad-CAM on layer3.1.conv2 (2x2)" in stdout  # layer4's maps are 1x1 at 32 px
    assert open_png(run / "explanations" / f"{image.stem}.png").width > 400


def test_explain_bad_input(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not really a jpeg")
    code, _, err = run_main(["explain", str(runs["lenet"]), str(broken), "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and str(broken) in error_line(err) and "not an image file" in error_line(err)
    assert not (tmp_path / "x").exists()  # nothing written before every image decoded
    code, _, err = run_main(["explain", str(runs["lenet"]), str(tmp_path / "missing.png")], capsys)
    assert code == 1 and "file not found" in error_line(err)
    (tmp_path / "empty-run").mkdir()
    code, _, err = run_main(["explain", str(tmp_path / "empty-run"), "--mistakes", "1"], capsys)
    assert code == 1 and "holds no weights" in error_line(err)
    code, _, err = run_main(["explain", str(runs["lenet"])], capsys)
    assert code == 2 and "nothing to explain" in error_line(err)
    code, _, err = run_main(["explain", str(runs["lenet"]), "--mistakes", "-1"], capsys)
    assert code == 2 and "--mistakes" in error_line(err)


# --- compare --------------------------------------------------------------------------------------------------


def test_compare_two_runs(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    code, stdout, err = run_main(["compare", str(runs["lenet"]), str(runs["mlp"]), "--out", str(out)], capsys)
    assert code == 0, err
    header = stdout.splitlines()[0]
    for column in ("run", "data", "model", "params", "epochs", "test accuracy", "macro-F1", "ECE", "train time",
                   "images/s"):
        assert column in header, column
    summaries = {m: json.loads((runs[m] / "summary.json").read_text()) for m in runs}
    assert f"{100 * summaries['lenet']['test_accuracy']:.2f}%" in stdout and "131,080" in stdout
    assert (out / "compare.md").read_text() == stdout.split("wrote ")[0]
    with (out / "compare.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["lenet", "mlp"]
    assert float(rows[1]["test_accuracy"]) == summaries["mlp"]["test_accuracy"]
    assert int(rows[0]["epochs"]) == 3 and int(rows[1]["params"]) == summaries["mlp"]["params"]
    assert open_png(out / "compare.png").width > 800


def test_compare_refuses_different_data_unless_forced(runs: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "shapes", size=8, channels=1)
    other = train(capsys, "--data", str(folder), "--model", "mlp", "--epochs", "1", "--project", str(tmp_path / "runs"))
    code, stdout, err = run_main(["compare", str(runs["lenet"]), str(other), "--out", str(tmp_path / "c")], capsys)
    assert code == 1 and not stdout
    line = error_line(err)
    assert "different data (digits vs shapes)" in line and "--force" in line
    assert not (tmp_path / "c").exists()
    code, stdout, err = run_main(["compare", str(runs["lenet"]), str(other), "--force", "--out", str(tmp_path / "c")],
                                 capsys)
    assert code == 0, err
    assert "shapes-mlp" in stdout and (tmp_path / "c" / "compare.png").is_file()


def test_compare_bad_input(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["compare", str(runs["lenet"])], capsys)
    assert code == 2 and "at least two" in error_line(err)
    (tmp_path / "empty-run").mkdir()
    code, _, err = run_main(["compare", str(runs["lenet"]), str(tmp_path / "empty-run")], capsys)
    assert code == 1 and "holds no weights" in error_line(err)
    code, _, err = run_main(["compare", str(runs["lenet"]), str(tmp_path / "nope")], capsys)
    assert code == 1 and "no such run folder" in error_line(err)
    unfinished = tmp_path / "unfinished"
    (unfinished / "weights").mkdir(parents=True)
    code, _, err = run_main(["compare", str(runs["lenet"]), str(unfinished)], capsys)
    assert code == 1 and "did not finish" in error_line(err)


def test_compare_writes_beside_runs_and_skips_its_own_output_folder(runs: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`imgrec compare runs/*` writes compare/ beside runs/, so a second `compare runs/*` meets only runs; a compare
    folder among the arguments (one written with --out runs/compare) is skipped."""
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "runs"
    for run in runs.values():
        shutil.copytree(run, project / run.name)
    for _ in range(2):
        code, stdout, err = run_main(["compare", *(str(p) for p in sorted(project.iterdir()))], capsys)
        assert code == 0, err
        assert "skipped" not in stdout
        assert sorted(p.name for p in project.iterdir()) == ["digits-lenet", "digits-mlp"]
        assert (tmp_path / "compare" / "compare.md").read_text() == stdout.split("wrote ")[0]
    code, _, err = run_main(["compare", str(project / "digits-lenet"), str(project / "digits-mlp"),
                             "--out", str(project / "compare")], capsys)
    assert code == 0, err
    code, stdout, err = run_main(["compare", *(str(p) for p in sorted(project.iterdir()))], capsys)
    assert code == 0, err
    assert f"note: skipped {project / 'compare'}: compare's own output" in stdout
    assert (tmp_path / "compare" / "compare.md").read_text() == stdout.split("wrote ")[0].split("\n", 1)[1]
    code, _, err = run_main(["compare", str(project / "digits-lenet"), str(project / "compare")], capsys)
    assert code == 2 and "compare's own output, skipped" in error_line(err)
