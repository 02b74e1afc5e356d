"""The import rules of the package, checked on the source (ast), so a new import cannot quietly break them.

  nothing imports imgrec.cli (only the entry point imgrec.__main__ runs it)
  imgrec.models, imgrec.data, imgrec.evaluation: never each other, imgrec.engine or imgrec.workflows
  imgrec.engine: never imgrec.data, imgrec.models (but models.hooks, the optional methods of a model) or
  imgrec.workflows; imgrec.models.hooks imports nothing of imgrec
  imgrec.engine.distributed: of imgrec only errors; only the engine and workflows import it (one code path)
  the command modules (workflows, reporting, explanations, comparison, saved_runs, samples): only the CLI and each other
  import them,
  and reporting (which workflows calls) never imports workflows, explanations or comparison
  imgrec.inference: never imgrec.workflows (which calls it after training); nothing below it imports it
  imgrec.serve: only the CLI imports it; it never imports the workflows, the command modules or finetune, and
  its model card is built by the standard library alone
  imgrec.export: only the CLI (and the Python API) imports it; inside it only the runner (a command module) imports
  the workflows
  imgrec.api (imgrec.train, imgrec.load): a front door like the CLI; nothing below it imports it
  onnx, onnxscript, onnxruntime, safetensors (the `export` extra): never an import statement, only
  imgrec.export.common.requires, so a missing package is one line naming the extra
  imgrec.recipes (and imgrec.finetune): joins like the workflows; only imgrec.workflows imports it, and it never
  imports the command modules
  imgrec.config, imgrec.errors, imgrec.openmp: no torch (they are what `--help` loads)
and every torch.load passes weights_only=True.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "imgrec"


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, src: Path = SRC) -> set[str]:
    """Every module an import statement anywhere in the file names (function-level imports included)."""
    module = _module_name(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from imgrec import cli` imports imgrec.cli
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _names(imported: set[str], prefix: str) -> set[str]:
    return {m for m in imported if m == prefix or m.startswith(prefix + ".")}


MODULES = _modules()
COMMAND_MODULES = ("imgrec.workflows", "imgrec.reporting", "imgrec.explanations", "imgrec.comparison",
                   "imgrec.export.runner", "imgrec.saved_runs", "imgrec.samples")
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime", "safetensors")


def test_the_package_is_where_expected() -> None:
    assert {"imgrec", "imgrec.cli", "imgrec.config", "imgrec.errors", "imgrec.workflows", "imgrec.engine.trainer",
            "imgrec.models.registry", "imgrec.evaluation.metrics", "imgrec.data.datasets", "imgrec.finetune",
            "imgrec.recipes", "imgrec.models.transfer", "imgrec.models.backbones", "imgrec.serve.app",
            "imgrec.serve.server", "imgrec.export", "imgrec.export.common", "imgrec.export.onnx_file",
            "imgrec.export.safetensors_file", "imgrec.engine.distributed", *COMMAND_MODULES} <= set(MODULES)


def test_the_import_parser_sees_nested_relative_and_aliased_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / "imgrec" / "engine"
    pkg.mkdir(parents=True)
    source = pkg / "x.py"
    source.write_text(
        "import os\n"
        "from imgrec import cli\n"
        "def f():\n"
        "    import torch.nn as nn\n"
        "    from ..data import loaders\n"
        "    from . import runs\n"
    )
    found = imports_of(source, tmp_path / "src")
    assert {"os", "imgrec.cli", "torch.nn", "imgrec.data.loaders", "imgrec.engine.runs"} <= found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_imports_the_cli(module: str) -> None:
    if module in ("imgrec.cli", "imgrec.__main__"):  # the entry point is the one place that runs it
        return
    assert not _names(imports_of(MODULES[module]), "imgrec.cli"), f"{module} imports imgrec.cli"


LEAF_PACKAGES = ("imgrec.models", "imgrec.data", "imgrec.evaluation")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(LEAF_PACKAGES)))
def test_leaf_packages_stay_apart(module: str) -> None:
    own = next(p for p in LEAF_PACKAGES if module == p or module.startswith(p + "."))
    forbidden = [p for p in LEAF_PACKAGES if p != own] + ["imgrec.engine", "imgrec.cli", *COMMAND_MODULES, "imgrec.inference"]
    imported = imports_of(MODULES[module])
    bad = sorted(set().union(*(_names(imported, p) for p in forbidden)))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("imgrec.engine")))
def test_engine_never_names_data_models_or_workflows(module: str) -> None:
    # the one exception: the Protocol of a model's optional methods (models.hooks), which fit() calls
    imported = {m for m in imports_of(MODULES[module]) if m not in ("imgrec.models", "imgrec.models.hooks")}
    bad = sorted(set().union(*(_names(imported, p) for p in
                               ("imgrec.data", "imgrec.models", "imgrec.cli", *COMMAND_MODULES, "imgrec.inference"))))
    assert not bad, f"{module} imports {bad}"


def test_model_hooks_stand_alone() -> None:
    """models.hooks is what the engine may know of models: it imports nothing of imgrec."""
    assert not _names(imports_of(MODULES["imgrec.models.hooks"]), "imgrec")


def test_the_distributed_module_stands_alone() -> None:
    """The process group is the engine's business: it imports nothing of imgrec but errors, and only the engine
    and the workflows (where a run starts) use it."""
    own = _names(imports_of(MODULES["imgrec.engine.distributed"]), "imgrec")
    assert own <= {"imgrec.errors", "imgrec.errors.ImgrecError", "imgrec.errors.UsageError"}, own
    users = {m for m, path in MODULES.items() if _names(imports_of(path), "imgrec.engine.distributed")}
    assert users and all(m.startswith("imgrec.engine.") or m == "imgrec.workflows" for m in users), sorted(users)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("imgrec.inference")))
def test_inference_never_imports_the_workflows(module: str) -> None:
    imported = imports_of(MODULES[module])
    bad = sorted(_names(imported, "imgrec.workflows") | _names(imported, "imgrec.cli"))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "imgrec.cli" and not m.startswith("imgrec.serve")))
def test_only_the_cli_imports_the_server(module: str) -> None:
    assert not _names(imports_of(MODULES[module]), "imgrec.serve"), f"{module} imports imgrec.serve"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("imgrec.serve")))
def test_the_server_sits_on_inference(module: str) -> None:
    imported = imports_of(MODULES[module])
    bad = sorted(set().union(*(_names(imported, p) for p in ("imgrec.cli", "imgrec.finetune", *COMMAND_MODULES))))
    assert not bad, f"{module} imports {bad}"


def test_the_model_card_is_pure() -> None:
    card = {m.split(".")[0] for m in imports_of(MODULES["imgrec.serve.card"])}
    assert card <= {"__future__", "json", "math", "datetime", "pathlib", "typing"}, card


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_cli_imports_export(module: str) -> None:
    if module in ("imgrec.cli", "imgrec.api") or module.startswith("imgrec.export"):
        return
    assert not _names(imports_of(MODULES[module]), "imgrec.export"), f"{module} imports imgrec.export"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("imgrec.export") and m != "imgrec.export.runner"))
def test_export_formats_sit_below_the_commands(module: str) -> None:
    """The file formats (and the loader users call) need models, data and the engine, never a command module."""
    imported = imports_of(MODULES[module])
    bad = sorted(set().union(*(_names(imported, p) for p in ("imgrec.workflows", "imgrec.reporting",
                                                              "imgrec.explanations", "imgrec.comparison",
                                                              "imgrec.export.runner", "imgrec.inference",
                                                              "imgrec.cli"))))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_below_the_front_doors_imports_the_api(module: str) -> None:
    """imgrec.api sits beside the CLI: only the package's lazy names (and the CLI) reach it."""
    if module in ("imgrec", "imgrec.api", "imgrec.cli"):
        return
    assert not _names(imports_of(MODULES[module]), "imgrec.api"), f"{module} imports imgrec.api"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_export_extra_is_never_imported_directly(module: str) -> None:
    """onnx, onnxruntime, ... load through export.common.requires: a missing one is a line naming the extra."""
    bad = {m for m in imports_of(MODULES[module]) if m.split(".")[0] in EXPORT_EXTRA}
    assert not bad, f"{module} imports {sorted(bad)} directly; use imgrec.export.common.requires"


