"""Shipping a trained model outside imgrec: ONNX (preprocessing inside the graph, checked against PyTorch with
onnxruntime) and safetensors (tensors plus a JSON sidecar, and the loader that rebuilds the model from the pair).

  common.py           the optional packages (the `export` extra), atomic writes, what a shipped model carries
  onnx_file.py        the exported graph (uint8 NHWC in), its metadata, the checker, onnxruntime
  safetensors_file.py the .safetensors + .json pair: save, load, rebuild the model
  runner.py           `imgrec export`: a run's weights -> a checked file (a command module: only the CLI imports it)

The names below load on first use, so that importing the package does not import the workflows.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"export_run": "imgrec.export.runner", "load_safetensors": "imgrec.export.safetensors_file",
         "build_from_safetensors": "imgrec.export.safetensors_file", "read_onnx_metadata": "imgrec.export.onnx_file"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imgrec.export' has no attribute {name!r}")
