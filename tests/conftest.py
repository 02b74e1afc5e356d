"""Shared fixtures: tiny data sets made on the fly, the real data in ../shared/data, an isolated cache."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

from imgrec.cli import main

if TYPE_CHECKING:  # the conftest stays torch-free: only the annotations name it
    import torch

REPO = Path(__file__).resolve().parents[1]
# The real data sets (read-only): $IMGREC_TEST_DATA, else ../shared/data beside the checkout.
SHARED_DATA = Path(os.environ.get("IMGREC_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One imgrec cache per test session (extracted archives and decoded images are reused across tests)."""
    os.environ["IMGREC_CACHE"] = str(tmp_path_factory.mktemp("imgrec-cache"))
    os.environ["MPLBACKEND"] = "Agg"


def _shared_data() -> Path:
    if not (SHARED_DATA / "FashionMNIST" / "raw").is_dir() or not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}: expected FashionMNIST/raw/ and cifar10-jpeg.tar.gz "
                    f"(set IMGREC_TEST_DATA to the folder that holds them)")
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """The real data folder; a missing folder fails the test loudly (CI has it)."""
    return _shared_data()


@pytest.fixture(scope="session")
def fashion_mnist_lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real run as a user makes it (`imgrec train` in a subprocess: a LeNet, one epoch on 6,000 Fashion-MNIST
    training images), made once for the tests that only read it: its run folder."""
    cwd = tmp_path_factory.mktemp("fashion-mnist-lenet")
    proc = subprocess.run(
        [sys.executable, "-m", "imgrec", "train", "--data", "fashion-mnist", "--data-dir", str(_shared_data()),
         "--model", "lenet", "--epochs", "1", "--train-samples", "6000", "--project", "runs", "--threads", "1"],
        cwd=cwd, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cwd / "runs" / "fashion-mnist-lenet"
    assert (run / "summary.json").is_file(), proc.stdout
    return run


@pytest.fixture(scope="session")
def torchvision_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision resnet18 state dict, randomly initialised, saved as torchvision's own files are (the stand-in
    for its pretrained weights: no test downloads them)."""
    import torch
    import torchvision

    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("tv") / "resnet18-random.pth"
    torch.save(state, path)
    return path, state


def class_image(label: int, num_classes: int, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A learnable image: a bright square whose position encodes the class, on faint noise. (H, W[, C]) uint8."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=(size, size, channels), dtype=np.uint8)
    cells = int(np.ceil(np.sqrt(num_classes)))
    cell = size // cells
    row, col = divmod(label, cells)
    image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 220
    return image[:, :, 0] if channels == 1 else image


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 12,
                      size: int = 16, channels: int = 3, splits: tuple[str, ...] = (), ext: str = ".png") -> Path:
    """Write class folders of learnable images; with splits=("train", "test") write one tree per split."""
    trees = [root / s for s in splits] if splits else [root]
    for t, tree in enumerate(trees):
        for label, name in enumerate(classes):
            folder = tree / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                array = class_image(label, len(classes), size, channels, seed=1000 * t + 100 * label + i)
                Image.fromarray(array).save(folder / f"{i:03d}{ext}")
    return root


def write_idx(folder: Path, n_train: int = 60, n_test: int = 20, num_classes: int = 10, size: int = 28) -> Path:
    """Fake MNIST-format IDX files (big-endian headers, magic 2051 / 2049) with learnable images."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % num_classes
        images = np.stack([class_image(int(y), num_classes, size, 1, seed=i) for i, y in enumerate(labels)])
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, size, size) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A single folder of three class folders, 12 colour 16x16 PNGs each."""
    return make_image_folder(tmp_path / "photos")


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> Path:
    """A data folder with fake Fashion-MNIST IDX files (60 train / 20 test)."""
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw")
    return tmp_path / "data"


