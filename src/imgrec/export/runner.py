"""`imgrec export`: a run's weights -> an ONNX file (checked against PyTorch with onnxruntime) or a safetensors pair
(checked by rebuilding the model from it), on images of the run's own validation split (else its test split).

A command module like imgrec.workflows; it reuses imgrec.saved_runs' run loading and data rebuilding: only the
CLI imports it.
Nothing is left at the output path by an export that fails its check.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.data.imageio import read_image
from imgrec.data.info import ArraySplit
from imgrec.data.transforms import weights_transform
from imgrec.engine.checkpoint import WEIGHTS_NAMES, resolve_weights
from imgrec.errors import ImgrecError, UsageError
from imgrec.export.common import requires, shipped_fields, write_atomic
from imgrec.export.onnx_file import onnx_bytes, onnx_session, run_onnx
from imgrec.export.safetensors_file import build_from_safetensors, save_safetensors, sidecar_path
from imgrec.saved_runs import DataSource, load_run, load_run_data

FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors"}
PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "safetensors": ("safetensors.torch",)}  # the extra
ONNX_TOLERANCE = 1e-4  # max |logit difference| onnxruntime may show against PyTorch (float32, same inputs)
DEFAULT_CHECK_IMAGES = 256
BATCH_SIZE = 256


@dataclass
class Parity:
    """An exported model's logits against PyTorch's on the same images."""

    what: str  # what was compared with PyTorch
    count: int
    split: str
    max_abs_diff: float
    agreement: float  # fraction of images with the same top-1 class

    def summary(self) -> str:
        """One line: what was compared, on what, and how close it was."""
        return (f"{self.what} vs PyTorch on {self.count} {self.split} images: max |logit difference| "
                f"{self.max_abs_diff:.2e}, top-1 agreement {self.agreement:.2%} "
                f"({round(self.agreement * self.count)}/{self.count})")


@dataclass
class ExportOutcome:
    """What an export wrote, from which weights, and how its check went."""

    format: str
    path: Path
    sidecar: Path | None  # the safetensors JSON
    weights: Path  # the weights file exported
    description: str  # model, classes, input
    parity: Parity | None  # None when --check-images 0


def export_run(run: str | Path, fmt: str | None = None, out: str | Path | None = None, weights: str | None = None,
               check_images: int = DEFAULT_CHECK_IMAGES, split: str | None = None, data_dir: str | None = None,
               source: DataSource | None = None) -> ExportOutcome:
    """Export a run's (or a weights file's) model to ONNX or safetensors, check it on check_images of the run's data,
    and write it (atomically) to out (default: beside the weights file). source: the run's data when it has no
    name (data passed from Python)."""
    fmt = choose_format(fmt, out)
    if check_images < 0:
        raise UsageError("--check-images must be 0 (no check) or more")
    for package in PACKAGES[fmt]:  # a missing one fails now, not after the export
        requires(package)
    weights_path = pick_weights(run, weights)
    target = output_path(out, weights_path, fmt)
    _probe_writable(target)  # before the minutes an export and its check may take
    _, ckpt, cfg, model = load_run(weights_path, data_dir)
    model.eval()
    images, used_split = check_images_of(cfg, ckpt, weights_path, check_images, split, source) if check_images else (None, "")
    fields = shipped_fields(ckpt)
    about = f"{fields['model']['name']}, {len(fields['classes'])} classes"
    if fmt == "onnx":
        parity = _export_onnx(model, ckpt, fields, target, images, used_split)
        h, w = fields["image_size"]
        return ExportOutcome(fmt, target, None, weights_path, f"{about}, input uint8 (N, {h}, {w}, "
                             f"{fields['channels']})", parity)
    parity = _export_safetensors(model, ckpt, target, images, used_split)
    h, w = fields["input_size"]
    return ExportOutcome(fmt, target, sidecar_path(target), weights_path, f"{about}, input float32 (N, "
                         f"{fields['input_channels']}, {h}, {w}) normalised with the sidecar's mean and std", parity)


def _export_onnx(model: nn.Module, ckpt: dict[str, Any], fields: dict[str, Any], target: Path,
                 images: torch.Tensor | None, split: str) -> Parity | None:
    """Export, check the graph, compare onnxruntime with PyTorch, then write the file."""
    data = onnx_bytes(model, fields)
    parity = None
    if images is not None:
        got, _ = run_onnx(onnx_session(data), images.permute(0, 2, 3, 1).numpy(), BATCH_SIZE)  # NCHW -> NHWC
        parity = compare_logits("onnxruntime", reference_logits(model, ckpt, images), got, split)
        require_onnx_parity(parity)
    write_atomic(target, data)
    return parity


def require_onnx_parity(parity: Parity) -> None:
    """Refuse an ONNX export whose logits differ by ONNX_TOLERANCE or more, or that changes any top-1 class."""
    if not (parity.max_abs_diff < ONNX_TOLERANCE and parity.agreement == 1.0):  # `not <`: NaN fails too
        raise ImgrecError(f"the ONNX export does not match PyTorch: {parity.summary()} (needed: under "
                          f"{ONNX_TOLERANCE:.0e} and 100%); nothing was written")


def _export_safetensors(model: nn.Module, ckpt: dict[str, Any], target: Path, images: torch.Tensor | None,
                        split: str) -> Parity | None:
    """Write the pair, rebuild the model from it and require identical logits (else remove the pair)."""
    save_safetensors(ckpt, target)
    if images is None:
        return None
    rebuilt, loaded = build_from_safetensors(target)
    parity = compare_logits("the rebuilt model", reference_logits(model, ckpt, images),
                            reference_logits(rebuilt, loaded, images), split)
    if parity.max_abs_diff != 0.0:
        for path in (target, sidecar_path(target)):
            path.unlink(missing_ok=True)
        raise ImgrecError(f"the model rebuilt from the safetensors pair does not give the same logits: "
                          f"{parity.summary()}; the pair was removed")
    return parity


def choose_format(fmt: str | None, out: str | Path | None) -> str:
    """--format, else the one --out's suffix names, else onnx; a contradiction is a usage error."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    suffix = Path(out).suffix.lower() if out else ""
    named = next((name for name, ext in FORMATS.items() if ext == suffix), None)
    if fmt and named and fmt != named:
        raise UsageError(f"--out {out} names a {named} file but --format is {fmt}: change one of them")
    chosen = fmt or named or "onnx"
    if chosen == "safetensors" and suffix == ".json":
        raise UsageError(f"--out {out}: a .json name is the safetensors sidecar's; name the .safetensors file")
    return chosen


