"""What a new user meets first: error messages whose advice names flags the command has, arguments in the wrong
place answered directly, a run that finds its own data from another shell, and argparse without surprises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, error_line, run_main

FAST = ["--threads", "1", "--workers", "0", "--device", "cpu"]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180,
            ) -> subprocess.CompletedProcess[str]:
    """`python -m imgrec ARGS` in a subprocess, with this checkout's source first on the path."""
    full = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def flags_on(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    """Every flag that `imgrec COMMAND --help` lists."""
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def assert_advice_works(command: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every flag an error message names exists on the command that printed it."""
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", message))
    missing = named - flags_on(command, capsys)
    assert not missing, f"imgrec {command} names {sorted(missing)}, which it does not have: {message}"


# --- a run finds its data -------------------------------------------------------------------------------------


@pytest.fixture
def named_run(tmp_path: Path, fake_fashion_mnist: Path, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> Path:
    """A run of the named fashion-mnist (fake files) trained with $IMGREC_DATA set; the variable is unset after."""
    monkeypatch.setenv("IMGREC_DATA", str(fake_fashion_mnist))
    code, out, err = run_main(["train", "--data", "fashion-mnist", "--model", "mlp", "--epochs", "1",
                               "--project", str(tmp_path / "runs"), *FAST], capsys)
    assert code == 0, err
    monkeypatch.delenv("IMGREC_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default data folder is empty
    return tmp_path / "runs" / "fashion-mnist-mlp"


def test_a_run_records_where_its_data_came_from(named_run: Path, fake_fashion_mnist: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    saved = yaml.safe_load((named_run / "config.yaml").read_text())
    assert saved["data_dir"] == str(fake_fashion_mnist.resolve())
    code, out, err = run_main(["evaluate", str(named_run)], capsys)  # from a shell without $IMGREC_DATA
    assert code == 0, err
    assert "test accuracy" in out


@pytest.mark.parametrize("command", [["evaluate"], ["explain", "--mistakes", "1"], ["export", "--format", "safetensors"]])
def test_moved_data_is_found_with_the_flag_the_error_names(named_run: Path, fake_fashion_mnist: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    moved = fake_fashion_mnist.rename(tmp_path / "moved")
    code, _, err = run_main([command[0], str(named_run), *command[1:]], capsys)
    assert code == 1
    message = error_line(err)
    assert "--data-dir" in message
    assert_advice_works(command[0], message, capsys)
    code, _, err = run_main([command[0], str(named_run), *command[1:], "--data-dir", str(moved)], capsys)
    assert code == 0, err


def test_export_with_data_dir_from_the_real_command(named_run: Path, fake_fashion_mnist: Path, tmp_path: Path) -> None:
    moved = fake_fashion_mnist.rename(tmp_path / "moved")
    env = {"HOME": str(tmp_path / "home"), "IMGREC_DATA": ""}
    proc = run_cli("export", str(named_run), "--format", "safetensors", cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert "--data-dir" in error_line(proc.stderr)
    assert not (named_run / "weights" / "best.safetensors").exists()
    proc = run_cli("export", str(named_run), "--format", "safetensors", "--data-dir", str(moved), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (named_run / "weights" / "best.safetensors").is_file()


# --- arguments in the wrong place -----------------------------------------------------------------------------


def one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The real command failed as a user should see it: the exit code, one line on stderr, nothing on stdout."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


@pytest.mark.parametrize(("data", "said"), [("./photoz", "folder not found: ./photoz"),
                                            ("photos/2024", "folder not found: photos/2024"),
                                            ("holiday.zip", "file not found: holiday.zip")])
def test_a_missing_path_is_not_found_not_an_unknown_name(tmp_path: Path, data: str, said: str) -> None:
    proc = run_cli("train", "--data", data, "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert one_error_line(proc, 1) == f"imgrec train: error: {said}"
    assert not (tmp_path / "runs").exists()


def test_a_missing_path_in_doctor_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["doctor", "./photoz"], ["show", "--data", "./photoz"]):
        code, _, err = run_main(command, capsys)
        assert code == 1 and error_line(err) == f"imgrec {command[0]}: error: folder not found: ./photoz"
    code, _, err = run_main(["show", "--data", "photoz"], capsys)  # no path-like sign: a name
    assert code == 2 and "unknown data set 'photoz'" in error_line(err)


@pytest.fixture
def image_and_run(tmp_path: Path) -> tuple[Path, Path]:
    """An image file, and a folder shaped like a run (only its weights/ folder is looked at before loading)."""
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    run = tmp_path / "runs" / "digits-lenet"
    (run / "weights").mkdir(parents=True)
    return image, run


def test_predict_with_its_arguments_swapped(image_and_run: tuple[Path, Path], tmp_path: Path) -> None:
    image, run = image_and_run
    proc = run_cli("predict", str(image), str(run), cwd=tmp_path)
    line = one_error_line(proc, 2)
    assert line == (f"imgrec predict: error: the arguments look swapped: {image} is an image and {run} a run; the run "
                    f"comes first (imgrec predict {run} {image})")


def test_predict_with_a_folder_and_a_run_swapped(image_and_run: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image, run = image_and_run
    code, _, err = run_main(["predict", str(image.parent), str(run)], capsys)
    assert code == 2
    assert error_line(err) == (f"imgrec predict: error: the arguments look swapped: {image.parent} is a folder and "
                               f"{run} a run; the run comes first (imgrec predict {run} {image.parent})")


@pytest.mark.parametrize("command", ["evaluate", "explain", "export", "predict"])
def test_an_image_where_a_run_belongs(image_and_run: tuple[Path, Path], command: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    image, _ = image_and_run
    argv = [command, str(image)] + ([str(image)] if command == "predict" else [])
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert error_line(err) == (f"imgrec {command}: error: {image} is an image, not a run folder or weights file "
                               f"(imgrec {command} RUN_OR_WEIGHTS ...)")


def test_datasets_names_an_archive_of_a_missing_named_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(b"")
    code, out, _ = run_main(["datasets", "--data-dir", str(tmp_path)], capsys)
    assert code == 0
    cifar = [ln for ln in out.splitlines() if "cifar10" in ln]
    assert "missing" not in cifar[0] and "as an archive" in cifar[0], out
    assert f"--data {tmp_path / 'cifar10-jpeg.tar.gz'}" in cifar[1]
    mnist = next(ln for ln in out.splitlines() if ln.startswith("  mnist"))
    assert "missing (--download)" in mnist


# --- argparse without surprises -------------------------------------------------------------------------------


def test_a_prefix_of_a_flag_is_not_taken_for_it(tmp_path: Path) -> None:
    """--epoch is not silently --epochs (argparse's prefix matching is off): it is an error that names --epochs."""
    proc = run_cli("train", "--epoch", "3", "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert one_error_line(proc, 2) == ("imgrec train: error: unrecognized arguments: --epoch 3; did you mean --epochs? "
                                       "(see imgrec train --help)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("argv", "suggested"), [(["train", "--epcohs", "3"], "--epochs"),
                                                 (["train", "--lrr=0.1"], "--lr"),
                                                 (["predict", "run", "x.png", "--topp", "2"], "--topk"),
                                                 (["evaluate", "run", "--datadir", "d"], "--data-dir")])
def test_an_unknown_flag_gets_the_nearest_one(argv: list[str], suggested: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(argv, capsys)
    assert code == 2 and not out
    line = error_line(err)
    assert line.startswith(f"imgrec {argv[0]}: error: unrecognized arguments: ")
    assert f"did you mean {suggested}?" in line


def test_an_unknown_flag_like_no_other_gets_no_guess(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["datasets", "--bogus"], capsys)
    assert code == 2 and error_line(err) == ("imgrec datasets: error: unrecognized arguments: --bogus "
                                             "(see imgrec datasets --help)")


def test_verbose_after_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrec.cli import main
    from imgrec.errors import UsageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="unknown model"):  # --verbose re-raises in-process
        main(["train", "--model", "nosuch", "--threads", "1", "-v"])
    with pytest.raises(UsageError, match="unknown model"):
        main(["-v", "train", "--model", "nosuch", "--threads", "1"])


COMMANDS = ["train", "lr-find", "doctor", "evaluate", "show", "explain", "compare", "predict", "serve", "export",
            "models", "datasets"]


def _options(command: str) -> dict[str, str]:
    """Each option string of `imgrec COMMAND` (-e, --epochs, ...) -> the long name of the flag it belongs to."""
    from imgrec.cli import _subparsers, build_parser

    parser = _subparsers(build_parser()).choices[command]
    return {option: action.option_strings[-1] for action in parser._actions for option in action.option_strings}


SHORT_FORMS = {"-e": "--epochs", "-b": "--batch-size", "-m": "--model", "-d": "--data", "-o": "--out",
               "-v": "--verbose", "-q": "--quiet", "-h": "--help"}


@pytest.mark.parametrize("command", COMMANDS)
def test_short_flags_mean_the_same_on_every_command(command: str) -> None:
    """A letter is one flag everywhere, and every command with that flag has the letter."""
    options = _options(command)
    shorts = {o: long for o, long in options.items() if not o.startswith("--")}
    assert shorts == {o: long for o, long in SHORT_FORMS.items() if long in options.values()}


def test_train_with_short_flags_and_quiet_after_the_command(tmp_path: Path) -> None:
    """-q: the result on stdout, nothing on stderr (no data, model or per-epoch lines, no progress bars)."""
    proc = run_cli("train", "-d", "digits", "-m", "mlp", "-e", "1", "-b", "64", "--project", "runs", "-q", *FAST,
                   cwd=tmp_path, env={"OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "run folder: runs/digits-mlp" and lines[1].startswith("test accuracy: ") and len(lines) == 2
    saved = yaml.safe_load((tmp_path / "runs" / "digits-mlp" / "config.yaml").read_text())
    assert (saved["data"], saved["model"], saved["epochs"], saved["batch_size"]) == ("digits", "mlp", 1, 64)


@pytest.mark.parametrize("argv", [["-q", "compare", "a", "b"], ["compare", "a", "b", "--quiet"]])
def test_quiet_before_or_after_the_command(argv: list[str]) -> None:
    from imgrec.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False


def test_quiet_leaves_out_notes_but_not_the_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compare's note on a skipped folder is left out under -q; its table and files are not."""
    runs = []
    for model in ("mlp", "mlp"):
        code, out, err = run_main(["train", "-d", "digits", "-m", model, "-e", "1", "--project", str(tmp_path / "runs"),
                                   *FAST], capsys)
        assert code == 0, err
        runs.append(re.search(r"^run folder: (.+)$", out, re.MULTILINE).group(1))
    out = ["-o", str(tmp_path / "runs" / "compare")]
    assert run_main(["compare", *runs, *out], capsys)[0] == 0
    argv = ["compare", *runs, str(tmp_path / "runs" / "compare"), *out]
    code, loud, _ = run_main(argv, capsys)
    assert code == 0 and "note: skipped" in loud
    code, quiet, err = run_main(["-q", *argv], capsys)
    assert code == 0 and not err
    assert quiet == loud.split("\n", 1)[1]


def test_verbose_and_quiet_together_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["-v", "models", "-q"], capsys)
    assert code == 2 and not out
    assert error_line(err) == ("imgrec models: error: -v/--verbose and -q/--quiet exclude each other: give one "
                               "(see imgrec models --help)")


def test_serve_threads_is_named_like_predict_threads(capsys: pytest.CaptureFixture[str]) -> None:
    """serve --threads, as predict and train call it; the old --workers-threads still works, hidden, with a note."""
    from imgrec.cli import build_parser

    assert "--threads" in flags_on("serve", capsys) and "--workers-threads" not in flags_on("serve", capsys)
    args = build_parser().parse_args(["serve", "run", "--workers-threads", "3"])
    assert args.workers_threads == 3
    code, _, err = run_main(["serve", "run", "--workers-threads", "0"], capsys)
    assert code == 2
    assert err.splitlines() == ["note: --workers-threads is now called --threads (the old name still works)",
                                "imgrec serve: error: --threads must be in [1, 64] (the server holds at most 64 "
                                "connections), got 0"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_default_once(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    text = re.sub(r"\s+", " ", out)
    assert not re.search(r"\(default: [^()]*(\([^()]*\)[^()]*)*\) \(default:", text), text
    assert "(default: None)" not in text


def test_train_help_is_grouped(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_main(["train", "--help"], capsys)
    headings = [ln[:-1] for ln in out.splitlines() if ln and not ln.startswith(" ") and ln.endswith(":")]
    assert headings == ["options", "data", "model", "transfer learning (torchvision backbones)", "optimisation",
                        "schedule and stopping", "compute", "output"]
    assert out.splitlines()[0] == "usage: imgrec train [--config YAML | --resume RUN] [options]"


def _flags_in_error_messages(path: Path) -> set[str]:
    """The flags named by the string parts of every `raise X(...)` and `_check(..., message)` in a source file."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        call = node.exc if isinstance(node, ast.Raise) else node if (
            isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_check") else None
        if isinstance(call, ast.Call):
            for part in ast.walk(call):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", part.value))
    return found


TORCHRUN_FLAGS = {"--nproc", "--nproc-per-node", "--nnodes", "--max-restarts"}  # torchrun's own, named in advice


# The command whose errors a module raises; modules shared by several commands (data, cli) are checked against all.
OWNER = {"config.py": "train", "recipes.py": "train", "finetune.py": "train", "workflows.py": "train",
         "engine": "train", "comparison.py": "compare", "explanations.py": "explain", "export": "export",
         "serve": "serve"}


def test_every_flag_an_error_names_is_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    """The advice in an error names flags of the command that raises it (or, for shared code, of some command)."""
    listed = {command: flags_on(command, capsys) for command in COMMANDS}
    every = set().union(*listed.values())
    package = REPO / "src" / "imgrec"
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        owner = OWNER.get(relative.parts[0])
        scope = listed[owner] if owner else every
        named = _flags_in_error_messages(path) - TORCHRUN_FLAGS
        assert named <= scope, f"{relative} names {sorted(named - scope)}, which {owner or 'no command'} lists"


def test_the_package_lists_only_its_public_names() -> None:
    script = ("import sys, imgrec; print(dir(imgrec)); "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["['Failure', 'Prediction', 'Predictor', 'Run', '__version__', 'compare', 'load', "
                                        "'lr_find', 'train']",
                                        "[]"]


# --- the README's front door ----------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_quick_start_is_the_demo_the_makefile_runs() -> None:
    """The figure the README shows is what `make demo` printed: its command must be the Makefile's."""
    demo = re.search(r"^DEMO := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert demo
    front = (REPO / "README.md").read_text().split("## Contents")[0]
    assert f"imgrec train {demo.group(1).strip()} --name demo" in front
    assert "## Install" in front and "pip install -e ." in front and "run folder: runs/demo" in front


def test_the_readme_is_short_and_opens_with_the_front_door() -> None:
    """Under 250 lines; its first 60 hold the two Make commands that work on a fresh machine (first), the install
    and the quick start; everything else is in docs/."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 250
    front = "\n".join(lines[:60])
    for needed in ("## Install", "make demo", "make test", "pip install -e .", "## Quick start", "run folder: runs/demo",
                   "## Contents"):
        assert needed in front, needed
    assert front.index("make demo") < front.index("make test") < front.index("pip install")


def test_links_in_the_readme_and_docs_resolve() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target} does not exist"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)
                assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading for #{anchor} in {linked.name}"
