"""Every setting is checked for its type and range where a RunConfig is built (flags, YAML, Python): a bad value is
one line naming the setting, the value and what is allowed, before anything is written; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import error_line
from imgrec.config import RunConfig, load_yaml
from imgrec.errors import ImgrecError


def run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "imgrec", "train", "--project", str(tmp_path / "runs"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "yaml_text,fragments",
    [
        ("epochs: 1.7\n", ["--epochs must be an integer", "1.7"]),
        ("epochs: true\n", ["--epochs must be an integer", "True"]),
        ("epochs: three\n", ["--epochs must be an integer", "'three'"]),
        ("augment: {a: 1}\n", ["--augment must be text", "{'a': 1}"]),
        ("batch_size: 1.5\n", ["--batch-size must be an integer", "1.5"]),
        ("seed: abc\n", ["--seed must be an integer", "'abc'"]),
        ("seed: -1\n", ["--seed must be in [0, 4294967295]", "-1"]),
        ("model: [mlp]\n", ["--model must be text", "['mlp']"]),
        ("lr: .nan\n", ["--lr must be a finite number", "nan"]),
        ("mean: [0.5, x]\nstd: [1, 1]\n", ["--mean must be a list of 1 or 3 finite numbers"]),
        ("dist_timeout: 1.0e+300\n", ["--dist-timeout must be in (0, 100000]"]),
        ("name: 2024-01-01\n", ["--name must be text", "datetime.date(2024, 1, 1)"]),
    ],
)
def test_a_bad_value_in_yaml_is_one_line_before_any_folder(tmp_path: Path, yaml_text: str,
                                                             fragments: list[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    result = run_train(tmp_path, "--config", str(config))
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--seed", "99999999999999999999"], ["--seed must be in [0, 4294967295]", "99999999999999999999"]),
        (["--epochs", "99999999999999999999"], ["--epochs must be in [1, 9223372036854775807]"]),
        (["--config", "{tmp}"], ["is a folder", "{tmp}"]),
        (["--config", "{tmp}/latin1.yaml"], ["not UTF-8", "{tmp}/latin1.yaml"]),
    ],
)
def test_bad_flags_and_config_files_are_one_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    (tmp_path / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    result = run_train(tmp_path, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    for fragment in fragments:
        assert fragment.format(tmp=tmp_path) in line
    assert not (tmp_path / "runs").exists()


def test_plain_numbers_take_their_declared_type() -> None:
    cfg = RunConfig(lr=1, ema=0, mean=(0, 1, 0), std=[1, 2, 3], time_budget=90)  # type: ignore[arg-type]
    assert type(cfg.lr) is float and type(cfg.ema) is float and cfg.mean == [0.0, 1.0, 0.0] and cfg.time_budget == "90"
    assert all(type(v) is float for v in cfg.mean + cfg.std)
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg  # config.yaml reads back


# -- fuzz: any value for any setting is accepted with the field's type or refused with one line -------------------

FIELDS = {f.name: f for f in fields(RunConfig)}
TYPES = typing.get_type_hints(RunConfig)


def _has_declared_type(value: Any, kind: Any) -> bool:
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return True
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(type(v) is float for v in value)
    if typing.get_origin(kind) is types.UnionType:  # a number or one of its words (--lr find)
        return type(value) in typing.get_args(kind)
    return type(value) is kind


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "none", "adam", "sgd", "cosine", "flip", "crop,flip", "lenet", "90s", "cpu", "val",
                     "last", "fast", "0", "1.5", "true", "\0", "x\ny"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=6)
setting_dicts = st.dictionaries(st.sampled_from(sorted(FIELDS)), values, max_size=4)


def _accepted_or_one_line(build: typing.Callable[[], RunConfig]) -> None:
    try:
        cfg = build()
    except ImgrecError as exc:  # UsageError included
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, message
        return
    for name, kind in TYPES.items():
        assert _has_declared_type(getattr(cfg, name), kind), (name, getattr(cfg, name))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setting_dicts)
def test_fuzz_python_construction(values: dict[str, Any]) -> None:
    _accepted_or_one_line(lambda: RunConfig(**values))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(setting_dicts)
def test_fuzz_yaml(tmp_path: Path, values: dict[str, Any]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True))
    _accepted_or_one_line(lambda: RunConfig.from_dict(load_yaml(path), source=str(path)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(FIELDS)), st.text(max_size=20))
def test_fuzz_yaml_text(tmp_path: Path, name: str, text: str) -> None:
    """Raw YAML text after a setting's key: whatever YAML makes of it (dates, nested flows, tags, junk)."""
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(f"{name}: {text}\n".encode("utf-8", "surrogatepass"))

    def build() -> RunConfig:
        return RunConfig.from_dict(load_yaml(path), source=str(path))

    _accepted_or_one_line(build)
