"""imgrec from Python: imgrec.train / imgrec.load / Run with the user's own Dataset, arrays and nn.Module."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import imgrec
from conftest import REPO, class_image
from imgrec.data.memory import to_splits
from imgrec.errors import ImgrecError


class Classifier(nn.Module):
    """The tutorial's naive net: 784-125-65-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 125), nn.Linear(125, 65), nn.Linear(65, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], -1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Tiny(nn.Module):
    """A small net for 1x16x16 images, the class count given."""

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def arrays(n: int, num_classes: int = 3, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable grey images (N, H, W) uint8 and their labels."""
    labels = np.arange(n) % num_classes
    images = np.stack([class_image(int(y), num_classes, size, 1, seed=seed * 10_000 + i) for i, y in enumerate(labels)])
    return images, labels


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


class Items(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> object:
        return self.items[index]


def test_the_tutorial_classifier_trains_predicts_exports_and_reloads(shared_data: Path, tmp_path: Path) -> None:
    import torchvision as tv
    from PIL import Image

    transform = tv.transforms.Compose([tv.transforms.ToTensor(), tv.transforms.Normalize((0.5,), (0.5,))])
    train_set = tv.datasets.FashionMNIST(str(shared_data), train=True, transform=transform)
    test_set = tv.datasets.FashionMNIST(str(shared_data), train=False)
    data = {"train": torch.utils.data.Subset(train_set, range(1500)),
            "test": torch.utils.data.Subset(test_set, range(300))}
    run = imgrec.train(data, model=Classifier(), epochs=1, project=str(tmp_path / "runs"), verbose=False)

    assert run.dir.is_dir() and run.classes == list(train_set.classes)
    assert [row["epoch"] for row in run.history] == [1.0]
    assert run.test_accuracy is not None and run.test_accuracy > 0.5  # 10 classes: chance is 0.1
    assert run.summary["model"].endswith(".Classifier")
    picture, array = Image.fromarray(test_set.data[0].numpy()), test_set.data[1].numpy()
    predicted = run.predict([picture, array], topk=2)
    assert len(predicted) == 2 and all(len(p.topk) == 2 for p in predicted)
    assert run.evaluate()["accuracy"] == pytest.approx(run.test_accuracy)
    onnx_file = run.export(tmp_path / "model.onnx")  # refused unless onnxruntime agrees with PyTorch
    assert onnx_file.is_file() and onnx_file.stat().st_size > 0
    again = imgrec.load(run.dir, model=Classifier)
    assert again.predict([picture, array], topk=2) == predicted
    with pytest.raises(ImgrecError) as failed:
        imgrec.load(run.dir)
    assert "model=Classifier" in one_line(failed)


def test_a_normalised_dataset_comes_back_as_its_own_uint8_images(shared_data: Path) -> None:
    import torchvision as tv
    transform = tv.transforms.Compose([tv.transforms.ToTensor(), tv.transforms.Normalize((0.2860,), (0.3530,))])
    train_set = tv.datasets.FashionMNIST(str(shared_data), train=True, transform=transform)
    splits = to_splits(torch.utils.data.Subset(train_set, range(64)))
    assert torch.equal(splits.splits["train"].images, train_set.data[:64].unsqueeze(1))
    assert splits.classes == list(train_set.classes) and splits.name == "python:FashionMNIST"


def test_digits_arrays_train_with_their_classes(tmp_path: Path) -> None:
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images, digits.target  # floats 0..16, 8x8
    except ImportError:
        x, y = arrays(600, num_classes=10, size=8)
    names = [f"digit {i}" for i in range(10)]
    run = imgrec.train({"train": (x[:1400], y[:1400]), "test": (x[1400:], y[1400:])}, model="lenet", classes=names,
                       epochs=2, project=str(tmp_path / "runs"), verbose=False)
    assert run.classes == names and len(run.history) == 2
    assert run.test_accuracy > 0.5


def test_a_resumed_run_on_python_data_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    data = {"train": arrays(60), "test": arrays(15, seed=1)}
    common = dict(model=Tiny, project=str(tmp_path / "runs"), verbose=False, batch_size=16)
    straight = imgrec.train(data, epochs=2, name="straight", **common)
    first = imgrec.train(data, epochs=1, name="resumed", **common)
    resumed = first.resume(epochs=2, verbose=False)
    assert resumed.dir == first.dir and len(resumed.history) == 2
    a = torch.load(straight.dir / "weights" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.dir / "weights" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_class_gets_the_data_shape_a_missing_test_split_is_val_and_quiet_is_quiet(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    x, y = arrays(90)
    run = imgrec.train((x, y), model=Tiny, epochs=1, project=str(tmp_path / "runs"), verbose=False)
    assert "epoch" not in caplog.text and "run folder" not in caplog.text
    assert run.classes == ["0", "1", "2"]
    assert run.summary["test_images"] == 90 - run.summary["train_images"] == 9  # the validation split
    assert imgrec.load(run.dir, model=Tiny).predict(list(x[:3])) == run.predict(list(x[:3]))
    page = run._repr_html_()  # a notebook shows the headline numbers and results.png inline
    assert f"{run.test_accuracy:.2%}" in page and "data:image/png;base64," in page


class SmallCNN(nn.Module):
    """A user's CNN whose last convolution sees the whole 8x8 map (1x1 output): Grad-CAM must use the one before."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).flatten(1))


def test_explain_finds_the_grad_cam_layer_of_a_users_cnn_by_running_it(tmp_path: Path) -> None:
    from PIL import Image

    (x, y), (tx, ty) = arrays(60), arrays(12, seed=1)
    data = {"train": (x, y), "test": (tx, (ty + 1) % 3)}  # test labels shifted: every test image has a mistake to show
    run = imgrec.train(data, model=SmallCNN(), epochs=1, project=str(tmp_path / "runs"), verbose=False)
    picture = tmp_path / "square.png"
    Image.fromarray(tx[0]).save(picture)
    explained = run.explain([picture], mistakes=2)
    assert [e.method for e in explained.images] == ["Grad-CAM on body.0 (8x8)"] * 3
    assert explained.images[0].source == str(picture) and explained.images[1].true is not None
    assert all(e.png.is_file() and e.png.parent == run.dir / "explanations" for e in explained.images)
    mlp = imgrec.train(data, model=Tiny, epochs=1, project=str(tmp_path / "runs"), verbose=False)
    plain = imgrec.load(mlp.dir, model=Tiny).explain([picture], out=tmp_path / "maps")
    assert plain.images[0].method == "input-gradient saliency" and "no convolution layer" in plain.notes[0]
    with pytest.raises(ImgrecError) as failed:  # mistakes need the test split, which only the caller has
        imgrec.load(mlp.dir, model=Tiny).explain(mistakes=1)
    assert "pass the data" in one_line(failed)


def test_compare_takes_runs_and_folders_and_writes_what_the_cli_writes(tmp_path: Path) -> None:
    data = {"train": arrays(45), "test": arrays(12, seed=1)}
    common = dict(epochs=1, project=str(tmp_path / "runs"), verbose=False)
    cnn, mlp = imgrec.train(data, model=SmallCNN, **common), imgrec.train(data, model=Tiny, **common)
    compared = imgrec.compare(cnn, str(mlp.dir))
    assert [row["run"] for row in compared.rows] == [cnn.dir.name, mlp.dir.name]
    assert compared.rows[0]["test_accuracy"] == pytest.approx(cnn.test_accuracy)
    assert str(compared) == compared._repr_markdown_() == (tmp_path / "runs" / "compare" / "compare.md").read_text()
    assert all(path.is_file() for path in compared.written)
    other = imgrec.train({"train": arrays(45), "test": arrays(9, seed=1)}, model=Tiny, name="other", **common)
    with pytest.raises(ImgrecError) as failed:
        imgrec.compare(cnn, other)
    assert "different data" in one_line(failed)


def test_unknown_settings_are_type_errors_naming_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="did you mean 'epochs'"):
        imgrec.train(arrays(30), epoch=1, project=str(tmp_path))


