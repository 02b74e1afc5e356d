"""The tutorial's Fashion-MNIST pipeline and imgrec, side by side in one process, on the same model.

The tutorial's pipeline: torchvision FashionMNIST with per-sample ToTensor + Normalize([0.5], [0.5]) through a
DataLoader (batch 100, shuffled), Adam, the test set evaluated after every epoch. imgrec: exactly
`imgrec train --data fashion-mnist --model MODEL --epochs N` (batch 100, Adam 1e-3, 10% of the training set
held out for validation, the test set evaluated once at the end).

Both sides build the model from imgrec's registry with the same seed and use the same optimiser settings.
Printed per model: training images/s of both, their ratio, total wall time of both, and test accuracy.

    python benchmarks/tutorial_vs_imgrec.py --data-dir ../shared/data --models mlp lenet --epochs 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from imgrec.config import RunConfig
from imgrec.engine.system import versions
from imgrec.models.registry import build_model
from imgrec.workflows import train as imgrec_train


def tutorial_run(model_name: str, data_dir: str, epochs: int, lr: float, batch_size: int = 100) -> dict:
    """The tutorial's training loop, as written there (per-sample transforms, .item() per step)."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    training_dataset = datasets.FashionMNIST(root=data_dir, train=True, download=False, transform=transform)
    validation_dataset = datasets.FashionMNIST(root=data_dir, train=False, download=False, transform=transform)
    training_loader = torch.utils.data.DataLoader(training_dataset, batch_size=batch_size, shuffle=True)
    validation_loader = torch.utils.data.DataLoader(validation_dataset, batch_size=batch_size, shuffle=False)
    torch.manual_seed(0)
    model = build_model(model_name, 10, 1, (28, 28))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    train_seconds = 0.0
    val_acc = 0.0
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        model.train()
        running_loss, running_corrects = 0.0, 0.0
        for inputs, labels in training_loader:
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _, preds = torch.max(outputs, 1)
            running_loss += loss.item()
            running_corrects += torch.sum(preds == labels.data)
        train_seconds += time.perf_counter() - epoch_start
        model.eval()
        val_corrects = 0.0
        with torch.no_grad():
            for val_inputs, val_labels in validation_loader:
                val_outputs = model(val_inputs)
                _, val_preds = torch.max(val_outputs, 1)
                val_corrects += torch.sum(val_preds == val_labels.data)
        val_acc = float(val_corrects) / len(validation_dataset)
    return {
        "train_images": len(training_dataset), "epochs": epochs, "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start, "test_accuracy": val_acc,
        "images_per_second": epochs * len(training_dataset) / train_seconds,
    }


def imgrec_run(model_name: str, data_dir: str, epochs: int, lr: float, project: str) -> dict:
    """`imgrec train --data fashion-mnist --model MODEL --epochs N --lr LR` with every other setting default."""
    cfg = RunConfig(data="fashion-mnist", data_dir=data_dir, model=model_name, epochs=epochs, lr=lr, project=project)
    start = time.perf_counter()
    summary = imgrec_train(cfg).summary
    return {
        "train_images": summary["train_images"], "epochs": summary["epochs"], "train_seconds": summary["train_seconds"],
        "total_seconds": time.perf_counter() - start, "test_accuracy": summary["test_accuracy"],
        "images_per_second": summary["images_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("IMGREC_DATA", "../shared/data"))
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; {versions()}")
    results = {}
    with tempfile.TemporaryDirectory() as project:
        for name in args.models:
            tut = tutorial_run(name, args.data_dir, args.epochs, args.lr)
            imr = imgrec_run(name, args.data_dir, args.epochs, args.lr, project)
            ratio = imr["images_per_second"] / tut["images_per_second"]
            results[name] = {"tutorial": tut, "imgrec": imr, "throughput_ratio": ratio,
                             "wall_ratio": tut["total_seconds"] / imr["total_seconds"]}
            print(f"{name}: tutorial {tut['images_per_second']:,.0f} img/s, {tut['total_seconds']:.1f} s total, "
                  f"test {tut['test_accuracy']:.2%} | imgrec {imr['images_per_second']:,.0f} img/s, "
                  f"{imr['total_seconds']:.1f} s total, test {imr['test_accuracy']:.2%} | "
                  f"throughput x{ratio:.2f}, wall time x{results[name]['wall_ratio']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
