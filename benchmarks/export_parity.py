"""ONNX export of a Fashion-MNIST LeNet: parity with PyTorch on 1,000 test images, and onnxruntime vs PyTorch speed.

Trains a quick LeNet on Fashion-MNIST (1 epoch on 10,000 images), or takes --run, then:
  export   `imgrec export` (export_run): the ONNX file, checked on 256 validation images as the command does
  parity   onnxruntime (CPUExecutionProvider) vs PyTorch on the first --images TEST images: max |logit difference|
           and top-1 agreement (required: under 1e-4 and 100%; the script exits 1 otherwise)
  speed    images/s at batch 1 (one call per image) and batch 256 over the same images, median and best of
           --repeats passes, for onnxruntime (uint8 NHWC in, the graph's preprocessing included) and for PyTorch
           (uint8 NCHW -> imgrec's preprocessing -> model -> softmax, as the graph does), contiguous and channels-last,
           with the same thread count on both sides.

    OMP_NUM_THREADS=1 python benchmarks/export_parity.py --data-dir ../shared/data --threads 1 \
        --json benchmarks/export_parity-fashion-mnist-threads1.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch
from common import (  # benchmarks/common.py (a script's folder is on its path)
    cpu_name,
    load_average,
    quick_run,
)

from imgrec.data.transforms import weights_transform
from imgrec.engine.system import versions
from imgrec.export.onnx_file import onnx_session, run_onnx
from imgrec.export.runner import ONNX_TOLERANCE, check_images_of, compare_logits, export_run, reference_logits
from imgrec.workflows import load_run


def images_per_second(fn: Callable[[], None], count: int, repeats: int) -> dict[str, float]:
    """Median and best images/s of `repeats` passes of fn (after one warm-up pass)."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"median": round(count / statistics.median(seconds), 1), "best": round(count / min(seconds), 1)}


def speed(session: object, model: torch.nn.Module, ckpt: dict, images: torch.Tensor, batch_size: int,
          repeats: int) -> dict[str, dict[str, float]]:
    """onnxruntime and PyTorch (contiguous, channels-last) images/s over the images at this batch size."""
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    transform = weights_transform(ckpt)
    batches = range(0, len(images), batch_size)

    def ort() -> None:
        for start in batches:
            run_onnx(session, nhwc[start:start + batch_size], batch_size)

    def pytorch(memory: torch.memory_format) -> Callable[[], None]:
        net = model.to(memory_format=memory)

        @torch.inference_mode()
        def run() -> None:
            for start in batches:
                x = transform(images[start:start + batch_size]).contiguous(memory_format=memory)
                torch.softmax(net(x), dim=1)

        return run

    return {"onnxruntime": images_per_second(ort, len(images), repeats),
            "pytorch_contiguous": images_per_second(pytorch(torch.contiguous_format), len(images), repeats),
            "pytorch_channels_last": images_per_second(pytorch(torch.channels_last), len(images), repeats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a Fashion-MNIST run folder or weights file (default: train a quick LeNet)")
    parser.add_argument("--data-dir", default=os.environ.get("IMGREC_DATA", "../shared/data"))
    parser.add_argument("--threads", type=int, required=True, help="CPU threads of torch and onnxruntime")
    parser.add_argument("--images", type=int, default=1000, help="test images compared and timed (default: 1000)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {"load_average_before": load_average(), "threads": args.threads,
                                  "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                                  "versions": {**versions(), "onnxruntime": onnxruntime.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or quick_run(args.data_dir, args.threads, tmp, "export")
        started = time.perf_counter()
        outcome = export_run(run, "onnx", out=Path(tmp) / "lenet.onnx")
        results["export_seconds"] = round(time.perf_counter() - started, 2)
        results["export_check"] = outcome.parity.summary() if outcome.parity else None
        weights, ckpt, cfg, model = load_run(outcome.weights)
        images, split = check_images_of(cfg, ckpt, weights, args.images, split="test")
        session = onnx_session(str(outcome.path), threads=args.threads)
        logits, _ = run_onnx(session, images.permute(0, 2, 3, 1).numpy())
        parity = compare_logits("onnxruntime", reference_logits(model, ckpt, images), logits, split)
        results["parity"] = {"images": parity.count, "split": split, "max_abs_diff": parity.max_abs_diff,
                             "top1_agreement": parity.agreement}
        print(f"export ({results['export_seconds']} s): {results['export_check']}")
        print(f"parity: {parity.summary()}")
        for batch_size in (1, 256):
            results[f"batch_{batch_size}"] = speed(session, model.eval(), ckpt, images, batch_size, args.repeats)
            print(f"batch {batch_size}: " + ", ".join(f"{k} {v['median']:,.0f} img/s (best {v['best']:,.0f})"
                                                      for k, v in results[f"batch_{batch_size}"].items()))
    results["load_average_after"] = load_average()
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if parity.max_abs_diff < ONNX_TOLERANCE and parity.agreement == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
