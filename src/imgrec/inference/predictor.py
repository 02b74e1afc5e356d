"""Predictor: a weights file -> the same preprocessing as training -> the model -> top-k labels and "none of my classes".

Everything comes from the weights file: the model, its classes, channels, image size, mean and std, and, when
training recorded them, the background of its images, the objects' extent, the out-of-distribution threshold
and a temperature. Files are decoded by the training decoder (data.imageio); photos for grey models trained on
light strokes on a dark background are converted like their data (data.photo). Images are predicted in
batches; `predict_batch` is the vectorised core (uint8 batch in, tensors out).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgrec.data.imageio import ImageDecodeError, image_to_tensor, load_image, resize_center, to_mode
from imgrec.data.photo import prepare_photo
from imgrec.data.transforms import convert_channels, resize
from imgrec.engine.checkpoint import check_weights_meta, load_model_state, load_weights_file, resolve_weights
from imgrec.engine.system import select_device
from imgrec.errors import ImgrecError
from imgrec.evaluation.ood import OOD_SCORES
from imgrec.inference.inputs import to_pil
from imgrec.inference.results import BatchPrediction, Failure, Prediction
from imgrec.models.registry import build_model

log = logging.getLogger(__name__)

DEFAULT_TOPK = 3
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input, as the weights file records it."""

    channels: int
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    photo: bool  # convert photos like the training images (grey models trained on a dark background)
    object_extent: float  # how much of the frame the training images' objects span
    object_centred: bool  # whether they sit in the middle (else photos are not cropped and centred)
    input_size: tuple[int, int] | None = None  # what the model takes, when not the decoded size (pretrained backbones)
    input_channels: int | None = None  # likewise for channels (grey images fed to a colour backbone)

    def to_image(self, image: Image.Image) -> Image.Image:
        """A decoded image in any mode -> the model's mode and size (photo conversion when it applies)."""
        image = to_mode(image, self.channels)
        if self.photo:
            return prepare_photo(image, self.image_size, self.object_extent, self.object_centred)
        return resize_center(image, self.image_size)


@dataclass(frozen=True)
class OodRule:
    """The out-of-distribution score and the threshold set on held-out images at train time."""

    score: str
    threshold: float


