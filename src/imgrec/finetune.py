"""Transfer learning, end to end: where a model's starting weights come from, the input they expect, and training
a head on backbone features computed once.

  resolve_source(cfg)   --pretrained: torchvision's ImageNet weights, from torch's cache ($TORCH_HOME/hub/checkpoints;
                        --download fetches them with torch.hub, hash checked); --weights: a torchvision state dict
                        file, or an imgrec run folder / weights file of the same model
  input_spec            the input a model takes (size, channels, mean/std): the weights', else the data's
  load_source           the source's backbone weights into a model built with a new head for the data
  fit_on_features       --freeze --cache-features: features of the training and validation images once, then the
                        engine trains only the head on them; the weights files still hold backbone and head

A file already in torch's cache is loaded as torch.hub loads it (weights only, so it cannot run code); its
SHA-256 is compared with the prefix in its name, and a mismatch is reported as a warning, not an error: a file
re-saved or converted by its owner is still usable, and the architecture check catches a wrong file.
This module joins config, data, models and engine, like workflows.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.data.info import ArraySplit, DatasetInfo, Split
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import BatchTransform
from imgrec.engine.checkpoint import load_checkpoint, resolve_weights
from imgrec.engine.system import EVAL_BATCH_SIZE, Compute, autocast
from imgrec.engine.trainer import FitResult, fit, inverse_frequency_weights
from imgrec.errors import ImgrecError
from imgrec.models.backbones import BACKBONES, check_backbone_state, pretrained_weights
from imgrec.models.transfer import TransferModel, load_backbone_state

log = logging.getLogger(__name__)

IMGREC_KEYS = ("model", "state_dict", "classes", "mean", "std", "image_size", "channels")


@dataclass
class InputSpec:
    """What a model takes: batches resized to `size`, converted to `channels`, normalised with mean/std."""

    size: tuple[int, int]
    channels: int
    mean: list[float]
    std: list[float]


@dataclass
class WeightSource:
    """Starting weights for a backbone: its tensors, where they came from, and the input they were trained on."""

    state: dict[str, torch.Tensor]
    description: str
    input: InputSpec


def resolve_source(cfg: RunConfig) -> WeightSource | None:
    """The weights --pretrained or --weights name, loaded; None when the model starts from random weights."""
    if cfg.pretrained:
        return pretrained_source(cfg.model, cfg.download)
    if cfg.weights is not None:
        return file_source(cfg.model, cfg.weights)
    return None


def hub_checkpoint_path(file_name: str) -> Path:
    """Where torch.hub keeps a downloaded weights file: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def pretrained_source(model: str, download: bool = False) -> WeightSource:
    """torchvision's default ImageNet weights of `model` from torch's cache (downloaded into it with `download`)."""
    spec = pretrained_weights(model)
    path = hub_checkpoint_path(spec.file_name)
    if path.is_file():
        _check_hash(path, spec.hash_prefix)
        state = load_checkpoint(path)
    elif download:
        state = _download(spec.url, path)
    else:
        raise ImgrecError(f"{model}'s ImageNet weights ({spec.enum}) are not in torch's cache: put {spec.file_name} "
                          f"from {spec.url} at {path}, or add --download (needs internet)")
    source = f"{spec.enum} ({path})"
    return WeightSource(_tensors_only(state, path), source,
                        InputSpec(spec.input_size, spec.channels, spec.mean, spec.std))


def _download(url: str, path: Path) -> dict[str, Any]:
    """torch.hub's download: into its cache, SHA-256 checked against the file name, loaded weights-only."""
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent), file_name=path.name,
                                                  check_hash=True, weights_only=True, progress=True)
    except (OSError, RuntimeError, ValueError) as exc:  # no network (URLError is an OSError), a hash mismatch
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ImgrecError(f"cannot download {url} ({first}); put the file at {path} by hand") from None


def _check_hash(path: Path, prefix: str | None) -> None:
    """Compare the file's SHA-256 with the prefix its name carries (torch.hub's naming); warn when they differ."""
    if not prefix:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        log.warning(f"warning: {path} is not the file torchvision published (its SHA-256 starts with "
                    f"{digest.hexdigest()[:len(prefix)]}, its name says {prefix}); loading it anyway")


def file_source(model: str, weights: str | Path) -> WeightSource:
    """--weights: an imgrec run folder or weights file of the same model, or a torchvision state dict file."""
    path = resolve_weights(weights)
    obj = load_checkpoint(path)
    if "state_dict" in obj and "model" in obj:
        return _imgrec_source(obj, path, model)
    state = _tensors_only(obj, path)
    spec = pretrained_weights(model)
    first_conv = state.get(BACKBONES[model].first_conv + ".weight")
    channels = int(first_conv.shape[1]) if first_conv is not None and first_conv.dim() == 4 else spec.channels
    # A torchvision state dict: trained as torchvision trains (ImageNet statistics, 224 px)
    return WeightSource(state, str(path), InputSpec(spec.input_size, channels, spec.mean, spec.std))