@pytest.mark.parametrize("joint", ["imgrec.recipes", "imgrec.finetune"])
def test_joining_modules_are_imported_by_the_workflows_alone(joint: str) -> None:
    users = sorted(m for m, path in MODULES.items() if m not in (joint, "imgrec.workflows")
                   and _names(imports_of(path), joint))
    assert not users, f"{joint} is imported by {users}"
    bad = sorted(set().union(*(_names(imports_of(MODULES[joint]), p) for p in COMMAND_MODULES)))
    assert not bad, f"{joint} imports {bad}"


def test_reporting_sits_below_the_workflows() -> None:
    imported = imports_of(MODULES["imgrec.reporting"])
    bad = sorted(set().union(*(_names(imported, p) for p in ("imgrec.workflows", "imgrec.explanations",
                                                              "imgrec.comparison", "imgrec.cli"))))
    assert not bad, f"imgrec.reporting imports {bad}"


def test_the_report_page_and_figures_are_pure() -> None:
    """The HTML page is built from plain values by the standard library alone; no figure module loads torch."""
    html = {m.split(".")[0] for m in imports_of(MODULES["imgrec.evaluation.html"])}
    assert html <= {"__future__", "base64", "html", "math", "collections", "typing"}, html
    for module in ("imgrec.evaluation.plots", "imgrec.evaluation.charts"):
        assert not {m for m in imports_of(MODULES[module]) if m.split(".")[0] == "torch"}, module


