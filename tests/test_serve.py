"""`imgrec serve`: the API on a tiny trained model, through FastAPI's test client and a real uvicorn server.

Every error path (413 by header and by a streamed body, 415, 422 for bombs, empty files, damaged images and
missing fields), predictions equal to Predictor's, the model card, the page, the options, and fuzzed uploads
that must never make a 500.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import error_line, free_port, png_claiming_size, run_main, serving
from imgrec.errors import UsageError
from imgrec.inference import Predictor
from imgrec.serve import app as app_module
from imgrec.serve import limits as limits_module
from imgrec.serve.server import build, check_options, torch_threads
from inference_helpers import train_tiny

LIMIT_MB = 0.25  # the tests' upload limit: 262,144 bytes (+ 16 KiB for the form around the file)
LIMIT = int(LIMIT_MB * 2**20) + app_module.FORM_OVERHEAD


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet trained on three classes of 16x16 grey images (photo conversion, temperature and OOD threshold on)."""
    return train_tiny(tmp_path_factory.mktemp("serve"), channels=1)


@pytest.fixture(scope="module")
def client(run: Path) -> Iterator[TestClient]:
    with TestClient(build(run, max_upload_mb=LIMIT_MB, workers_threads=2, device="cpu")) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def images(run: Path) -> list[Path]:
    """Some of the training data's PNG files (one folder per class)."""
    folder = run.parents[1] / "data1"
    return [sorted((folder / name).glob("*.png"))[i] for name in ("cat", "dog", "fox") for i in (0, 5)]


def post(client: TestClient, data: bytes, name: str = "x.png", query: str = "") -> httpx.Response:
    return client.post(f"/api/predict{query}", files={"file": (name, data, "image/png")})


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for word in words:
        assert word in detail, detail
    return detail


# --- predictions ---------------------------------------------------------------------------------------------


def test_predictions_equal_the_predictors(client: TestClient, run: Path, images: list[Path]) -> None:
    predictor = Predictor.from_run(run, device="cpu")
    for path in images:
        answer = post(client, path.read_bytes(), path.name).json()
        expected = predictor.predict(path, topk=3)[0]
        assert [(t["label"], t["probability"]) for t in answer["top"]] == [(n, p) for n, p in expected.topk]
        assert (answer["label"], answer["probability"]) == (expected.label, expected.probability)
        assert answer["unsure"] is (not expected.in_distribution)
        assert answer["ood"] == {"score": predictor.ood.score, "value": expected.ood_score,
                                 "threshold": predictor.ood.threshold}
        header, encoded = answer["input_png"].split(",", 1)
        assert header == "data:image/png;base64"
        seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
        assert np.array_equal(seen, predictor.prepare(path)[0].numpy())  # the photo conversion's output, exactly


def test_the_tiny_model_gets_its_own_images_right(client: TestClient, images: list[Path]) -> None:
    for path in images:
        answer = post(client, path.read_bytes(), path.name).json()
        assert answer["label"] == path.parent.name and answer["unsure"] is False


def test_topk_is_clamped_to_the_classes_and_checked(client: TestClient, images: list[Path]) -> None:
    data = images[0].read_bytes()
    assert len(post(client, data, query="?topk=1").json()["top"]) == 1
    assert len(post(client, data, query="?topk=50").json()["top"]) == 3
    assert_error(post(client, data, query="?topk=0"), 422, "topk", "greater than or equal to 1")
    assert_error(post(client, data, query="?topk=two"), 422, "topk")


def test_noise_is_unsure(client: TestClient) -> None:
    """A blank frame holds nothing the photo conversion can find: the model is not asked to pretend."""
    answer = post(client, png(np.full((40, 40), 255, np.uint8))).json()
    assert answer["unsure"] is True and len(answer["top"]) == 3


def test_colour_and_odd_modes_are_decoded_like_training_files(client: TestClient, images: list[Path]) -> None:
    grey = np.asarray(Image.open(images[2]))
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    assert post(client, png(rgba)).json()["top"] == post(client, images[2].read_bytes()).json()["top"]
    buffer = io.BytesIO()
    Image.fromarray(grey).convert("RGB").save(buffer, format="JPEG", quality=95)
    assert post(client, buffer.getvalue(), "x.jpg").json()["label"] == images[2].parent.name


