"""ONNX: the graph a shipped model runs (uint8 images in, logits and probabilities out, imgrec's preprocessing
inside), its metadata, the checker, and running it with onnxruntime.

The graph takes images as they are decoded, uint8 (N, H, W, C) at the weights file's image_size and channels, with
a dynamic batch axis. Inside it: cast to float, NHWC -> NCHW, the resize and channel conversion pretrained
backbones need (data.transforms, the functions training and `predict` use), x / 255, (x - mean) / std, the model.
Outputs: "logits" (N, K), raw, and "probabilities" (N, K) = softmax(logits / temperature), with the temperature
fitted after training (1 when the weights file has none).

The file is written by torch.onnx.export with dynamo=True (torch.export; needs onnxscript): the default and
maintained exporter of torch 2.14. The TorchScript exporter (dynamo=False) warns that it will be removed and traces
Python shape arithmetic into tensors (TransferModel's upsampling of small inputs fails under it).
Imports: torch, numpy, imgrec.data.transforms, imgrec.export.common; onnx, onnxruntime through `requires`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from imgrec.data.transforms import convert_channels, resize
from imgrec.errors import ImgrecError
from imgrec.export.common import requires

OPSET = 18  # Resize with antialias (a shrinking resize) needs opset 18; onnxruntime has run it since 1.14
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
EXAMPLE_BATCH = 2  # torch.export specialises a batch axis whose example size is 1; 2 keeps it dynamic
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
# metadata_props are strings: these hold JSON (lists, numbers); the others are plain text
JSON_KEYS = ("classes", "image_size", "channels", "input_size", "input_channels", "num_classes", "mean", "std",
             "temperature", "ood_threshold")


class ExportGraph(nn.Module):
    """uint8 images (N, H, W, C) -> (logits, probabilities): a weights file's preprocessing, then its model."""

    def __init__(self, model: nn.Module, fields: dict[str, Any]) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(fields["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(fields["std"], dtype=torch.float32).view(1, -1, 1, 1))
        self.input_size = tuple(int(v) for v in fields["input_size"])
        self.input_channels = int(fields["input_channels"])
        self.temperature = float(fields.get("temperature") or 1.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float()  # uint8 (N, H, W, C) -> float (N, C, H, W)
        x = resize(x, self.input_size)  # a no-op unless the model takes another size (pretrained backbones)
        x = convert_channels(x, self.input_channels)  # likewise: grey images fed to a colour backbone
        x = (x / 255.0 - self.mean) / self.std
        logits = self.model(x)  # (N, C', H', W') -> (N, K)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def onnx_metadata(fields: dict[str, Any]) -> dict[str, str]:
    """The metadata_props of an exported file: how to feed it and read its outputs, and where it came from."""
    ood = fields.get("ood") or {}
    values: dict[str, Any] = {
        "model": fields["model"]["name"], "num_classes": fields["model"]["num_classes"], "data": fields.get("data"),
        "classes": fields["classes"], "image_size": fields["image_size"], "channels": fields["channels"],
        "input_size": fields["input_size"], "input_channels": fields["input_channels"],
        "mean": fields["mean"], "std": fields["std"], "temperature": fields.get("temperature"),
        "ood_score": ood.get("score"), "ood_threshold": ood.get("threshold"),
        "input": f"{INPUT_NAME}: uint8 (N, H, W, C) = (N, {fields['image_size'][0]}, {fields['image_size'][1]}, "
                 f"{fields['channels']}); normalised inside the graph",
        "outputs": "logits: raw (N, num_classes); probabilities: softmax(logits / temperature), temperature 1 when "
                   "absent; ood: in distribution when score(logits) >= ood_threshold (energy = logsumexp(logits))",
        "imgrec_version": fields["exported_by"].split()[-1],
    }
    return {key: json.dumps(value) if key in JSON_KEYS else str(value)
            for key, value in values.items() if value is not None}


def read_onnx_metadata(source: str | bytes) -> dict[str, Any]:
    """An exported file's metadata (a path or the file's bytes), JSON values decoded."""
    onnx = requires("onnx")
    proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return {key: json.loads(value) if key in JSON_KEYS else value for key, value in props.items()}


def onnx_bytes(model: nn.Module, fields: dict[str, Any]) -> bytes:
    """Export the model with its preprocessing (ExportGraph) to ONNX, add the metadata, check it: the file's bytes."""
    requires("onnxscript")  # the dynamo exporter translates with it
    onnx = requires("onnx")
    graph = ExportGraph(model, fields).eval()
    height, width = (int(v) for v in fields["image_size"])
    example = torch.randint(0, 256, (EXAMPLE_BATCH, height, width, int(fields["channels"])), dtype=torch.uint8)
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's concern
            program = torch.onnx.export(graph, (example,), dynamo=True, verbose=False, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                                        external_data=False)
    except Exception as exc:  # the exporter raises many types; the user needs the first line of its reason
        raise ImgrecError(f"cannot export {fields['model']['name']} to ONNX: {_first_line(exc)}") from exc
    proto = program.model_proto
    onnx.helper.set_model_props(proto, onnx_metadata(fields))
    proto.producer_name = "imgrec"
    proto.producer_version = fields["exported_by"].split()[-1]
    try:
        onnx.checker.check_model(proto, full_check=True)
        return proto.SerializeToString()
    except (onnx.checker.ValidationError, ValueError) as exc:  # ValueError: over protobuf's 2 GB
        raise ImgrecError(f"the exported ONNX graph of {fields['model']['name']} is not valid: "
                          f"{_first_line(exc)}") from exc


def onnx_session(model: bytes | str, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU for an exported file (its path or bytes); threads: onnxruntime's choice."""
    ort = requires("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no notes on the graph on stderr
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ImgrecError(f"onnxruntime cannot load the exported file: {_first_line(exc)}") from exc


def run_onnx(session: Any, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) images through an exported file in batches -> (logits, probabilities), float32 (N, K)."""
    logits, probabilities = [], []
    for start in range(0, len(images), batch_size):
        out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images[start:start + batch_size])})
        logits.append(out[0])
        probabilities.append(out[1])
    return np.concatenate(logits), np.concatenate(probabilities)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's optimiser logs every pass at INFO ("No unused functions to remove"): keep those off stderr."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
