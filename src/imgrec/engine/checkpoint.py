"""What a weights file holds, and how it is written (atomically) and read (weights only, never code).

A weights file (runs/<run>/weights/best.pt, last.pt) is a plain dict of tensors and plain values:
  format_version, model {name, num_classes, in_channels, image_size}, state_dict,
  classes, channels, image_size, input_channels, input_size, mean, std, data, config, epoch, metrics, versions,
  git_commit. channels and image_size say how images are decoded; input_channels and input_size what the model
  takes (they differ for pretrained backbones: 224 px, three channels), and mean/std has input_channels values.
  After training: temperature (a float fitted on the validation split: predictions divide the logits by it),
  and (inference.calibrate) ood {score, threshold, keep, split, count}, background ("dark" or "light"),
  object_extent, object_centred. Readers treat these as optional (older files lack them).
Everything inference needs is in it; nothing in it can run code when loaded. The training state
(runs/<run>/train_state.pt, see state.py) is written and read by the same two functions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import secrets
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from imgrec.errors import ImgrecError, write_error

FORMAT_VERSION = 1
WEIGHTS_NAMES = ("best.pt", "last.pt")
# Where else good weights (or state) may be when a file is damaged: the other weights file, the previous state.
FALLBACKS = {"best.pt": ("last.pt",), "last.pt": ("best.pt",), "train_state.pt": ("train_state.prev.pt",)}


def save_atomic(obj: Any, path: str | Path, keep_previous: str | None = None) -> None:
    """torch.save to a temporary file in the same folder, fsync it, then rename over the target.

    With keep_previous (a file name), the file being replaced is first kept under that name (hard-linked, or
    copied where links are not possible), so the target always exists and the one before it survives too.
    A write that fails (a full disk, no permission, a read-only file system) is one line naming the file and the
    cause; the file it would have replaced (and the previous one) stay as they were.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            _keep_copy(path, path.parent / keep_previous)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise write_error(path, exc, needed=_tensor_bytes(obj)) from None
    except RuntimeError as exc:  # torch's writer: "[enforce fail at inline_container.cc:...] ... file write failed"
        _discard(tmp)
        if not _is_write_failure(exc):
            raise
        raise write_error(path, _write_failure_cause(path.parent), needed=_tensor_bytes(obj)) from None
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


def _discard(tmp: str | None) -> None:
    """Remove a temporary file a failed write left (what cannot be removed now, a resume clears away)."""
    if tmp is not None:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)


def _is_write_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return "PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text


def _write_failure_cause(folder: Path) -> OSError:
    """What failed when torch's writer gives no errno: a full disk where the folder's free space says so."""
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        full = False
    return OSError(errno.ENOSPC, "no space left on device") if full else OSError(errno.EIO, "the write failed")


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) checkpoint: about what writing it needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temporary files that writes cut short by a kill left in a folder (.<name>.<random>.tmp)."""
    partial = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def _keep_copy(source: Path, target: Path) -> None:
    """Atomically make target a copy of source (a hard link when the file system allows it)."""
    tmp = temporary_name(target)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_name(target: Path) -> Path:
    """A name of its own for a temporary file beside target (.<name>.<pid>.<random>.tmp): no two writers share one,
    and remove_partial_writes finds what a kill left behind."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, what: str = "weights file") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; a damaged or foreign file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ImgrecError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if detail.startswith("Unsupported global"):  # a pickle that names code to run: refused, never executed
            raise ImgrecError(f"{path} holds more than weights and was refused (it could run code): {detail}") from None
        hint = _previous_good(path)  # random bytes or a foreign pickle stream
        raise ImgrecError(f"{path} is damaged or not a checkpoint (unreadable pickle: {detail}){hint}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as exc:
        # KeyError/IndexError: torch's legacy (non-zip) reader on a file that is not a checkpoint at all
        hint = _previous_good(path)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ImgrecError(f"{path} is damaged or not a checkpoint ({first}){hint}") from None
    if not isinstance(obj, dict):
        raise ImgrecError(f"{path} is not an imgrec or torchvision weights file")
    return obj


def _unpickler_detail(message: str) -> str:
    """The reason in torch's weights-only error ("Unsupported global: GLOBAL os.system"), without its advice."""
    _, _, rest = message.partition("WeightsUnpickler error:")
    lines = [ln.strip() for ln in rest.splitlines() if ln.strip()]
    return lines[0].split(" was not an allowed global")[0] if lines else "unsafe content"


def _previous_good(path: Path) -> str:
    for name in FALLBACKS.get(path.name, WEIGHTS_NAMES):
        other = path.parent / name
        if other != path and other.is_file():
            return f"; {other} may still be good"
    return ""


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Load an imgrec weights file and check it has what inference needs."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "state_dict", "classes", "mean", "std", "image_size", "channels") if k not in ckpt]
    if missing:
        raise ImgrecError(f"{path} is not an imgrec weights file (missing {', '.join(missing)})")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ImgrecError(f"{path} was written by a newer imgrec (format {ckpt['format_version']}); upgrade imgrec")
    return ckpt


def resolve_weights(run_or_weights: str | Path) -> Path:
    """A run folder -> its weights/best.pt (else last.pt); a file -> itself."""
    path = Path(run_or_weights)
    if path.is_dir():
        for name in WEIGHTS_NAMES:
            candidate = path / "weights" / name
            if candidate.is_file():
                return candidate
        raise ImgrecError(f"{path} holds no weights (expected {path}/weights/best.pt); did its training finish an epoch?")
    if not path.exists():
        raise ImgrecError(f"no such run folder or weights file: {path}")
    return path


def run_dir_of(weights_path: Path) -> Path:
    """The run folder a weights file belongs to (runs/<run>/weights/x.pt -> runs/<run>), else its own folder."""
    return weights_path.parent.parent if weights_path.parent.name == "weights" else weights_path.parent


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """load_state_dict with a one-line error when the weights belong to another model or class count."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch"
        raise ImgrecError(f"the weights in {source} do not fit this model: {detail}") from None