def pick_weights(run: str | Path, which: str | None) -> Path:
    """The weights file to export: --weights best|last of a run folder, else best.pt (last.pt when best is missing)."""
    if which is None:
        return resolve_weights(run)
    if f"{which}.pt" not in WEIGHTS_NAMES:
        raise UsageError(f"--weights must be best or last, not {which!r}")
    path = Path(run)
    if path.is_file():
        raise UsageError(f"--weights {which} picks a file of a run folder, but {path} is a weights file: "
                         f"drop --weights or pass the run folder")
    if not path.is_dir():
        raise ImgrecError(f"no such run folder or weights file: {path}")
    chosen = path / "weights" / f"{which}.pt"
    if not chosen.is_file():
        raise ImgrecError(f"{path} holds no weights/{which}.pt; did its training finish an epoch?")
    return chosen


def output_path(out: str | Path | None, weights_path: Path, fmt: str) -> Path:
    """--out (a file, or a folder, existing or ending in /, to write <weights name>.<format> into), else beside the
    weights file."""
    name = weights_path.with_suffix(FORMATS[fmt]).name
    folder = out is not None and (Path(out).is_dir() or str(out).endswith(("/", os.sep)))
    target = weights_path.parent / name if out is None else Path(out) / name if folder else Path(out)
    if target.resolve() == weights_path.resolve():
        raise UsageError(f"--out {out} is the weights file being exported: choose another name")
    return target


def _probe_writable(target: Path) -> None:
    """Fail now, with one line, if the output's folder cannot be made or written to."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as exc:
        raise ImgrecError(f"cannot write {target}: {exc.strerror or exc}; choose another --out") from None


def check_images_of(cfg: RunConfig, ckpt: dict[str, Any], weights_path: Path, count: int, split: str | None = None,
                    source: DataSource | None = None) -> tuple[torch.Tensor, str]:
    """The first `count` images, uint8 (N, C, H, W) as decoded for the weights, of the run's validation split (the
    test split when it has none, or the split given), rebuilt as `imgrec evaluate` rebuilds its data."""
    try:
        bundle = load_run_data(cfg, ckpt, weights_path, source)
    except ImgrecError as exc:  # the run's data moved or is gone (not a mistake on this command line): exit 1
        raise ImgrecError(f"{exc} (the export is checked on the run's own images: make them available, or pass "
                          f"--check-images 0 to export unchecked)") from None
    name = split or ("val" if bundle.val is not None and len(bundle.val) else "test")
    try:
        chosen = bundle.split(name)
    except KeyError:
        raise ImgrecError(f"{cfg.data} has no {name} split") from None
    n = min(count, len(chosen))
    if n == 0:
        raise ImgrecError(f"the {name} split of {cfg.data} is empty: nothing to check the export on")
    if isinstance(chosen, ArraySplit):
        return chosen.images[:n], name
    return torch.stack([read_image(p, chosen.channels, chosen.image_size) for p in chosen.paths[:n]]), name


@torch.inference_mode()
def reference_logits(model: nn.Module, ckpt: dict[str, Any], images: torch.Tensor) -> np.ndarray:
    """PyTorch's logits for uint8 (N, C, H, W) images, preprocessed as `imgrec evaluate` does: float32 (N, K)."""
    transform = weights_transform(ckpt)
    model.eval()
    return torch.cat([model(transform(images[i:i + BATCH_SIZE])).float()
                      for i in range(0, len(images), BATCH_SIZE)]).numpy()


def compare_logits(what: str, reference: np.ndarray, candidate: np.ndarray, split: str) -> Parity:
    """Max |difference| (NaN counts as infinite) and top-1 agreement of two (N, K) logit arrays."""
    if reference.shape != candidate.shape:
        raise ImgrecError(f"{what} gave logits of shape {candidate.shape}, PyTorch {reference.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    max_diff = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
    agreement = float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()) if len(reference) else 1.0
    return Parity(what, len(reference), split, max_diff, agreement)