class Predictor:
    """Predict classes of images with a trained model; build it with Predictor.from_run(path)."""

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], preprocessing: Preprocessing, *,
                 ood: OodRule | None = None, temperature: float | None = None, device: str | torch.device = "cpu",
                 channels_last: bool = False, notes: Sequence[str] = ()) -> None:
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.ood = ood
        self.temperature = temperature
        self.notes = list(notes)
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(preprocessing.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std  # (x / 255 - mean) / std as one multiply-add

    @classmethod
    def from_run(cls, run_or_weights: str | Path, device: str = "auto", auto_preprocess: bool = True) -> Predictor:
        """From a run folder (its best weights) or a weights file; notes on what the file lacks are logged once."""
        path = resolve_weights(run_or_weights)
        return cls.from_checkpoint(load_weights_file(path), source=str(path), device=device,
                                   auto_preprocess=auto_preprocess)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], source: str = "the weights", device: str = "auto",
                        auto_preprocess: bool = True) -> Predictor:
        """From a loaded imgrec weights file (a dict, see engine.checkpoint)."""
        check_weights_meta(ckpt, source)
        spec = ckpt["model"]
        model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"])
        load_model_state(model, ckpt["state_dict"], source)
        notes: list[str] = []
        preprocessing = _preprocessing(ckpt, source, auto_preprocess, notes)
        predictor = cls(model, ckpt["classes"], preprocessing, ood=_ood_rule(ckpt, source, notes),
                        temperature=_temperature(ckpt, source, notes), device=select_device(device),
                        channels_last=bool((ckpt.get("config") or {}).get("channels_last", True)), notes=notes)
        for note in notes:
            log.warning(note)
        return predictor

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's input."""
        return (self.preprocessing.channels, *self.preprocessing.image_size)

    def prepare(self, image: object) -> torch.Tensor:
        """One image (a path, PIL image, numpy array or uint8 tensor) -> the model's input, uint8 (C, H, W)."""
        if isinstance(image, (str, Path)):
            decoded = load_image(image, self.preprocessing.channels)
        else:
            decoded = to_pil(image)
        try:
            return image_to_tensor(self.preprocessing.to_image(decoded))
        except (OSError, SyntaxError, ValueError) as exc:  # a lazily loaded PIL image that turns out damaged
            raise ImageDecodeError(f"{image}: cannot decode image ({exc})") from None

    @torch.inference_mode()
    def predict_batch(self, batch: torch.Tensor, topk: int = DEFAULT_TOPK) -> BatchPrediction:
        """Model inputs, uint8 (B, C, H, W) -> predictions as tensors (on the CPU)."""
        if batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"expected a uint8 batch (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {batch.dtype} {tuple(batch.shape)}")
        x = batch.to(self.device, non_blocking=True).float()
        if self.preprocessing.input_size is not None:
            x = resize(x, self.preprocessing.input_size)
        if self.preprocessing.input_channels is not None:
            x = convert_channels(x, self.preprocessing.input_channels)
        x = torch.addcmul(self._shift, x, self._scale).contiguous(memory_format=self.memory_format)
        logits = self.model(x).float()  # (B, C, H, W) -> (B, num_classes), raw
        scores = OOD_SCORES[self.ood.score](logits) if self.ood else torch.logsumexp(logits, dim=1)
        probabilities = torch.softmax(logits / self.temperature if self.temperature else logits, dim=1)
        top_p, top_i = probabilities.topk(min(topk, len(self.classes)), dim=1)
        in_distribution = scores >= self.ood.threshold if self.ood else None
        if in_distribution is not None and self.preprocessing.photo:
            # the photo conversion found nothing standing out of the background (a blank or pure-noise image)
            in_distribution &= batch.flatten(1).amax(dim=1).to(self.device) > 0
        return BatchPrediction(top_i[:, 0].cpu(), top_p[:, 0].cpu(), top_i.cpu(), top_p.cpu(), scores.cpu(),
                               in_distribution.cpu() if in_distribution is not None else None)

    def predict(self, images: object, topk: int = DEFAULT_TOPK, batch_size: int = DEFAULT_BATCH_SIZE) -> list[Prediction]:
        """Predict one image or many: paths, PIL images, numpy arrays, uint8 tensors; a bad file raises, naming it.

        A uint8 tensor (B, C, H, W) of the model's input shape is taken as ready input (as a data set's own
        tensors are) and goes straight to the model; everything else is prepared image by image first.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4 and tuple(images.shape[1:]) == self.input_shape:
            results: list[Prediction] = []
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                sources = [f"<tensor {i}>" for i in range(start, start + len(chunk))]
                results += self._to_predictions(self.predict_batch(chunk, topk), sources)
            return results
        items = _as_list(images)
        sources = [str(item) if isinstance(item, (str, Path)) else f"<{_kind(item)} {i}>" for i, item in enumerate(items)]
        results = []
        for start in range(0, len(items), batch_size):
            batch = torch.stack([self.prepare(item) for item in items[start:start + batch_size]])
            results += self._to_predictions(self.predict_batch(batch, topk), sources[start:start + batch_size])
        return results

    def predict_files(self, paths: Sequence[str | Path], topk: int = DEFAULT_TOPK, batch_size: int = DEFAULT_BATCH_SIZE,
                      keep_inputs: bool = False) -> Iterator[Prediction | Failure]:
        """Predict files in batches, in order; a file that cannot be read yields a Failure and the rest go on."""
        for start in range(0, len(paths), batch_size):
            chunk = [str(p) for p in paths[start:start + batch_size]]
            prepared: list[torch.Tensor | Failure] = []
            for path in chunk:
                try:
                    prepared.append(self.prepare(path))
                except ImgrecError as exc:
                    prepared.append(Failure(path, str(exc)))
            good = [i for i, item in enumerate(prepared) if not isinstance(item, Failure)]
            inputs = [prepared[i] for i in good]
            predictions = iter(self._to_predictions(self.predict_batch(torch.stack(inputs), topk), [chunk[i] for i in good],
                                                    inputs if keep_inputs else None) if inputs else [])
            for item in prepared:
                yield item if isinstance(item, Failure) else next(predictions)

    def _to_predictions(self, batch: BatchPrediction, sources: Sequence[str],
                        inputs: Sequence[torch.Tensor] | None = None) -> list[Prediction]:
        """Tensors -> one Prediction per image (plain Python numbers)."""
        top_i, top_p = batch.topk_indices.tolist(), batch.topk_probabilities.tolist()
        scores = batch.ood_scores.tolist()
        flags = batch.in_distribution.tolist() if batch.in_distribution is not None else [None] * len(batch)
        classes = self.classes
        return [
            Prediction(source, classes[idx[0]], idx[0], prob[0], tuple((classes[i], p) for i, p in zip(idx, prob)),
                       flag, score, inputs[n] if inputs is not None else None)
            for n, (source, idx, prob, score, flag) in enumerate(zip(sources, top_i, top_p, scores, flags))
        ]


def _as_list(images: object) -> list[Any]:
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, torch.Tensor):
        return list(images) if images.ndim == 4 else [images]
    return list(images)  # type: ignore[call-overload]


def _kind(item: object) -> str:
    for kind, name in ((Image.Image, "image"), (np.ndarray, "array"), (torch.Tensor, "tensor")):
        if isinstance(item, kind):
            return name
    return "input"


def _preprocessing(ckpt: dict[str, Any], source: str, auto: bool, notes: list[str]) -> Preprocessing:
    channels, size = int(ckpt["channels"]), (int(ckpt["image_size"][0]), int(ckpt["image_size"][1]))
    background, extent = ckpt.get("background"), ckpt.get("object_extent")
    photo = auto and channels == 1 and background == "dark" and isinstance(extent, (int, float)) and 0 < extent <= 1
    if auto and channels == 1 and (background is None or extent is None):
        notes.append(f"{source} does not record its training images' background: photos are not converted "
                     f"(inverted, cropped, centred) for this grey model; retrain with this imgrec to get that")
    input_size = ckpt.get("input_size")
    return Preprocessing(channels, size, tuple(ckpt["mean"]), tuple(ckpt["std"]), photo,
                         float(extent) if photo else 1.0, bool(ckpt.get("object_centred", True)),
                         (int(input_size[0]), int(input_size[1])) if input_size else None, ckpt.get("input_channels"))


def _ood_rule(ckpt: dict[str, Any], source: str, notes: list[str]) -> OodRule | None:
    entry = ckpt.get("ood")
    if (isinstance(entry, dict) and entry.get("score") in OOD_SCORES and isinstance(entry.get("threshold"), float)
            and math.isfinite(entry["threshold"])):
        return OodRule(entry["score"], entry["threshold"])
    notes.append(f"{source} holds no out-of-distribution threshold: every image is taken as one of its classes "
                 f"(in_distribution is null); retrain with this imgrec to get one")
    return None


def _temperature(ckpt: dict[str, Any], source: str, notes: list[str]) -> float | None:
    value = ckpt.get("temperature")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    notes.append(f"{source} holds an invalid temperature ({value!r}): probabilities are not rescaled")
    return None