@pytest.mark.parametrize("module", ["imgrec.config", "imgrec.errors", "imgrec.openmp", "imgrec"])
def test_light_modules_import_no_torch(module: str) -> None:
    imported = imports_of(MODULES[module])
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "torchvision", "numpy", "matplotlib", "sklearn")}
    assert not heavy, f"{module} imports {sorted(heavy)}"


def test_config_and_errors_import_only_errors_of_imgrec() -> None:
    assert _names(imports_of(MODULES["imgrec.errors"]), "imgrec") == set()
    assert _names(imports_of(MODULES["imgrec.config"]), "imgrec") <= {
        "imgrec.errors", "imgrec.errors.ImgrecError", "imgrec.errors.UsageError"
    }


def test_cli_imports_torch_only_inside_functions() -> None:
    """The CLI module's top level may load config and errors only; commands import the rest when they run."""
    tree = ast.parse(MODULES["imgrec.cli"].read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module or "")
    assert not {m for m in top if m.split(".")[0] in ("torch", "torchvision", "numpy")}
    assert not {m for m in top if m.startswith(("imgrec.workflows", "imgrec.data", "imgrec.models", "imgrec.engine"))}


def _torch_load_calls(path: Path) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            calls.append(node)
    return calls


def test_every_torch_load_is_weights_only() -> None:
    seen = 0
    for module, path in MODULES.items():
        text = path.read_text()
        calls = _torch_load_calls(path)
        # the grep and the parse agree: no torch.load hidden from the ast check
        assert len(calls) == len(re.findall(r"\btorch\.load\(", text)), module
        for call in calls:
            kw = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in kw, f"{module}:{call.lineno}: torch.load without weights_only=True"
            value = kw["weights_only"]
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{module}:{call.lineno}: torch.load must pass weights_only=True"
            )
            seen += 1
    assert seen >= 1  # the checkpoint loader at least


def test_no_pickle_loads_in_src() -> None:
    """Nothing bypasses the weights-only loader with plain pickle."""
    for module, path in MODULES.items():
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(", text), module
        assert "weights_only=False" not in text, module


LONGEST_FUNCTION = 60  # lines, decorators aside: longer ones are split where their steps are


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_is_longer_than_it_should_be(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert not long, f"{module}: {long}"
