"""`imgrec show`: a grid of a data set's images with their labels, as loaded (or as training augments them)."""

from __future__ import annotations

import logging
from pathlib import Path

from imgrec.config import RunConfig
from imgrec.data.datasets import load_data
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import BatchTransform, denormalize, parse_augment
from imgrec.data.verify import skipped_warning
from imgrec.errors import ImgrecError
from imgrec.saved_runs import data_options

log = logging.getLogger(__name__)


def show_samples(cfg: RunConfig, out: str | Path, n: int = 32, split: str = "train", augmented: bool = False) -> Path:
    """A PNG grid of de-normalised images with their labels (optionally as training augments them)."""
    bundle = load_data(cfg.data, data_options(cfg, train_samples=None))
    if bundle.skipped:
        log.warning(skipped_warning(bundle.skipped))
    info = bundle.info
    try:
        chosen = bundle.split(split)
    except KeyError:
        raise ImgrecError(f"{cfg.data} has no {split} split") from None
    augment = parse_augment(cfg.augment, info.channels) if augmented else []
    # train=True: a shuffled sample; augmentation only when asked for (augment is empty otherwise)
    loader = make_loader(chosen, min(n, len(chosen)), BatchTransform(info.mean, info.std, augment), train=True,
                         seed=cfg.seed, workers=0)
    loader.set_epoch(1)
    x, y = next(iter(loader))
    images = denormalize(x, info.mean, info.std).numpy()
    titles = [info.classes[int(label)] for label in y]
    from imgrec.evaluation.plots import plot_image_grid

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return plot_image_grid(images, titles, out)
