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
import io
import math
import os
import pickle
import pickletools
import secrets
import shutil
import tempfile
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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
        # torch's weights-only unpickler stopped before running anything; whether the pickle names code (a function
        # or class torch does not allow) is read from the pickle's own opcodes, not from torch's wording
        named = code_globals(path)
        if named:
            shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
            raise ImgrecError(f"{path}: refused: it would run code when loaded ({shown})") from None
        hint = _previous_good(path)  # random bytes or a foreign pickle stream
        raise ImgrecError(f"{path} is damaged or not a checkpoint (unreadable pickle: {_unpickler_detail(str(exc))})"
                          f"{hint}") from None
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
    return lines[0].split(" was not an allowed global")[0] if lines else "not a weights-only pickle"


PICKLE_SCAN_BYTES = 256 * 2**20  # a weights file's pickle is small; its tensors are stored apart (zip format)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_NO_PUSH_OPS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "PROTO", "FRAME", "STOP"}


def code_globals(path: str | Path) -> list[str]:
    """The functions and classes a checkpoint's pickle names (GLOBAL, STACK_GLOBAL, INST) that torch's weights-only
    loader does not allow: what a full unpickler would import and call. Read with pickletools, which runs nothing."""
    allowed = _allowed_globals()
    found: list[str] = []
    for data in _pickles(Path(path)):
        for name in _globals_in(data):
            if name not in allowed and name not in found:
                found.append(name)
    return found


def _allowed_globals() -> set[str]:
    """'module.name' of what torch's weights-only loading accepts: torch's own list and those the user allowed
    (torch.serialization.add_safe_globals), as torch.serialization.get_unsafe_globals_in_checkpoint reads them."""
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):  # a torch without the lists: tensors and plain containers only
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                "torch.FloatStorage", "torch.LongStorage", "torch.storage.UntypedStorage"}


def _global_name(module: str, name: str) -> str:
    """'module.name' as Python 3 (and torch's unpickler) reads a protocol-2 pickle: __builtin__.set is builtins.set."""
    module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    return f"{module}.{name}"


def _pickles(path: Path) -> list[bytes]:
    """The pickle streams of a checkpoint: data.pkl of a zip-format file, else the file itself (legacy format)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return [archive.open(info).read(PICKLE_SCAN_BYTES) for info in archive.infolist()
                        if info.filename.endswith(".pkl")]
        with path.open("rb") as f:
            return [f.read(PICKLE_SCAN_BYTES)]
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError):
        return []


def _globals_in(data: bytes) -> list[str]:
    """'module.name' of each global the pickles in data name; STACK_GLOBAL takes its two names from the strings
    pushed (or fetched from the memo) just before it. Stops quietly where the bytes stop being a pickle."""
    names: list[str] = []
    stream = io.BytesIO(data)
    pushed: list[Any] = []  # what each opcode pushed: the string, or None for anything else
    memo: dict[int, Any] = {}
    while stream.tell() < len(data):
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(_global_name(*str(arg).split(" ", 1)) if " " in str(arg) else str(arg))
                elif op.name == "STACK_GLOBAL":
                    module, name = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                    names.append(_global_name(module, name) if isinstance(module, str) and isinstance(name, str)
                                 else "an unnamed global")
                if op.name in _STRING_OPS:
                    pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name not in _NO_PUSH_OPS:
                    pushed.append(None)
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle: what was read so far is what it names
            break
    return names


def _previous_good(path: Path) -> str:
    for name in FALLBACKS.get(path.name, WEIGHTS_NAMES):
        other = path.parent / name
        if other != path and other.is_file():
            return f"; {other} may still be good"
    return ""


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Load an imgrec weights file and check it has what inference needs."""
    ckpt = load_checkpoint(path)
    version = ckpt.get("format_version", 0)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ImgrecError(f"{path} was written by a newer imgrec (format {ckpt['format_version']}); upgrade imgrec")
    check_weights_meta(ckpt, path)
    return ckpt


def check_weights_meta(ckpt: dict[str, Any], source: str | Path, with_tensors: bool = True) -> None:
    """What a weights file (or an exported model's sidecar) says about its model and inputs must hang together: the
    model's spec, one class name per output, 1 or 3 channels, sizes within the pixel limit, a mean and std of finite
    numbers per input channel (with_tensors=False: a sidecar, whose tensors are in another file). A hand-edited or
    damaged value is one line naming the file, not a crash (or an allocation that never ends) further on."""
    needed = ("model", "state_dict", "classes", "mean", "std", "image_size", "channels")
    missing = [k for k in needed if k not in ckpt and (with_tensors or k != "state_dict")]
    if missing:
        raise ImgrecError(f"{source} is not an imgrec weights file (missing {', '.join(missing)})")

    def bad(what: str) -> ImgrecError:
        return ImgrecError(f"{source} holds an invalid {what}: the file was edited or damaged; use the weights as "
                           f"training wrote them")

    spec = ckpt["model"]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad(f"model description ({_show(spec)})")
    outputs = spec.get("num_classes")
    if not _is_int(outputs) or outputs < 1:
        raise bad(f"model class count ({_show(outputs)})")
    in_channels = spec.get("in_channels")
    if not _is_int(in_channels) or in_channels not in CHANNELS:
        raise bad(f"model input channel count ({_show(in_channels)}; 1 or 3)")
    _check_size(spec.get("image_size"), "model input size", bad)
    classes = ckpt["classes"]
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise bad(f"class list ({_show(classes)}; a list of names)")
    if len(classes) != outputs:
        raise ImgrecError(f"{source} names {len(classes)} classes but its model has {outputs} outputs: the file was "
                          f"edited or damaged")
    if not _is_int(ckpt["channels"]) or ckpt["channels"] not in CHANNELS:
        raise bad(f"channel count ({_show(ckpt['channels'])}; 1 or 3)")
    _check_size(ckpt["image_size"], "image size", bad)
    if ckpt.get("input_size") is not None:
        _check_size(ckpt["input_size"], "input size", bad)
    feeds = ckpt.get("input_channels", ckpt["channels"])  # what the model is fed after the images are converted
    if not _is_int(feeds) or feeds != in_channels:
        raise bad(f"input channel count ({_show(feeds)}; its model takes {in_channels})")
    for key in ("mean", "std"):
        values = ckpt[key]
        if (not isinstance(values, list) or len(values) != in_channels
                or not all(_is_finite(v) for v in values)):
            raise bad(f"{key} ({_show(values)}; {in_channels} finite number{'s' if in_channels > 1 else ''})")
    if not all(v > 0 for v in ckpt["std"]):
        raise bad(f"std ({_show(ckpt['std'])}; positive numbers)")


CHANNELS = (1, 3)


def _check_size(size: Any, what: str, bad: Any) -> None:
    """[height, width]: positive integers whose product is within Pillow's pixel limit (what decoding allows)."""
    limit = Image.MAX_IMAGE_PIXELS or DEFAULT_PIXEL_LIMIT
    ok = (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(n) and n >= 1 for n in size)
          and size[0] * size[1] <= limit)
    if not ok:
        raise bad(f"{what} ({_show(size)}; height and width in pixels, at most {limit:,} pixels)")


DEFAULT_PIXEL_LIMIT = 89_478_485  # Pillow's default, for when an application turned Pillow's off


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value: Any, limit: int = 50) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
