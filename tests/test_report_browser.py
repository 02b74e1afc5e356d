"""report.html in a real browser: headless Debian Chromium (/usr/bin/chromium) driven by Playwright.

Playwright's own browser downloads are never used: `.ci/run` installs the Debian package when it is missing.
Each test opens the page from disk, fails on any console error, failed or outside request, image that did not
decode or section that is missing, and saves a full-page screenshot under test-artifacts/ for people to look at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import REPO
from imgrec.cli import main
from imgrec.evaluation.html import SECTIONS

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("IMGREC_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
WIDTH = 1280


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A page of a fresh headless Chromium profile."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium; .ci/run does), "
                    f"or point IMGREC_CHROMIUM at a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            viewport={"width": WIDTH, "height": 900})
        try:
            yield context.new_page()
        finally:
            context.close()


def check_in_browser(page: Any, report: Path, screenshot: Path) -> dict[str, Any]:
    """Open the report from disk; assert it rendered cleanly; save a full-page screenshot."""
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(report.resolve().as_uri(), wait_until="load")
    state = page.evaluate("""() => ({
        images: Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                                       shown: i.getBoundingClientRect().width})),
        sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
        overflow: document.documentElement.scrollWidth - window.innerWidth,
        title: document.title})""")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    assert errors == [], errors
    assert all(url.startswith(("file://", "data:")) for url in requests), requests  # nothing from the network
    assert state["sections"] == [key for key, _ in SECTIONS]
    assert state["images"] and all(img["ok"] and img["shown"] > 200 for img in state["images"]), state["images"]
    assert state["overflow"] <= 0, "the page scrolls sideways"
    with Image.open(screenshot) as shot:
        assert shot.width == WIDTH and shot.height > 3000
    return state


def test_digits_report_renders(page: Any, tmp_path: Path) -> None:
    project = tmp_path / "runs"
    assert main(["train", "--data", "digits", "--epochs", "2", "--project", str(project), "--threads", "1",
                 "--device", "cpu"]) == 0
    state = check_in_browser(page, project / "digits-lenet" / "report.html", ARTIFACTS / "report-digits-lenet.png")
    assert len(state["images"]) == 6 and state["title"] == "imgrec report: digits-lenet"


@pytest.mark.slow
def test_fashion_mnist_lenet_report_renders(page: Any, fashion_mnist_lenet: Path) -> None:
    """A short real run (6,000 training images, one epoch) as a user makes it, then its report in Chromium."""
    report = fashion_mnist_lenet / "report.html"
    state = check_in_browser(page, report, ARTIFACTS / "report-fashion-mnist-lenet.png")
    assert len(state["images"]) == 6
    html = report.read_text()
    for name in ("T-shirt/top", "Ankle boot", "10,000 images", "temperature T"):
        assert name in html, name
