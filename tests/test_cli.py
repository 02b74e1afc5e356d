"""The `imgrec` command, end to end: help, train, evaluate, show, models, datasets, and every error a user makes.

End-to-end runs go through `python -m imgrec` in a subprocess (as a user runs it); quick checks call
imgrec.cli.main in-process. Training runs here use --threads 1: on a small, busy CI machine one thread per
process is both faster and steadier than torch's one-per-core default. Runs compared bit for bit use
--device cpu, where imgrec promises bit-exact reruns.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, error_line, make_image_folder, run_main
from imgrec.cli import main
from imgrec.config import RunConfig
from imgrec.engine.checkpoint import load_weights_file, save_atomic
from imgrec.openmp import usable_cpus

SUMMARY_KEYS = {"data", "model", "epochs", "test_accuracy", "test_loss", "best_epoch", "params", "train_seconds",
                "images_per_second", "versions", "git_commit"}
FAST = ["--threads", "1", "--workers", "0", "--device", "cpu"]  # CPU: bit-exact reruns


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """`python -m imgrec ARGS` as a user would run it (the session's IMGREC_CACHE is inherited)."""
    full_env = {**os.environ, "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def run_dir_from(out: str) -> Path:
    match = re.search(r"^run folder: (.+)$", out, re.MULTILINE)
    assert match, out
    return Path(match.group(1))


def open_png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.copy()


def rows_without_seconds(run_dir: Path) -> list[list[str]]:
    with (run_dir / "results.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    return [r[:-1] for r in rows]  # `seconds` is the last column


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_weights_file(a)["state_dict"], load_weights_file(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One real end-to-end run, shared by the tests that read it: lenet on the embedded digits, 3 epochs."""
    cwd = tmp_path_factory.mktemp("cli-digits")
    proc = run_cli("train", "--data", "digits", "--epochs", "3", "--project", str(cwd / "runs"), *FAST, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc, (cwd / run_dir_from(proc.stdout)).resolve()


@pytest.fixture
def run_copy(digits_run: tuple[Any, Path], tmp_path: Path) -> Path:
    """A copy of the digits run that a test may write into."""
    return Path(shutil.copytree(digits_run[1], tmp_path / "digits-lenet"))


# --- help -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["explain"], ["compare"], ["show"], ["doctor"],
                                     ["models"], ["datasets"]])
def test_help_for_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main([*command, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: imgrec")
    assert not err


def test_train_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_main(["train", "--help"], capsys)
    for flag in ("--config", "--data", "--data-dir", "--model", "--epochs", "--batch-size", "--lr", "--optimizer",
                 "--schedule", "--patience", "--device", "--precision", "--seed", "--project", "--name",
                 "--exist-ok", "--no-deterministic", "--train-samples", "--augment", "--mean", "--std"):
        assert flag in out, flag
    assert "--optimizer {adam,adamw,sgd,muon}" in out and "(default: adam)" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main([], capsys)
    assert code == 2 and "usage: imgrec" in out and "train" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == "imgrec 0.1.0"


class _Exited(Exception):
    pass


@pytest.mark.parametrize("workers_alive", [False, True])
def test_the_command_skips_the_interpreter_shutdown_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch,
                                                                          workers_alive: bool) -> None:
    """With torch loaded (as here) the interpreter's shutdown costs about a second: the command ends with
    os._exit and main()'s code, unless child processes are still alive (a normal exit reaps them)."""
    import multiprocessing

    from imgrec import cli

    def exit_now(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setattr(multiprocessing, "active_children", lambda: [object()] if workers_alive else [])
    with pytest.raises(SystemExit if workers_alive else _Exited) as info:
        cli.run()
    assert info.value.args[0] == 3


def test_help_does_not_import_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        from imgrec.cli import main
        for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["explain", "--help"],
                     ["compare", "--help"], ["show", "--help"], ["models", "--help"], ["datasets", "--help"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "matplotlib"))
        assert not heavy, heavy[:5]
        print("light")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("light")


UNUSED_BY_TRAINING = ("torchvision", "matplotlib", "onnx", "onnxruntime", "onnxscript", "safetensors", "fastapi",
                      "uvicorn", "starlette", "tensorboard", "scipy", "sklearn", "pandas", "tabulate")


def test_training_imports_only_what_it_uses(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    """Start-up is most of a short command's time: the train path's modules load neither plotting nor
    export/serving/other libraries, and a whole Fashion-MNIST run loads no torchvision (its import alone takes
    seconds) and nothing of those but matplotlib, for the report's figures, where it draws them itself. A new top-level import fails here.
    The run records where its time went outside its steps."""
    code = textwrap.dedent(f"""
        import sys
        from imgrec.cli import main
        import imgrec.api, imgrec.workflows, imgrec.reporting
        loaded = lambda: sorted({{m.split(".")[0] for m in sys.modules}} & set({UNUSED_BY_TRAINING!r}))
        print(loaded())
        code = main(["train", "--data", "fashion-mnist", "--data-dir", {str(fake_fashion_mnist)!r}, "--model", "mlp",
                     "--epochs", "1", "--project", {str(tmp_path / "runs")!r}, "-q", "--threads", "1",
                     "--workers", "0", "--device", "cpu"])
        print(code, loaded())
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # with a CPU to spare, the figures are drawn in a worker process: this one never loads matplotlib at all
    assert (lines[0], lines[-1]) == ("[]", "0 []" if usable_cpus() > 1 else "0 ['matplotlib']")
    # where the command's time went outside its steps, for benchmarks: summary.json's timing
    timing = json.loads((tmp_path / "runs" / "fashion-mnist-mlp" / "summary.json").read_text())["timing"]
    assert set(timing) == {"startup_seconds", "training_seconds", "after_training_seconds"}
    assert all(value > 0 for value in timing.values())


def test_verbose_shows_imgrec_details_not_other_libraries_debug_lines(fake_fashion_mnist: Path,
                                                                     tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "imgrec", "-v", "train", "--data", "fashion-mnist", "--data-dir",
                           str(fake_fashion_mnist), "--model", "mlp", "--epochs", "1", "--project",
                           str(tmp_path / "runs"), "--threads", "1", "--workers", "0", "--device", "cpu"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "timing: start-up to first batch" in proc.stderr  # imgrec's own debug line
    assert "findfont" not in proc.stderr and "matplotlib data path" not in proc.stderr  # matplotlib's, at DEBUG


# --- train ----------------------------------------------------------------------------------------------------


def test_train_digits_end_to_end(digits_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, run = digits_run
    assert "run folder:" in proc.stdout and "test accuracy:" in proc.stdout
    assert "Traceback" not in proc.stderr
    for name in ("config.yaml", "results.csv", "weights/best.pt", "weights/last.pt", "summary.json", "results.png",
                 "metrics.json", "report.html", "confusion_matrix.png", "calibration.png"):
        assert (run / name).is_file(), name
    assert not (run / "split.csv").exists()  # a named data set has its own fixed splits

    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["data"] == "digits" and summary["model"] == "lenet" and summary["epochs"] == 3
    assert 0.7 < summary["test_accuracy"] <= 1.0  # a fraction, far above the 0.1 of chance
    assert 1 <= summary["best_epoch"] <= 3
    assert summary["params"] == 131_080
    assert summary["test_loss"] > 0 and summary["train_seconds"] > 0 and summary["images_per_second"] > 0
    assert set(summary["versions"]) >= {"imgrec", "torch", "torchvision", "python"}
    assert summary["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", summary["git_commit"])
    printed = re.search(r"test accuracy: ([\d.]+)%", proc.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(100 * summary["test_accuracy"], abs=0.006)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] == summary["test_accuracy"] and metrics["split"] == "test"
    assert metrics["count"] == 269 and sum(map(sum, metrics["confusion_matrix"])) == 269
    assert set(metrics["per_class"]) == {str(i) for i in range(10)}

    cfg = RunConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.data == "digits" and cfg.epochs == 3 and cfg.threads == 1 and cfg.model == "lenet"
    with (run / "results.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    open_png(run / "results.png")
    best = load_weights_file(run / "weights" / "best.pt")
    assert best["epoch"] == summary["best_epoch"] and best["classes"] == [str(i) for i in range(10)]


def test_config_yaml_reproduces_a_run(digits_run: tuple[Any, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, run = digits_run
    code, out, err = run_main(["train", "--config", str(run / "config.yaml"), "--project", str(tmp_path)], capsys)
    assert code == 0, err
    again = run_dir_from(out)
    assert again.parent == tmp_path and again.name == "digits-lenet"
    # in this process, from the YAML alone: the same epochs, the same weights to the bit
    assert rows_without_seconds(again) == rows_without_seconds(run)
    assert same_weights(run / "weights" / "best.pt", again / "weights" / "best.pt")
    assert same_weights(run / "weights" / "last.pt", again / "weights" / "last.pt")
    first, second = (json.loads((d / "summary.json").read_text()) for d in (run, again))
    assert second["test_accuracy"] == first["test_accuracy"] and second["test_loss"] == first["test_loss"]


def test_flags_override_the_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data: digits\nmodel: lenet\nepochs: 4\nbatch-size: 50\nlr: 0.002\nthreads: 1\nname: mine\n")
    code, out, err = run_main(["train", "--config", str(config), "--epochs", "1", "--model", "mlp",
                               "--project", str(tmp_path / "runs")], capsys)
    assert code == 0, err
    run = run_dir_from(out)
    assert run.name == "mine"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["model"] == "mlp"  # the flags
    assert saved["batch_size"] == 50 and saved["lr"] == 0.002 and saved["name"] == "mine"  # the YAML
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["model"] == "mlp"


@pytest.mark.parametrize(
    "text,code,fragment",
    [
        ("epoch: 3\n", 2, "unknown setting 'epoch' in {path}; did you mean 'epochs'?"),
        ("learning_rate: 0.1\nbatch_sise: 5\n", 2, "unknown setting"),
        ("batch-sise: 5\n", 2, "did you mean 'batch_size'?"),
        ("epochs: [1, 2\n", 2, "is not valid YAML"),
        ("- epochs\n- 3\n", 2, "must hold a mapping"),
        ("epochs: ten\n", 2, "--epochs must be an integer; got 'ten'"),
        ("epochs: 0\n", 2, "--epochs must be at least 1"),
    ],
)
def test_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, code: int, fragment: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    got, out, err = run_main(["train", "--config", str(config), "--project", str(tmp_path)], capsys)
    assert got == code
    assert fragment.format(path=config) in error_line(err)
    assert not (tmp_path / "digits-lenet").exists()


def test_missing_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 1 and "config file not found" in error_line(err)


def test_empty_yaml_means_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("")
    code, out, err = run_main(["train", "--config", str(config), "--epochs", "1", "--model", "mlp",
                               "--project", str(tmp_path / "runs"), *FAST], capsys)
    assert code == 0, err
    assert run_dir_from(out).name == "digits-mlp"


# --- evaluate -------------------------------------------------------------------------------------------------


def test_evaluate_a_run_folder(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_copy / "metrics.json").unlink()
    code, out, err = run_main(["evaluate", str(run_copy)], capsys)
    assert code == 0, err
    summary = json.loads((run_copy / "summary.json").read_text())
    match = re.search(r"^test accuracy: ([\d.]+)%", out, re.MULTILINE)
    assert match and float(match.group(1)) == pytest.approx(100 * summary["test_accuracy"], abs=0.006)
    assert f"metrics: {run_copy / 'metrics.json'}" in out
    metrics = json.loads((run_copy / "metrics.json").read_text())
    # the same weights on the same test split: the numbers training reported
    assert metrics["accuracy"] == summary["test_accuracy"]
    assert metrics["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert metrics["weights"] == str(run_copy / "weights" / "best.pt") and metrics["split"] == "test"


def test_evaluate_a_weights_file(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = run_copy / "weights" / "last.pt"
    out_dir = tmp_path / "elsewhere"
    code, out, err = run_main(["evaluate", str(weights), "--split", "val", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert out.startswith("val accuracy:")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["count"] == 269 and metrics["weights"] == str(weights)
    assert 0.5 < metrics["accuracy"] <= 1
    # a loose weights file: metrics.json lands beside it
    loose = tmp_path / "model.pt"
    shutil.copy(weights, loose)
    code, out, err = run_main(["evaluate", str(loose), "--split", "train"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "metrics.json").read_text())["split"] == "train"


def test_evaluate_on_data_with_another_class_count(run_copy: Path, image_folder: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["evaluate", str(run_copy), "--data", str(image_folder)], capsys)
    assert code == 1
    line = error_line(err)
    assert "trained on 10 classes" in line and "has 3" in line


def test_evaluate_a_folder_without_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty-run").mkdir()
    code, _, err = run_main(["evaluate", str(tmp_path / "empty-run")], capsys)
    assert code == 1 and "holds no weights" in error_line(err)
    code, _, err = run_main(["evaluate", str(tmp_path / "missing")], capsys)
    assert code == 1 and "no such run folder or weights file" in error_line(err)


def test_evaluate_a_checkpoint_of_another_class_count(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = run_copy / "weights" / "best.pt"
    ckpt = load_weights_file(weights)
    ckpt["model"]["num_classes"] = 5  # tensors of a 10-class head under a 5-class description
    ckpt["classes"] = ckpt["classes"][:5]  # (a description that agrees with itself: the tensors are what differ)
    save_atomic(ckpt, weights)
    code, _, err = run_main(["evaluate", str(run_copy)], capsys)
    assert code == 1
    line = error_line(err)
    assert str(weights) in line and "do not fit this model" in line


def test_evaluate_a_damaged_checkpoint(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = run_copy / "weights" / "best.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_main(["evaluate", str(run_copy)], capsys)
    assert code == 1
    line = error_line(err)
    assert str(weights) in line and "damaged" in line and "last.pt" in line


# --- show, models, datasets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--augmented", "--augment", "translate,erase"], ["--split", "test"]])
def test_show_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    out_file = tmp_path / "grid.png"
    code, out, err = run_main(["show", "--out", str(out_file), "--n", "12", *extra], capsys)
    assert code == 0, err
    assert out.strip() == f"wrote {out_file}"
    assert open_png(out_file).width > 100


@pytest.mark.parametrize("augmented", [False, True])
def test_show_an_image_folder(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              augmented: bool) -> None:
    out_file = tmp_path / "pics" / "folder.png"  # a missing folder is made
    argv = ["show", "--data", str(image_folder), "--out", str(out_file), "--n", "40"]  # more than the split holds
    code, _, err = run_main(argv + (["--augmented"] if augmented else []), capsys)
    assert code == 0, err
    open_png(out_file)


def test_show_default_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["show", "--n", "4"], capsys)
    assert code == 0, err
    open_png(tmp_path / "samples-digits.png")


def test_show_bad_count(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["show", "--n", "0"], capsys)
    assert code == 2 and "--n must be at least 1" in error_line(err)


def test_models_lists_models_with_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["models"], capsys)
    assert code == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert {"mlp", "lenet"} <= set(lines)
    assert "106,975" in lines["mlp"] and "392,975" in lines["mlp"]
    assert "431,080" in lines["lenet"] and "541,094" in lines["lenet"]


def test_datasets_lists_the_named_sets(fake_fashion_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["datasets", "--data-dir", str(fake_fashion_mnist)], capsys)
    assert code == 0
    assert str(fake_fashion_mnist) in out
    states = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert set(states) == {"mnist", "fashion-mnist", "cifar10", "digits"}
    assert "found" in states["fashion-mnist"]
    assert "missing" in states["mnist"] and "--download" in states["mnist"]
    assert "missing" in states["cifar10"]
    assert "embedded" in states["digits"]


# --- errors ---------------------------------------------------------------------------------------------------


def _folder_with_empty_class(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "emptyclass")
    (root / "emu").mkdir()
    return root


def _folder_with_text_file(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "textfile")
    (root / "dog" / "notes.png").write_text("not an image at all")
    return root


def _folder_with_truncated_png(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "truncated")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="PNG")
    (root / "fox" / "cut.png").write_bytes(buffer.getvalue()[:60])
    return root


@pytest.mark.parametrize(
    "argv,code,fragments",
    [
        (["train", "--data", "nosuch"], 2, ["unknown data set 'nosuch'", "digits"]),
        (["train", "--model", "nosuch"], 2, ["unknown model 'nosuch'", "lenet"]),
        (["train", "--epochs", "0"], 2, ["--epochs must be at least 1"]),
        (["train", "--lr", "-1"], 2, ["--lr must be positive"]),
        (["train", "--batch-size", "0"], 2, ["--batch-size"]),
        (["train", "--val-fraction", "0.5", "--test-fraction", "0.6"], 2, ["below 1"]),
        (["train", "--augment", "rotate"], 2, ["unknown augmentation 'rotate'"]),
        (["train", "--mean", "0.5"], 2, ["--mean and --std together"]),
        (["train", "--epochs", "ten"], 2, ["invalid int value: 'ten'"]),
        (["train", "--optimizer", "rmsprop"], 2, ["invalid choice: 'rmsprop'"]),
        (["train", "--precision", "fp16", "--device", "cpu", "--epochs", "1"], 2, ["fp16 needs a CUDA GPU"]),
        (["frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
        (["evaluate"], 2, ["RUN_OR_WEIGHTS"]),
        (["train", "--data", "fashion-mnist", "--data-dir", "{tmp}/nodata"], 1,
         ["FashionMNIST/raw/train-images-idx3-ubyte", "--download", "{tmp}/nodata"]),
        (["train", "--data", "{empty_class}"], 1, ["{empty_class}/emu", "no images"]),
        (["train", "--data", "{text_file}", "--workers", "0", "--strict"], 1, ["{text_file}/dog/notes.png", "--strict"]),
        (["train", "--data", "{text_file}", "--workers", "2", "--strict"], 1, ["{text_file}/dog/notes.png"]),
        (["train", "--data", "{truncated}", "--workers", "0", "--strict"], 1, ["{truncated}/fox/cut.png", "truncated"]),
        (["show", "--data", "nosuch"], 2, ["unknown data set 'nosuch'"]),
        (["datasets", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
    ],
)
def test_bad_input_is_one_line_with_the_right_code(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, argv: list[str], code: int,
                                                   fragments: list[str]) -> None:
    monkeypatch.chdir(tmp_path)  # `nosuch` is not a path here, and no stray run folders land elsewhere
    places = {"tmp": str(tmp_path)}
    if any("{empty_class}" in a for a in argv):
        places["empty_class"] = str(_folder_with_empty_class(tmp_path))
    if any("{text_file}" in a for a in argv):
        places["text_file"] = str(_folder_with_text_file(tmp_path))
    if any("{truncated}" in a for a in argv):
        places["truncated"] = str(_folder_with_truncated_png(tmp_path))
    argv = [a.format(**places) for a in argv]
    if argv[0] == "train":
        argv += ["--project", str(tmp_path / "runs"), "--threads", "1"]
    got, out, err = run_main(argv, capsys)
    assert got == code, err
    line = error_line(err)
    for fragment in fragments:
        assert fragment.format(**places) in line, line
    assert "test accuracy" not in out


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["evaluate", "{run}"]])
def test_cuda_without_a_gpu_is_a_usage_error(command: list[str], tmp_path: Path, run_copy: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a.format(run=run_copy) for a in command] + ["--device", "cuda"]
    if command[0] == "train":
        argv += ["--project", str(tmp_path / "runs")]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "no CUDA GPU" in error_line(err)
    assert not (tmp_path / "runs").exists()  # refused before any run folder is made


def test_errors_from_the_real_command(tmp_path: Path) -> None:
    """As a user sees it: one line on stderr and exit code 2; --verbose shows the traceback."""
    proc = run_cli("train", "--data", "nosuch", "--project", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "imgrec train: error: unknown data set 'nosuch': use one of mnist, fashion-mnist, cifar10, digits, "
        "or a path to an image folder or archive"
    ]
    assert proc.stdout == ""
    proc = run_cli("--verbose", "train", "--data", "nosuch", "--project", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "UsageError: unknown data set 'nosuch'" in proc.stderr


def test_verbose_reraises_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imgrec.errors import UsageError

    with pytest.raises(UsageError, match="unknown model"):
        main(["--verbose", "train", "--model", "nosuch", "--project", str(tmp_path), "--threads", "1"])


# --- image folders and archives -------------------------------------------------------------------------------


def _tar_gz(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return target


def _zip(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return target


def _read_split(run: Path) -> list[dict[str, str]]:
    with (run / "split.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_image_folder_end_to_end(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["train", "--data", str(image_folder), "--model", "lenet", "--epochs", "2",
                               "--batch-size", "8", "--project", str(tmp_path / "runs"), *FAST], capsys)
    assert code == 0, err
    assert "test accuracy:" in out
    run = run_dir_from(out)
    assert run.name == "photos-lenet"
    rows = _read_split(run)
    assert list(rows[0]) == ["file", "class", "split", "skipped"]
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == 36  # every image once
    assert {r["class"] for r in rows} == {"cat", "dog", "fox"}
    for r in rows:
        assert r["file"].startswith(r["class"] + "/") and (image_folder / r["file"]).is_file()
    by_split = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert by_split == {"train": 27, "val": 3, "test": 6}  # 20% test, then 10% of the rest for validation
    for cls in ("cat", "dog", "fox"):  # stratified: every class in every split
        assert {r["split"] for r in rows if r["class"] == cls} == {"train", "val", "test"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 27 and summary["classes"] == ["cat", "dog", "fox"]
    # evaluate rebuilds the very same test split from the saved settings
    code, out, err = run_main(["evaluate", str(run)], capsys)
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["accuracy"] == summary["test_accuracy"]
    assert json.loads((run / "metrics.json").read_text())["count"] == 6


@pytest.mark.parametrize("pack", [_tar_gz, _zip])
def test_archives_end_to_end(pack: Any, image_folder: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    archive = pack(image_folder, tmp_path / ("photos.tar.gz" if pack is _tar_gz else "photos.zip"))
    argv = ["train", "--data", str(archive), "--model", "mlp", "--epochs", "2", "--batch-size", "8",
            "--project", str(tmp_path / "runs"), "--threads", "1"]
    if pack is _tar_gz:  # as a user runs it, decoding with the default DataLoader workers
        proc = run_cli(*argv, cwd=tmp_path)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = run_main(argv + ["--workers", "0"], capsys)
    assert code == 0, err
    assert "test accuracy:" in out and "Traceback" not in err
    run = run_dir_from(out)
    assert run.name == "photos-mlp"
    rows = _read_split(run)
    assert len(rows) == 36 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert sorted(r["file"] for r in rows) == sorted(
        p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png")
    )
    weights = load_weights_file(run / "weights" / "best.pt")
    assert weights["classes"] == ["cat", "dog", "fox"] and weights["data"] == str(archive)


def test_folder_and_its_archive_train_the_same(image_folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    archive = _tar_gz(image_folder, tmp_path / "photos.tar.gz")
    runs = []
    for data in (image_folder, archive):
        code, out, err = run_main(["train", "--data", str(data), "--model", "mlp", "--epochs", "2",
                                   "--batch-size", "8", "--project", str(tmp_path / "runs"), *FAST], capsys)
        assert code == 0, err
        runs.append(run_dir_from(out))
    assert _read_split(runs[0]) == _read_split(runs[1])
    assert rows_without_seconds(runs[0]) == rows_without_seconds(runs[1])
    assert same_weights(runs[0] / "weights" / "best.pt", runs[1] / "weights" / "best.pt")


# --- real data (slow) -----------------------------------------------------------------------------------------


def _summary_of(proc: subprocess.CompletedProcess[str], cwd: Path) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((cwd / run_dir_from(proc.stdout) / "summary.json").read_text())


@pytest.mark.slow
def test_fashion_mnist_lenet(fashion_mnist_lenet: Path) -> None:
    summary = json.loads((fashion_mnist_lenet / "summary.json").read_text())
    assert summary["train_images"] == 6000
    assert summary["test_accuracy"] > 0.6, summary
    metrics = json.loads((fashion_mnist_lenet / "metrics.json").read_text())
    assert metrics["count"] == 10_000 and "T-shirt/top" in metrics["per_class"]


@pytest.mark.slow
def test_fashion_mnist_mlp(shared_data: Path, tmp_path: Path) -> None:
    proc = run_cli("train", "--data", "fashion-mnist", "--data-dir", str(shared_data), "--model", "mlp",
                   "--epochs", "1", "--project", "runs", "--threads", "1", cwd=tmp_path)
    summary = _summary_of(proc, tmp_path)
    assert summary["train_images"] == 54_000  # 10% of the 60,000 held out for validation
    assert summary["test_accuracy"] > 0.7, summary


@pytest.mark.slow
def test_cifar10_jpeg_archive_lenet(shared_data: Path, tmp_path: Path) -> None:
    proc = run_cli("train", "--data", str(shared_data / "cifar10-jpeg.tar.gz"), "--model", "lenet", "--epochs", "1",
                   "--train-samples", "10000", "--project", "runs", "--threads", "1", cwd=tmp_path)
    summary = _summary_of(proc, tmp_path)
    assert summary["train_images"] == 10_000
    assert len(summary["classes"]) == 10 and "airplane" in summary["classes"]
    assert summary["test_accuracy"] > 0.25, summary  # chance is 0.10
    metrics = json.loads((tmp_path / "runs" / "cifar10-jpeg-lenet" / "metrics.json").read_text())
    assert metrics["count"] == 10_000  # the archive's own test split
