"""Test-time augmentation only where the model is unsure: accuracy and time of each --tta mode on a trained run.

For a run's weights/last.pt, the test split is evaluated with one view (none), flip (2), flip-translate (6) and
unsure (one view, and flip-translate's 6 only for the least confident fraction of each batch) at several
fractions, on the run's precision and memory layout. Prints one line per mode and writes --json.

    PYTHONPATH=src python benchmarks/tta_unsure.py runs/fashion-mnist-airnet-small --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from imgrec import saved_runs
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import weights_transform
from imgrec.engine import trainer
from imgrec.engine.system import autocast_dtype, select_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data-dir")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path, ckpt, cfg, model = saved_runs.load_run(args.run, data_dir=args.data_dir)
    bundle = saved_runs.load_run_data(cfg, ckpt, path)
    loader = make_loader(bundle.test, 500, weights_transform(ckpt), train=False, workers=0)
    device = select_device("cpu")
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    dtype = autocast_dtype(cfg.precision, device)
    rows = []
    modes = [("none", None), ("flip", None), ("flip-translate", None)] + [("unsure", t) for t in args.fractions]
    for mode, threshold in modes:
        if threshold is not None:
            trainer.UNSURE_FRACTION = threshold
        start = time.perf_counter()
        result = trainer.evaluate(model, loader, device, dtype, layout, tta=mode)
        seconds = time.perf_counter() - start
        views = {"none": 1, "flip": 2, "flip-translate": 6}.get(mode) or 1 + 6 * threshold
        rows.append({"mode": mode, "fraction": threshold, "accuracy": result.accuracy, "seconds": round(seconds, 2),
                     "views_per_image": round(views, 3)})
        print(f"{mode:>15} {'' if threshold is None else threshold:>5} accuracy {result.accuracy:.2%}  {seconds:.1f} s"
              f"  {views:.2f} views an image", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": str(path), "images": len(bundle.test), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
