"""Prediction on the user's own images: Predictor (weights file -> preprocessing -> model -> labels), its inputs,
results and output formats, and the post-training step that stores what prediction needs in the weights files.

May import data, models, engine and evaluation; never workflows or the CLI (workflows calls in here).
"""

from __future__ import annotations

from imgrec.inference.inputs import expand_paths
from imgrec.inference.predictor import Predictor, Preprocessing
from imgrec.inference.results import BatchPrediction, Failure, Prediction

__all__ = ["BatchPrediction", "Failure", "Prediction", "Predictor", "Preprocessing", "expand_paths"]
