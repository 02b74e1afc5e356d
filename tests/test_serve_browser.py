"""The `imgrec serve` page in a real browser: headless Debian Chromium driven by Playwright, against
`imgrec serve` started as a user starts it (a subprocess) on a short Fashion-MNIST LeNet run.

Uploads a Fashion-MNIST test image saved as PNG and reads the answer off the page, then a file over the upload
limit, a text file and a decompression bomb, and reads their errors. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, png_claiming_size, serving
from imgrec.inference import Predictor
from test_report_browser import ARTIFACTS, CHROMIUM, FLAGS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Chromium logs every non-2xx fetch as a console error; those are the answers this test asks for
EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of 4(13|15|22)")


def fashion_test_images(data_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST test images (n, 28, 28) uint8 and their labels, read from the IDX files."""
    raw = data_dir / "FashionMNIST" / "raw"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    return images[:n], labels[:n]


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A page of a fresh headless Chromium profile (Debian's binary, never a downloaded one)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                       headless=True, args=FLAGS, viewport={"width": 1100, "height": 900})
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def server(fashion_mnist_lenet: Path, tmp_path: Path) -> Iterator[str]:
    """`imgrec serve` in a subprocess on a free port, with a 1 MB upload limit; its URL once /healthz answers."""
    port = free_port()
    command = [sys.executable, "-m", "imgrec", "serve", str(fashion_mnist_lenet), "--port", str(port),
               "--max-upload-mb", "1", "--threads", "1", "--device", "cpu"]
    with serving(command, port, tmp_path / "serve.log") as url:
        yield url


def upload(page: Any, name: str, data: bytes, mime: str) -> None:
    page.set_input_files("#pick", files=[{"name": name, "mimeType": mime, "buffer": data}])


def error_shown(page: Any) -> tuple[str, str]:
    page.wait_for_selector("#error", state="visible")
    return page.inner_text("#error-title"), page.inner_text("#error-text")


def test_the_page_predicts_a_fashion_mnist_image_and_explains_errors(page: Any, server: str,
                                                                      fashion_mnist_lenet: Path, shared_data: Path,
                                                                      tmp_path: Path) -> None:
    images, labels = fashion_test_images(shared_data, 40)
    predictor = Predictor.from_run(fashion_mnist_lenet, device="cpu")
    pngs = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"test-{i}.png")
        pngs.append(tmp_path / f"test-{i}.png")
    # an image this short run gets right and finds familiar (three in four are right)
    chosen = next(i for i, p in enumerate(predictor.predict(pngs)) if p.index == labels[i] and p.in_distribution)
    truth = FASHION[labels[chosen]]

    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and not EXPECTED_CONSOLE.search(
        msg.text) else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(server + "/", wait_until="load")
    page.wait_for_selector("#card-list > :first-child", state="attached")  # no eval: the page's CSP forbids it
    assert page.inner_text("#summary").startswith("lenet on fashion-mnist, test accuracy ")
    assert "Ankle boot" in page.inner_text("#card")

    page.set_input_files("#pick", str(pngs[chosen]))
    page.wait_for_selector("#prediction", state="visible")
    assert page.inner_text("#label") == truth
    top = page.eval_on_selector("#top li", """li => ({name: li.querySelector('.name').textContent,
        bar: li.querySelector('.bar').getBoundingClientRect().width,
        track: li.querySelector('.track').getBoundingClientRect().width,
        value: li.querySelector('.value').textContent})""")
    probability = float(top["value"].rstrip("%")) / 100
    assert top["name"] == truth and top["bar"] == pytest.approx(probability * top["track"], abs=2)
    assert page.eval_on_selector_all("#top li", "items => items.length") == 5
    assert not page.is_visible("#unsure")
    assert page.eval_on_selector("#seen", "img => img.complete && img.naturalWidth") == 28
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-fashion-mnist.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing scrolls sideways
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    page.screenshot(path=str(ARTIFACTS / "serve-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1100, "height": 900})

    blank = tmp_path / "blank.png"  # nothing stands out of the background: the model is not asked to pretend
    Image.new("L", (120, 90), 255).save(blank)
    page.set_input_files("#pick", str(blank))
    page.wait_for_selector("#unsure", state="visible")
    assert "unlike the training images" in page.inner_text("#ood")
    page.screenshot(path=str(ARTIFACTS / "serve-unsure.png"), full_page=True)

    sent = sum("/api/predict" in url for url in requests)
    upload(page, "big.png", b"\x89PNG" + bytes(2 * 2**20), "image/png")
    assert error_shown(page) == ("Too large", "big.png is 2.0 MB, larger than the 1 MB upload limit: send a smaller image.")
    assert page.is_hidden("#prediction")
    assert sum("/api/predict" in url for url in requests) == sent  # refused by the page: never sent
    # the server refuses it too, whatever the page checks first
    status, detail = page.evaluate("""async () => {
        const form = new FormData(); form.append('file', new Blob([new Uint8Array(3 * 1048576)]), 'big.png');
        const response = await fetch('api/predict', {method: 'POST', body: form});
        return [response.status, (await response.json()).detail]; }""")
    assert status == 413 and "1 MB upload limit" in detail

    upload(page, "notes.txt", b"shopping list: milk, eggs\n", "text/plain")
    title, text = error_shown(page)
    assert title == "Not an image" and text.startswith("'notes.txt' is not an image imgrec can read")
    upload(page, "bomb.png", png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000).read_bytes(), "image/png")
    title, text = error_shown(page)
    assert title == "Cannot use this image" and "too many pixels" in text
    assert page.is_hidden("#images") and page.is_hidden("#prediction")
    page.screenshot(path=str(ARTIFACTS / "serve-error.png"), full_page=True)

    page.set_input_files("#pick", str(pngs[chosen]))  # and back to a good answer: the error goes away
    page.wait_for_selector("#prediction", state="visible")
    assert page.is_hidden("#error") and page.inner_text("#label") == truth
    assert problems == []
    assert all(url.startswith((server, "data:", "blob:")) for url in requests), requests