def _imgrec_source(ckpt: dict[str, Any], path: Path, model: str) -> WeightSource:
    missing = [k for k in IMGREC_KEYS if k not in ckpt]
    if missing:
        raise ImgrecError(f"{path} is not an imgrec weights file (missing {', '.join(missing)})")
    spec = ckpt["model"]
    if spec.get("name") != model:
        raise ImgrecError(f"{path} holds {spec.get('name')} weights, not {model}: use --model {spec.get('name')}, "
                          f"or weights of a {model}")
    size = ckpt.get("input_size") or ckpt["image_size"]
    channels = ckpt.get("input_channels") or spec["in_channels"]
    # The source run's preprocessing travels with its features: its statistics, channels and input size
    return WeightSource(ckpt["state_dict"], str(path),
                        InputSpec((int(size[0]), int(size[1])), int(channels), list(ckpt["mean"]), list(ckpt["std"])))


def _tensors_only(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ImgrecError(f"{path} is neither an imgrec weights file nor a torchvision state dict (a dict of tensors)")
    return obj


def input_spec(info: DatasetInfo, source: WeightSource | None) -> InputSpec:
    """What the model takes: the source weights' input, else the data as it is."""
    if source is not None:
        return source.input
    return InputSpec((int(info.image_size[0]), int(info.image_size[1])), info.channels, list(info.mean), list(info.std))


def load_source(model: nn.Module, name: str, source: WeightSource) -> None:
    """Load the source's backbone weights into a freshly built model `name` (its new head stays as built)."""
    assert isinstance(model, TransferModel), f"{name} has no backbone"
    check_backbone_state(name, model, source.state, source.description)
    load_backbone_state(model, source.state, source.description)


def transfer_plan(cfg: RunConfig, info: DatasetInfo, spec: InputSpec) -> str:
    """One log line on what transfer does in this run."""
    always = cfg.freeze or (cfg.freeze_epochs or 0) >= cfg.epochs
    frozen = ("frozen all through (only the head trains)" if always else
              f"frozen for {cfg.freeze_epochs} epoch(s), then trained at {cfg.lr_backbone_mult:g}-1x the head's rate")
    grey = " (grey images repeated to 3 channels)" if info.channels == 1 and spec.channels == 3 else ""
    return (f"transfer: new head for {info.num_classes} classes; backbone {frozen}; input "
            f"{spec.channels}x{spec.size[0]}x{spec.size[1]}{grey}, mean {_fmt(spec.mean)}, std {_fmt(spec.std)}")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


class HeadOnFeatures(nn.Module):
    """A TransferModel's head applied to cached features. Its state is the whole model's, so the weights files
    fit() writes hold backbone and head, and evaluate and predict load them like any other run's."""

    def __init__(self, model: TransferModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(features)  # (B, feature_dim) -> (B, num_classes)

    def set_frozen(self, frozen: bool) -> None:
        self.model.set_frozen(True)  # cached features are only valid for a backbone that never changes

    def parameter_groups(self, lr: float, backbone_mult: float) -> list[dict[str, Any]]:
        return self.model.parameter_groups(lr, backbone_mult)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)


@torch.inference_mode()
def extract_features(model: TransferModel, loader: Any, compute: Compute) -> torch.Tensor:
    """The backbone's features of every image a loader yields, in order, in eval mode: (N, feature_dim) on the CPU."""
    model.to(device=compute.device, memory_format=compute.memory_format).eval()
    chunks = []
    with autocast(compute.device, compute.dtype):
        for x, _ in loader:
            chunks.append(model.features(x.to(compute.device, memory_format=compute.memory_format)).float().cpu())
    return torch.cat(chunks)


def fit_on_features(model: TransferModel, train: Split, val: Split | None, transform: BatchTransform, cfg: RunConfig,
                    run_dir: Path, meta: dict[str, Any], compute: Compute | None = None,
                    batch_size: int = EVAL_BATCH_SIZE) -> tuple[FitResult, float]:
    """--cache-features: features computed once (no augmentation), the head fitted on them; (result, seconds)."""
    start = time.perf_counter()
    compute = compute or Compute.of(cfg)
    model.set_frozen(True)
    splits = {"train": train, "val": val}
    features = {name: extract_features(model, make_loader(split, batch_size, transform, train=False,
                                                          workers=cfg.workers), compute)
                for name, split in splits.items() if split is not None}
    seconds = time.perf_counter() - start
    log.info(f"feature cache: {len(train)} training and {len(val) if val else 0} validation images through the "
             f"backbone once ({seconds:.1f}s); epochs train the head alone, without augmentation")
    model.train()

    def unchanged(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    # Same seed, same batches: make_loader draws them as it does for the images
    train_loader = make_loader(ArraySplit(features["train"], train.labels), cfg.batch_size, unchanged,  # type: ignore[arg-type]
                               train=True, seed=cfg.seed, balanced=cfg.balance == "sampler")
    val_loader = (make_loader(ArraySplit(features["val"], val.labels), batch_size, unchanged, train=False)  # type: ignore[arg-type]
                  if val is not None else None)
    vectors = dataclasses.replace(cfg, channels_last=False)  # features are (B, D) vectors: no memory format
    weights = inverse_frequency_weights(train.labels, len(meta["classes"])) if cfg.balance == "weights" else None
    return fit(HeadOnFeatures(model), train_loader, val_loader, vectors, run_dir, meta, class_weights=weights,
               compute=dataclasses.replace(compute, memory_format=torch.contiguous_format)), seconds