@pytest.mark.parametrize("case", ["not images", "labels out of range", "mixed sizes", "empty", "float range"])
def test_bad_python_data_is_one_line(case: str) -> None:
    x, y = arrays(12)
    data, classes, expected = {
        "not images": (Items([("a picture", 0)] * 4), None, "str where an image belongs"),
        "labels out of range": ((x, y + 1), ["a", "b", "c"], "label 3 of item 2 of the train data is out of range"),
        "mixed sizes": (Items([(torch.zeros(1, 8, 8, dtype=torch.uint8), 0),
                               (torch.zeros(1, 9, 8, dtype=torch.uint8), 1)]), None, "give image_size="),
        "empty": (Items([]), None, "empty"),
        "float range": (Items([(torch.full((1, 4, 4), 7.0), 0), (torch.zeros(1, 4, 4), 1)]), None, "in [0, 1]"),
    }[case]
    with pytest.raises(ImgrecError) as failed:
        to_splits(data, classes)
    assert expected in one_line(failed)


def test_mixed_sizes_are_resized_when_image_size_is_given() -> None:
    items = Items([(torch.zeros(1, 8, 8, dtype=torch.uint8), 0), (torch.zeros(1, 9, 8, dtype=torch.uint8), 1)])
    assert tuple(to_splits(items, image_size=6).splits["train"].images.shape) == (2, 1, 6, 6)


def test_a_model_of_the_wrong_width_names_both_numbers(tmp_path: Path) -> None:
    x, y = arrays(30, size=28)
    with pytest.raises(ImgrecError) as failed:
        imgrec.train((x, y), model=Classifier(), epochs=1, project=str(tmp_path / "runs"), verbose=False)
    assert "10 outputs per image but the data has 3 classes" in one_line(failed)
    assert not (tmp_path / "runs").exists()


def test_a_named_data_set_trains_a_python_model_the_cli_cannot_load(fake_fashion_mnist: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import error_line, run_main

    run = imgrec.train("fashion-mnist", model=Classifier, data_dir=str(fake_fashion_mnist), epochs=1,
                       project=str(tmp_path / "runs"), verbose=False)
    assert run.dir.name == "fashion-mnist-Classifier" and len(run.classes) == 10
    code, _, err = run_main(["predict", str(run.dir), str(tmp_path)], capsys)
    assert code == 1 and "model=Classifier" in error_line(err)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_cli_and_the_api_give_bit_identical_weights(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    settings = ["--model", "mlp", "--epochs", "1", "--data-dir", str(fake_fashion_mnist), "--project", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cli = subprocess.run([sys.executable, "-m", "imgrec", "train", "--data", "fashion-mnist", *settings, "--name", "cli"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    api = _python(f"import imgrec; imgrec.train('fashion-mnist', model='mlp', epochs=1, data_dir={str(fake_fashion_mnist)!r}, "
                  f"project={str(tmp_path)!r}, name='api')", tmp_path)
    assert api.returncode == 0, api.stderr
    assert "epoch   1/1" in api.stdout  # one line per epoch without any logging set-up
    a = torch.load(tmp_path / "cli" / "weights" / "best.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "api" / "weights" / "best.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_imgrec_stays_free_of_torch(tmp_path: Path) -> None:
    done = _python("import sys, imgrec; assert 'torch' not in sys.modules; assert callable(imgrec.train); "
                   "assert 'torch' in sys.modules", tmp_path)
    assert done.returncode == 0, done.stderr
