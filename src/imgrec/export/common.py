"""What every export format shares: the optional packages it needs (a one-line error naming the `export` extra when
one is missing), atomic writes, and the description a shipped model carries (classes, input, preprocessing, ...).

Imports: the standard library, imgrec and imgrec.errors only; onnx, onnxruntime, onnxscript and safetensors are
imported by `requires`, when an export runs, never at import time.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import imgrec
from imgrec.errors import ImgrecError

EXTRA_HINT = "pip install 'imgrec[export]'"

# The values a weights file records that a shipped model needs to be rebuilt and to preprocess as training did.
# Optional ones (temperature, ood, background, ...) are left out when the weights file lacks them.
SHIPPED_KEYS = ("model", "classes", "channels", "image_size", "input_channels", "input_size", "mean", "std",
                "temperature", "ood", "background", "object_extent", "object_centred", "data", "epoch", "config",
                "versions", "git_commit")


def requires(package: str) -> ModuleType:
    """Import an optional package of the `export` extra, or fail with one line that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImgrecError(f"exporting needs the Python package {package.split('.')[0]!r}, which is not installed: "
                          f"{EXTRA_HINT}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file beside path, fsync it, then rename it over path (never a half-written file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ImgrecError(f"cannot write {path}: {exc.strerror or exc}; choose another --out") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; a shipped model is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ImgrecError(f"cannot write {path}: {exc.strerror or exc}; choose another --out") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shipped_fields(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The plain values of a weights file that travel with an exported model, plus the imgrec that exported it."""
    fields = {key: ckpt[key] for key in SHIPPED_KEYS if ckpt.get(key) is not None}
    # files older than input_size/input_channels: the model takes the images as they are decoded
    fields.setdefault("input_size", list(ckpt["image_size"]))
    fields.setdefault("input_channels", int(ckpt["channels"]))
    fields["exported_by"] = f"imgrec {imgrec.__version__}"
    return fields