def photo_like(seed: int, size: int | tuple[int, int] = 32) -> np.ndarray:
    """A distinct colour picture (smooth random blobs): unlike class_image, no two seeds look alike. (H, W, 3);
    size is the side of a square or (W, H)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    return np.asarray(coarse.resize(size if isinstance(size, tuple) else (size, size), Image.Resampling.BICUBIC))


def make_photo_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 10,
                      splits: tuple[str, ...] = ("train", "test"), ext: str = ".jpg",
                      sizes: tuple[tuple[int, int], ...] = ((32, 32),)) -> Path:
    """root/<split>/<class>/NNN<ext> (root/<class>/NNN<ext> with no splits) of distinct pictures (no duplicates
    anywhere), their (W, H) sizes taken from `sizes` in turn."""
    seed = 0
    for split in splits or ("",):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed += 1
                Image.fromarray(photo_like(seed, sizes[seed % len(sizes)])).save(folder / f"{i:03d}{ext}")
    return root


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR says width x height (with a correct CRC): a decompression-bomb header."""
    Image.new("L", (8, 8)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


BAD_KINDS = ("zero-byte", "truncated", "not-an-image", "too-large", "corrupt")


def write_bad_file(path: Path, kind: str) -> Path:
    """Replace (or create) path with a bad file of the given kind; truncated keeps the first half of a real image."""
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = path.read_bytes() if path.is_file() and path.stat().st_size else _encoded(path.suffix)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not-an-image":
        path.write_text("<html><body>404 not found</body></html>\n")
    elif kind == "too-large":
        png_claiming_size(path, 100_000, 100_000)
    elif kind == "corrupt":  # a PNG whose compressed pixel data is garbled (its CRCs still check out)
        buffer = io.BytesIO()
        Image.fromarray(photo_like(12345)).save(buffer, format="PNG")
        data = bytearray(buffer.getvalue())
        start = data.index(b"IDAT") + 4
        data[start + 10 : start + 60] = bytes(255 - b for b in data[start + 10 : start + 60])
        end = start + struct.unpack(">I", bytes(data[start - 8 : start - 4]))[0]
        data[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(data[start - 4 : end])) & 0xFFFFFFFF)
        path.write_bytes(bytes(data))
    else:
        raise ValueError(kind)
    return path


def _encoded(suffix: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_like(54321, 64)).save(buffer, format="PNG" if suffix.lower() == ".png" else "JPEG")
    return buffer.getvalue()


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """imgrec.cli.main in-process: (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line on stderr (any log lines come before it); never a traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    errors = [ln for ln in lines if ln.startswith("imgrec")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return lines[-1]


class ListLoader:
    """The smallest thing fit() accepts as a loader: fixed batches, in order."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.num_samples = sum(len(y) for _, y in batches)
        self.epochs_set: list[int] = []
        self.done = 0

    def __iter__(self) -> Any:
        for batch in self.batches[self.done :]:
            self.done += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epochs_set.append(epoch)
        self.done = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = state["batches_done"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`imgrec serve` as a user starts it (a subprocess, output in log_path); its URL once /healthz answers (the
    model loads in seconds on a busy machine), stopped on the way out. Fails the test if the server dies."""
    import httpx2 as httpx  # the test extra's client; only the serve tests need it

    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"imgrec serve exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# A data loader left as garbage in a reference cycle, its worker process still running (the garbage collector is
# held off, as it would be between two of its runs); the script that follows forks a worker beside it.
LOADER_LEFT_IN_A_CYCLE = """
import gc
import torch
from torch.utils.data import DataLoader, TensorDataset

gc.disable()
loader = DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=4, num_workers=1, persistent_workers=True)
for _ in loader:
    pass
cycle = [loader]
cycle.append(cycle)
del loader, cycle
"""


def assert_no_worker_finalises_it(script: str) -> None:
    """Run LOADER_LEFT_IN_A_CYCLE then `script` (which forks a worker that collects its garbage, then prints
    "done") in a subprocess: a worker finalising its copy of the loader prints "can only test a child process"."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", LOADER_LEFT_IN_A_CYCLE + script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert "Traceback" not in done.stderr and "child process" not in done.stderr, done.stderr