# --- the other endpoints -------------------------------------------------------------------------------------


def test_model_card(client: TestClient, run: Path) -> None:
    card = client.get("/api/model").json()
    metrics = json.loads((run / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert card["run"] == run.name and card["weights"] == "best.pt" and card["model"] == "lenet"
    assert card["data"] == str(run.parents[1] / "data1") and card["classes"] == ["cat", "dog", "fox"]
    assert card["test_accuracy"] == metrics["accuracy"] and card["test_images"] == metrics["count"]
    assert card["params"] == summary["params"] and card["epochs"] == summary["epochs"]
    assert card["input"] == {"channels": 1, "size": [16, 16]}
    assert card["ood"]["score"] == "energy" and isinstance(card["ood"]["threshold"], float)
    assert datetime.fromisoformat(card["date"]).utcoffset().total_seconds() == 0
    assert card["max_upload_mb"] == LIMIT_MB and card["versions"]["torch"] == torch.__version__


def test_card_of_a_weights_file_on_its_own(tmp_path: Path, run: Path) -> None:
    """Copied out of its run folder, the weights still serve; the card says what the file knows."""
    (tmp_path / "model.pt").write_bytes((run / "weights" / "best.pt").read_bytes())
    with TestClient(build(tmp_path / "model.pt", device="cpu")) as alone:
        card = alone.get("/api/model").json()
    assert card["model"] == "lenet" and card["classes"] == ["cat", "dog", "fox"]
    assert card["test_accuracy"] is None and card["params"] is None and card["date"]


def test_health_page_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert f'<meta name="imgrec-max-upload-bytes" content="{int(LIMIT_MB * 2**20)}">' in page.text
    assert 'accept="image/*"' in page.text and 'capture="environment"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere: works offline
    assert client.get("/docs").status_code == 200
    assert_error(client.get("/api/predict"), 405, "Method Not Allowed")  # as the README's table says
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/model", "/healthz"} <= set(paths)
    assert {"413", "415", "422"} <= set(paths["/api/predict"]["post"]["responses"])


NODE = shutil.which("node")
# The page's script with just enough of a browser around it: the upload limit the server wrote into the page, a
# fetch that records what it is asked and never answers (the model card never arrives), and the file picker.
PAGE_HARNESS = """
const [maxBytes, size] = process.argv.slice(1);
const elements = {}, listeners = {}, fetched = [];
const element = (id) => ({id, style: {}, hidden: false, textContent: "", value: "", classList: {add() {}, remove() {}},
  addEventListener(type, listener) { listeners[id + ":" + type] = listener; }, append() {}, replaceChildren() {}});
globalThis.document = {getElementById: (id) => elements[id] ??= element(id), createElement: () => element(""),
  querySelector: (selector) => selector === 'meta[name="imgrec-max-upload-bytes"]' ? {content: maxBytes} : null,
  body: element("body")};
globalThis.window = {addEventListener() {}};
globalThis.fetch = (url) => { fetched.push(url); return new Promise(() => {}); };
(0, eval)(require("fs").readFileSync(0, "utf8"));
const file = Object.assign(new Blob([new Uint8Array(Number(size))]), {name: "big.png"});
listeners["pick:change"]({target: {files: [file], value: "big.png"}});
setTimeout(() => console.log(JSON.stringify({fetched, error: elements["error-text"].textContent})), 20);
"""


@pytest.mark.parametrize("size", [int(LIMIT_MB * 2**20), int(LIMIT_MB * 2**20) + 1, 5 * 2**20])
def test_the_page_refuses_a_file_over_the_limit_before_sending_it(client: TestClient, size: int) -> None:
    """The page's own script, with the limit the server wrote into it: a larger file is refused with a message
    and never sent, even while the model card is still on its way; a file at the limit is sent."""
    assert NODE is not None, "node is needed to run the page's script (.ci/run installs Debian's nodejs)"
    page = client.get("/").text
    script = page[page.index("<script>") + len("<script>"):page.index("</script>")]
    maximum = page.split('name="imgrec-max-upload-bytes" content="', 1)[1].split('"', 1)[0]
    proc = subprocess.run([str(NODE), "-e", PAGE_HARNESS, maximum, str(size)], input=script, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    if size <= LIMIT_MB * 2**20:
        assert outcome == {"fetched": ["api/model", "api/predict?topk=5"], "error": ""}
    else:
        assert outcome["fetched"] == ["api/model"]  # the card, asked for when the page loads; never the upload
        assert outcome["error"] == f"big.png is {size / 2**20:.1f} MB, larger than the 0.25 MB upload limit: send a " \
                                   f"smaller image."


@pytest.mark.parametrize("path", ["/static/index.html", "/../pyproject.toml", "/index.html", "/api/../../etc/passwd",
                                  "/%2e%2e/%2e%2e/etc/passwd"])
def test_no_file_is_served_by_the_name_a_client_gives(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


# --- errors --------------------------------------------------------------------------------------------------


def test_413_by_header(client: TestClient) -> None:
    assert_error(post(client, b"\x89PNG" + bytes(LIMIT)), 413, "larger than the 0.25 MB upload limit")


def test_a_file_just_under_the_limit_is_not_refused_for_its_size(client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (505, 505), dtype=np.uint8)
    data = png(noise)
    assert 0.95 * LIMIT_MB * 2**20 < len(data) < LIMIT_MB * 2**20
    assert post(client, data).status_code == 200


def _asgi_upload(app: Any, chunks: Iterator[bytes | float], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, int, int]:
    """Drive the ASGI app by hand: (status, JSON body, body chunks pulled before the answer began, and in all).
    A number among the chunks is a pause of the client, in seconds."""
    pulled, sent, answered_after = 0, [], None

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(chunks, None)
        while isinstance(chunk, float):
            await anyio.sleep(chunk)
            chunk = next(chunks, None)
        pulled += chunk is not None
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict) -> None:
        nonlocal answered_after
        answered_after = pulled if answered_after is None else answered_after
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    anyio.run(app, scope, receive, send)
    assert sent[-1] == {"type": "http.response.body", "body": b""} or not sent[-1].get("more_body")
    assert (b"connection", b"close") in sent[0]["headers"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), answered_after, pulled


def _multipart_chunks(total: int, chunk: int = 16 * 1024) -> Iterator[bytes]:
    yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(total // chunk):
        yield b"\x89" * chunk
    yield b"\r\n--B--\r\n"


def test_413_by_streamed_body_stops_reading_at_the_limit(client: TestClient) -> None:
    """No Content-Length (chunked) and a 4 MB body: refused after about the limit; the rest is then read and dropped
    (never parsed), so the client, still sending, can read the answer."""
    form = [(b"content-type", b"multipart/form-data; boundary=B")]
    status, body, answered_after, pulled = _asgi_upload(client.app, _multipart_chunks(4 * 2**20), form)
    assert status == 413 and "upload limit" in body["detail"]
    assert answered_after <= LIMIT // (16 * 1024) + 2  # 18 of the 258 chunks
    assert pulled == 258
    status, body, answered_after, pulled = _asgi_upload(client.app, _multipart_chunks(4 * 2**20),
                                                        [*form, (b"content-length", b"5000000")])
    assert status == 413 and answered_after == 0 and pulled == 258  # the header alone decides: answered at once


def test_no_body_is_dropped_for_a_client_waiting_to_be_told_to_send(client: TestClient) -> None:
    headers = [(b"content-type", b"multipart/form-data; boundary=B"), (b"content-length", b"5000000"),
               (b"expect", b"100-continue")]
    status, _, answered_after, pulled = _asgi_upload(client.app, _multipart_chunks(4 * 2**20), headers)
    assert status == 413 and answered_after == 0 and pulled == 0


def test_dropping_a_refused_body_is_bounded_in_time(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that keeps sending (or stalls) gets its 413, and the connection is closed after the time limit."""
    monkeypatch.setattr(limits_module, "LINGER_SECONDS", 0.5)
    monkeypatch.setattr(limits_module, "LINGER_IDLE_SECONDS", 0.2)

    def endless() -> Iterator[bytes | float]:
        while True:
            yield bytes(1024)
            yield 0.01

    headers = [(b"content-type", b"multipart/form-data; boundary=B"), (b"content-length", b"99999999999")]
    began = time.monotonic()
    status, _, answered_after, pulled = _asgi_upload(client.app, endless(), headers)
    assert status == 413 and answered_after == 0 and pulled > 5 and 0.5 <= time.monotonic() - began < 1.5
    began = time.monotonic()  # a client that stops sending for longer than LINGER_IDLE_SECONDS
    status, _, answered_after, pulled = _asgi_upload(client.app, iter([bytes(1024), 2.0, bytes(1024)]), headers)
    assert status == 413 and pulled == 1 and time.monotonic() - began < 1.0


def test_413_on_a_real_server_for_a_chunked_upload(live_server: str) -> None:
    """uvicorn over loopback: an httpx upload from a generator (chunked, no length), and the same by hand."""
    response = httpx.post(f"{live_server}/api/predict", content=_multipart_chunks(3 * 2**20, 64 * 1024),
                          headers={"content-type": "multipart/form-data; boundary=B"}, timeout=30)
    assert_error(response, 413, "upload limit")
    assert "content-length" not in response.request.headers
    host, port = live_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
        for chunk in _multipart_chunks(LIMIT + 64 * 1024, 64 * 1024):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_415_for_text_and_for_a_body_that_is_no_form(client: TestClient) -> None:
    assert_error(post(client, b"just some notes\n" * 20, "notes.txt"), 415, "'notes.txt'", "not an image")
    response = client.post("/api/predict", content=png(np.zeros((8, 8), np.uint8)), headers={"content-type": "image/png"})
    assert_error(response, 415, "multipart/form-data", "'file'")


@pytest.mark.parametrize("side", [10_000, 100_000])  # 1e8 pixels: Pillow's warning; 1e10: its error
def test_422_for_decompression_bombs(client: TestClient, tmp_path: Path, side: int) -> None:
    bomb = png_claiming_size(tmp_path / "bomb.png", side, side).read_bytes()
    assert len(bomb) < 200
    assert_error(post(client, bomb, "bomb.png"), 422, "'bomb.png'", "too many pixels")


def test_422_for_empty_damaged_and_missing_uploads(client: TestClient, images: list[Path]) -> None:
    assert_error(post(client, b"", "empty.png"), 422, "'empty.png' is empty")
    data = images[0].read_bytes()
    assert_error(post(client, data[: len(data) // 2], "cut.png"), 422, "'cut.png' is damaged or truncated")
    assert_error(client.post("/api/predict", files={"image": ("x.png", data, "image/png")}), 422, "field 'file'")
    text_field = client.post("/api/predict", data={"file": "not a file"}, files={"other": ("o.txt", b"1", "text/plain")})
    assert_error(text_field, 422, "file")
    assert_error(client.post("/api/predict", data={"file": "not a file"}), 415, "multipart/form-data")


MALFORMED_FORMS = {  # content type, body: each says it is a multipart form and is not one
    "no boundary": ("multipart/form-data", b"--B\r\n\r\nx\r\n--B--\r\n"),
    "no boundary line": ("multipart/form-data; boundary=B", b"just some bytes, no boundary at all"),
    "another boundary": ("multipart/form-data; boundary=B", b'--X\r\nContent-Disposition: form-data; name="file"\r\n\r\nx'),
    "a bad part header": ("multipart/form-data; boundary=B", b"--B\r\nnot a header\r\n\r\nx\r\n--B--\r\n"),
    "a part without a name": ("multipart/form-data; boundary=B", b"--B\r\nContent-Type: image/png\r\n\r\nx\r\n--B--\r\n"),
}


@pytest.mark.parametrize("case", MALFORMED_FORMS)
def test_422_for_a_malformed_multipart_body(client: TestClient, case: str) -> None:
    content_type, body = MALFORMED_FORMS[case]
    response = client.post("/api/predict", content=body, headers={"content-type": content_type})
    assert_error(response, 422, "not a well-formed multipart/form-data body", "field 'file'")


def test_client_file_names_are_only_shown_and_kept_short(client: TestClient) -> None:
    detail = assert_error(post(client, b"text", "../../etc/" + "x" * 200 + "\x1b[31m.txt"), 415)
    assert "etc" not in detail and "\x1b" not in detail and "x" * 80 + "..." in detail


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 12, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]


def _mutated(seed: int, at: int, patch: bytes, keep: int) -> bytes:
    """A valid image file with a few bytes overwritten (headers, lengths, pixel data: all fair game), maybe cut."""
    data = SEEDS[seed]
    at = at % len(data)
    return (data[:at] + patch + data[at + len(patch):])[: max(keep, 1)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(min_size=1, max_size=2048),
                      st.builds(_mutated, st.integers(0, len(SEEDS) - 1), st.integers(0, 2000),
                                st.binary(min_size=1, max_size=8), st.integers(1, 5000))))
def test_fuzzed_uploads_never_make_a_500(client: TestClient, data: bytes) -> None:
    response = post(client, data, "fuzz.png")
    assert response.status_code in (200, 415, 422), response.text
    if response.status_code == 200:
        assert abs(sum(t["probability"] for t in response.json()["top"]) - 1) < 1e-4
    else:
        assert response.json()["detail"].startswith("'fuzz.png' ")


@pytest.mark.parametrize("shape", [(1, 1), (1, 3000), (3000, 1), (2, 5)])
def test_degenerate_sizes_are_answered(client: TestClient, shape: tuple[int, int]) -> None:
    answer = post(client, png(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))).json()
    assert len(answer["top"]) == 3 and answer["input_png"].startswith("data:image/png;base64,")


# --- concurrency on a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(run: Path) -> Iterator[str]:
    """uvicorn serving the tiny model in a thread on a free loopback port."""
    app = build(run, max_upload_mb=LIMIT_MB, workers_threads=2, device="cpu")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            pytest.fail("uvicorn did not start")
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_predictions_run_at_most_workers_threads_at_once(live_server: str, images: list[Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    active, most, lock = 0, 0, threading.Lock()
    release = threading.Event()
    real = app_module.classify

    def counting(*args: Any) -> dict[str, Any]:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
            if active == 2:
                release.set()  # two are inside at once: let everyone go
        release.wait(timeout=20)
        try:
            return real(*args)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(app_module, "classify", counting)
    data = images[3].read_bytes()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{live_server}/api/predict", timeout=60,
                                                       files={"file": ("x.png", data, "image/png")}), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert most == 2 and len({json.dumps(r.json()["top"]) for r in responses}) == 1


@pytest.fixture(scope="module")
def served(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`imgrec serve` as a user starts it (a subprocess) on a free port with a 1 MB upload limit; its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("served") / "serve.log"
    with serving(serve_command(run, "--port", str(port), "--max-upload-mb", "1"), port, log_path, env=QUIET) as url:
        yield url


def _urllib_post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    """POST with Python's urllib, which sends the whole body before it reads the answer: (status, JSON body)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_plain_client_still_sending_reads_the_413(served: str) -> None:
    """16 MB against a 1 MB limit, by urllib: the server answers at once, then reads and drops the rest, so the
    client reads the 413 instead of "connection reset by peer"; twice, and the server goes on answering."""
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    body = head + bytes(16 * 2**20) + b"\r\n--B--\r\n"
    for _ in range(2):
        status, answer = _urllib_post(f"{served}/api/predict", body, "multipart/form-data; boundary=B")
        assert status == 413 and "larger than the 1 MB upload limit" in answer["detail"]
    assert httpx.get(f"{served}/healthz", timeout=10).json() == {"status": "ok"}


def test_a_real_server_answers_a_malformed_form_and_the_page_with_its_headers(served: str) -> None:
    response = httpx.post(f"{served}/api/predict", content=b"--B\r\nnot a header\r\n\r\nx\r\n--B--\r\n",
                          headers={"content-type": "multipart/form-data; boundary=B"}, timeout=30)
    assert_error(response, 422, "not a well-formed multipart/form-data body")
    page = httpx.get(f"{served}/", timeout=30)
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert '<meta name="imgrec-max-upload-bytes" content="1048576">' in page.text


# --- options and the command ---------------------------------------------------------------------------------


def test_binding_beyond_this_machine_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imgrec.serve.server"):
        check_options("127.0.0.1", 8000, 10, 2)
        check_options("localhost", 8000, 10, 2)
        assert caplog.records == []
        check_options("0.0.0.0", 8080, 10, 2)
    assert len(caplog.records) == 1 and "0.0.0.0" in caplog.text and "no authentication" in caplog.text


def test_torch_threads_share_the_cores() -> None:
    assert torch_threads(1) >= torch_threads(2) >= 1 and torch_threads(10_000) == 1


BAD_OPTIONS = [(["--port", "70000"], "--port"), (["--port", "0"], "--port"), (["--port", "-1"], "--port"),
               (["--port", "99999999999999999999"], "--port"), (["--max-upload-mb", "0"], "--max-upload-mb"),
               (["--max-upload-mb", "-1"], "--max-upload-mb"), (["--max-upload-mb", "inf"], "got inf"),
               (["--max-upload-mb", "nan"], "got nan"), (["--max-upload-mb", "1e400"], "got inf"),
               (["--max-upload-mb", "1e-9"], "--max-upload-mb"), (["--max-upload-mb", "5000"], "[0.001, 1024]"),
               (["--threads", "0"], "--threads"), (["--threads", "1000"], "[1, 64]"),
               (["--host", ""], "--host"), (["--host", " "], "--host")]


@pytest.mark.parametrize(("flags", "words"), BAD_OPTIONS, ids=[" ".join(flags) for flags, _ in BAD_OPTIONS])
def test_bad_options_are_usage_errors(run: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: str) -> None:
    code, _, err = run_main(["serve", str(run), *flags], capsys)
    assert code == 2 and words in error_line(err)


def serve_command(run: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "imgrec", "serve", str(run), "--device", "cpu", *flags]


QUIET = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # chosen: no note on how busy the CPUs are


def test_an_infinite_upload_limit_is_one_line_from_the_command(run: Path) -> None:
    """The command as a user runs it: one line, exit 2, before any model is loaded or port bound."""
    proc = subprocess.run(serve_command(run, "--max-upload-mb", "inf"), env=QUIET, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["imgrec serve: error: --max-upload-mb must be a number of MB in "
                                                "[0.001, 1024], got inf"]


def test_build_checks_the_limits_too(run: Path) -> None:
    with pytest.raises(UsageError, match="--max-upload-mb"):
        build(run, max_upload_mb=float("inf"), device="cpu")


def test_missing_web_stack_names_the_extra(run: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    code, _, err = run_main(["serve", str(run), "--port", str(free_port())], capsys)
    assert code == 1 and "pip install 'imgrec[serve]'" in error_line(err)


def test_the_command_loads_the_model_and_starts_uvicorn(run: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    started: dict[str, Any] = {}

    def fake_run(server: uvicorn.Server, sockets: list[socket.socket]) -> None:
        started.update(config=server.config, address=sockets[0].getsockname())
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    threads, port = torch.get_num_threads(), free_port()
    try:
        code, _, err = run_main(["serve", str(run), "--port", str(port), "--threads", "1", "--device", "cpu"],
                                capsys)
        assert torch.get_num_threads() == torch_threads(1)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert started["address"] == ("127.0.0.1", port) and started["config"].limit_concurrency >= 16
    with TestClient(started["config"].app) as started_client:
        assert started_client.get("/api/model").json()["run"] == run.name
    code, _, err = run_main(["serve", str(run.parent / "nothing-here"), "--port", str(port)], capsys)
    assert code == 1 and "nothing-here" in error_line(err)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_busy_port_is_one_line_before_anything_says_serving(run: Path, host: str) -> None:
    """Another program listens on the port: `imgrec serve` says so in one line (exit 1) and prints no URL."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = subprocess.run(serve_command(run, "--host", host, "--port", str(port)), env=QUIET,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    if host != "127.0.0.1":
        assert "no authentication" in lines.pop(0)  # the warning about binding beyond this machine comes first
    assert lines == [f"imgrec serve: error: cannot serve on {host}:{port}: the port is already in use (another "
                     f"server?): stop it or choose another --port"]


def test_an_unknown_host_is_one_line(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["serve", str(run), "--host", "no-such-host.invalid", "--port", str(free_port())], capsys)
    assert code == 1 and "cannot serve on no-such-host.invalid:" in error_line(err)
