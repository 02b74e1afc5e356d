"""--keep-hardest: train on the images a cheap proxy net finds hardest.

Before the run, a proxy (a small net built by the caller: --proxy-model, an MLP by default) trains PROXY_EPOCHS
epochs on every training image, then scores each one by its cross-entropy, in order; the run trains on the given
fraction of each class with the highest loss (the easy images it would learn anyway are left out, so an epoch is
shorter and a time budget fits more of them). The choice is saved in the run folder (selection.json) for --resume,
which trains on exactly the same images. Its measured effect is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgrec.engine.system import Compute, autocast
from imgrec.engine.trainer import Loader, evaluate
from imgrec.errors import ImgrecError

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"
PROXY_EPOCHS = 2
PROXY_BATCH = 512
PROXY_LR = 0.2  # the one-cycle schedule's peak, SGD with Nesterov momentum
PROXY_SIZE = 32  # larger images are average-pooled to at most this many pixels a side for the proxy


@dataclass(frozen=True)
class Selection:
    """The training images kept: `kept` (sorted indices into the training split) of `total`."""

    fraction: float
    total: int
    kept: torch.Tensor
    seconds: float  # the proxy's training and scoring

    def to_dict(self) -> dict[str, Any]:
        mask = np.zeros(self.total, dtype=bool)
        mask[self.kept.numpy()] = True
        return {"keep_hardest": self.fraction, "train_images": self.total, "kept": len(self.kept),
                "proxy_seconds": round(self.seconds, 2),
                "kept_images": base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")}

    def describe(self) -> str:
        return (f"keep-hardest: a proxy trained {PROXY_EPOCHS} epochs on all {self.total:,} training images and "
                f"scored them in {self.seconds:.1f} s; training on the {self.fraction:.0%} hardest of each class: "
                f"{len(self.kept):,} images")


def proxy_input(image_size: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) the proxy sees: the images' own, or average-pooled down to at most PROXY_SIZE a side."""
    h, w = image_size
    scale = max(h, w) / PROXY_SIZE
    return (h, w) if scale <= 1 else (max(1, round(h / scale)), max(1, round(w / scale)))


def choose_hardest(make_proxy: Callable[[], nn.Module], train_loader: Loader, score_loader: Loader, labels: torch.Tensor,
                   fraction: float, compute: Compute, seed: int) -> Selection:
    """Build the proxy and train it on train_loader (shuffled, every image), score every image of score_loader (in
    the split's order) and keep the `fraction` of each class with the highest loss (at least one image a class).
    The proxy's initialisation is seeded; the caller's random generator is left as it was."""
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proxy = make_proxy()
        _train_proxy(proxy, train_loader, compute)
        scored = evaluate(proxy, score_loader, compute.device, compute.dtype, compute.memory_format, collect=True)
    assert scored.logits is not None and scored.targets is not None
    losses = nn.functional.cross_entropy(scored.logits, scored.targets, reduction="none")
    kept = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        hardest = losses[members].argsort(descending=True, stable=True)
        kept.append(members[hardest[:max(1, round(fraction * len(members)))]])
    return Selection(fraction, len(labels), torch.cat(kept).sort().values, time.perf_counter() - started)


def _train_proxy(proxy: nn.Module, loader: Loader, compute: Compute) -> None:
    proxy.to(compute.device).train()
    steps = PROXY_EPOCHS * len(loader)
    optimizer = torch.optim.SGD(proxy.parameters(), lr=PROXY_LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, PROXY_LR, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for _ in range(PROXY_EPOCHS):
        for x, y in loader:
            x = x.to(compute.device, memory_format=compute.memory_format)
            with autocast(compute.device, compute.dtype):
                loss = loss_fn(proxy(x).float(), y.to(compute.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def read_selection(path: Path, total: int, fraction: float) -> Selection:
    """A run's saved selection, checked against its training split; a missing or hand-edited file is an error."""
    try:
        record = json.loads(path.read_text())
        mask = np.unpackbits(np.frombuffer(base64.b64decode(record["kept_images"], validate=True), dtype=np.uint8))
        if record["train_images"] != total:
            raise ValueError(f"it is for {record['train_images']} training images, this split has {total}")
        if len(mask) != -(-total // 8) * 8 or mask[total:].any():
            raise ValueError("its kept_images are not one bit for each training image")
        kept = torch.from_numpy(np.flatnonzero(mask[:total]))
        if record["kept"] != len(kept) or record["keep_hardest"] != fraction or not len(kept):
            raise ValueError("its counts do not match its images")
    except FileNotFoundError:
        raise ImgrecError(f"{path} is missing: the run's --keep-hardest images cannot be resumed without it") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # binascii and JSON errors are ValueErrors
        raise ImgrecError(f"{path} is not the selection this run saved ({exc})") from None
    return Selection(fraction, total, kept, float(record.get("proxy_seconds", 0.0)))
