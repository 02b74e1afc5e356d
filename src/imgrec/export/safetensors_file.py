"""safetensors: a model's tensors in a .safetensors file, and a JSON sidecar (same name, .json) with everything
needed to rebuild the model and preprocess its inputs; `load_safetensors` reads the pair back.

The sidecar holds what the weights file held besides the tensors (model name, class count, channels, sizes, mean
and std, classes, temperature, out-of-distribution threshold, ...) and the SHA-256 of the tensors file, so a pair
that does not belong together (or a damaged file) is refused. The loaded dict has the shape of an imgrec weights
file: `Predictor.from_checkpoint(load_safetensors(path))` predicts with it.
Imports: torch, imgrec.engine.checkpoint, imgrec.models, imgrec.export.common; safetensors through `requires`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from imgrec.engine.checkpoint import check_weights_meta, load_model_state
from imgrec.errors import ImgrecError
from imgrec.export.common import requires, shipped_fields, write_atomic
from imgrec.models.registry import build_model

SIDECAR_KIND = "imgrec-safetensors"
SIDECAR_VERSION = 1


def sidecar_path(tensors_path: Path) -> Path:
    """model.safetensors -> model.json."""
    return tensors_path.with_suffix(".json")


def save_safetensors(ckpt: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """Write a weights file's tensors to path and its description to the sidecar, each atomically; both paths."""
    st = requires("safetensors.torch")
    # safetensors refuses tensors that share memory; a copy of each makes them independent
    state = {name: tensor.detach().clone().contiguous() for name, tensor in ckpt["state_dict"].items()}
    data = st.save(state, metadata={"format": "pt", "producer": "imgrec"})
    sidecar = {"kind": SIDECAR_KIND, "format_version": SIDECAR_VERSION, "tensors": path.name,
               "sha256": hashlib.sha256(data).hexdigest(), **shipped_fields(ckpt)}
    try:
        text = json.dumps(sidecar, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ImgrecError(f"the weights file holds a value the JSON sidecar cannot store: {exc}") from None
    # tensors first: a pair cut short by a crash is a new tensors file under an old sidecar, which the hash refuses
    write_atomic(path, data)
    write_atomic(sidecar_path(path), text.encode() + b"\n")
    return path, sidecar_path(path)


def load_safetensors(path: str | Path) -> dict[str, Any]:
    """A .safetensors file (or its .json sidecar) -> a dict shaped like an imgrec weights file (state_dict included)."""
    st = requires("safetensors.torch")
    path = Path(path)
    tensors_path = path.with_suffix(".safetensors") if path.suffix == ".json" else path
    sidecar_file = sidecar_path(tensors_path)
    for needed in (tensors_path, sidecar_file):
        if not needed.is_file():
            raise ImgrecError(f"not found: {needed} (an export is a .safetensors file and a .json beside it)")
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImgrecError(f"{sidecar_file} is not readable JSON: {exc}") from None
    if not isinstance(sidecar, dict) or sidecar.get("kind") != SIDECAR_KIND:
        raise ImgrecError(f"{sidecar_file} is not an imgrec safetensors sidecar")
    if sidecar.get("format_version", 0) > SIDECAR_VERSION:
        raise ImgrecError(f"{sidecar_file} was written by a newer imgrec; upgrade imgrec")
    check_weights_meta(sidecar, sidecar_file, with_tensors=False)  # before the tensors are read: a model it describes must be sound
    data = tensors_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
        raise ImgrecError(f"{tensors_path} does not match {sidecar_file} (SHA-256 differs): the pair was mixed up "
                          f"or a file is damaged; export again")
    try:
        state = st.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ImgrecError(f"{tensors_path} is not a readable safetensors file: {exc}") from None
    return {**sidecar, "state_dict": state}


def build_from_safetensors(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of an exported pair with its weights loaded (eval mode), and the loaded dict."""
    ckpt = load_safetensors(path)
    spec = ckpt["model"]
    model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"])
    load_model_state(model, ckpt["state_dict"], path)
    return model.eval(), ckpt

