"""imgrec: train, understand, compare and ship image classifiers with PyTorch and torchvision."""

from __future__ import annotations

__version__ = "0.1.0"
