"""imgrec: train, understand, compare and ship image classifiers with PyTorch and torchvision.

From Python: `run = imgrec.train(data, model=..., epochs=...)`, `imgrec.load(run_folder)`, `imgrec.compare(*runs)`,
`imgrec.Predictor`, `imgrec.lr_find(data, model=...).suggestion`.
These (the names in `_LAZY`) load on first use, so `import imgrec` and `imgrec --help` stay free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from imgrec.api import Run, compare, load, lr_find, train
    from imgrec.inference import Failure, Prediction, Predictor

_LAZY = {"Predictor": "imgrec.inference", "Prediction": "imgrec.inference", "Failure": "imgrec.inference",
         "train": "imgrec.api", "load": "imgrec.api", "compare": "imgrec.api", "Run": "imgrec.api",
         "lr_find": "imgrec.api"}
__all__ = ["Failure", "Prediction", "Predictor", "Run", "__version__", "compare", "load", "lr_find", "train"]


def __getattr__(name: str) -> Any:
    """Import the heavy public names (torch) only when they are first used."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imgrec' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names only (not the helpers this module imports for itself)."""
    return sorted(__all__)
