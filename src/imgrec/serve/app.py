"""The web app of `imgrec serve`: one page and a small JSON API around a Predictor.

  GET  /             the page (static/index.html from the package: self-contained, works offline)
  POST /api/predict  multipart field `file` (+ ?topk=) -> top classes, unsure, OOD score, the model's input as PNG
  GET  /api/model    the model card (card.py)
  GET  /healthz      {"status": "ok"}
  GET  /docs         FastAPI's OpenAPI page (its Swagger assets come from a CDN; the app itself needs none)

Errors are JSON {"detail": one readable line}: 413 upload over the limit (limits.py), 415 not an image (or not a
multipart form), 422 an empty, damaged or decompression-bomb image, a malformed multipart body or a bad parameter. Uploads are decoded by the
training decoder (data.imageio.load_image) and prepared by Predictor.prepare, so the server sees an image exactly
as `imgrec predict` does. Decoding and inference run in worker threads, at most `max_concurrent` at a time, so the
event loop keeps answering while the model works.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from imgrec import __version__
from imgrec.data.imageio import ImageDecodeError, ImageTooLargeError, NotAnImageError, load_image
from imgrec.inference import Predictor
from imgrec.serve.limits import BodyLimit

FORM_OVERHEAD = 16 * 1024  # multipart boundary and part headers around the file, allowed on top of the limit
ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"description": "the upload is larger than --max-upload-mb"},
    415: {"description": "not an image (or not a multipart form)"},
    422: {"description": "an empty, damaged or decompression-bomb image, a malformed multipart body, or a bad parameter"},
}


@dataclass(frozen=True)
class ServeSettings:
    """What the server allows: the upload size (bytes) and how many predictions run at once."""

    max_upload_bytes: int = 10 * 2**20  # the file; the form around it may add FORM_OVERHEAD
    max_concurrent: int = 1


def create_app(predictor: Predictor, card: dict[str, Any], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app serving one model; its lifespan sets up the limiter (uvicorn runs it, as does a TestClient
    used as a context manager)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.limiter = anyio.CapacityLimiter(settings.max_concurrent)
        yield

    app = FastAPI(title="imgrec serve", version=__version__, lifespan=lifespan,
                  description=f"Try the model of run {card.get('run')!r}: POST an image to /api/predict.")
    megabytes = f"{settings.max_upload_bytes / 2**20:.3g} MB"
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD,
                       detail=f"the file is larger than the {megabytes} upload limit: send a smaller image "
                              f"(the server's --max-upload-mb sets the limit)")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    _add_routes(app, predictor, {**card, "max_upload_mb": float(f"{settings.max_upload_bytes / 2**20:.3g}")},
                settings.max_upload_bytes)
    return app


def _add_routes(app: FastAPI, predictor: Predictor, card: dict[str, Any], max_upload_bytes: int) -> None:
    """The page, the health check, the model card and the prediction endpoint."""
    page = page_html(max_upload_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok"}

    @app.get("/api/model")
    async def model() -> dict[str, Any]:
        """The model card: data set, model, classes, test accuracy and when it was measured, the upload limit."""
        return card

    @app.post("/api/predict", responses=ERRORS)
    async def predict(request: Request,
                      file: Annotated[UploadFile, File(description="the image (any format Pillow reads)")],
                      topk: Annotated[int, Query(ge=1, le=1000, description="how many best classes to return")] = 3,
                      ) -> dict[str, Any]:
        """Classify one uploaded image: its top classes, whether it looks like none of them, what the model saw."""
        name = _display_name(file.filename)
        data = await file.read()
        if not data:
            raise HTTPException(422, f"{name} is empty (0 bytes): pick an image file")
        try:
            return await anyio.to_thread.run_sync(classify, predictor, data, name, topk,
                                                  limiter=request.app.state.limiter)
        except NotAnImageError:
            raise HTTPException(415, f"{name} is not an image imgrec can read: send a PNG, JPEG, GIF, BMP, TIFF "
                                     f"or WebP file") from None
        except ImageTooLargeError:
            raise HTTPException(422, f"{name} declares too many pixels to decode safely (a decompression bomb?): "
                                     f"send a smaller image") from None
        except ImageDecodeError as exc:
            raise HTTPException(422, f"{name} is damaged or truncated: {_reason(str(exc), name)}") from None


# The page needs nothing from elsewhere: its own inline style and script, and images from data: and blob: URLs;
# no other site may show it in a frame (clickjacking), and browsers take it as the HTML it says it is (nosniff).
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                           "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}
LIMIT_PLACEHOLDER = '<meta name="imgrec-max-upload-bytes" content="">'


def page_html(max_upload_bytes: int) -> str:
    """The page, with the upload limit written in, so that it refuses a larger file before sending it."""
    page = resources.files("imgrec.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    assert page.count(LIMIT_PLACEHOLDER) == 1, "static/index.html lost its upload limit placeholder"
    return page.replace(LIMIT_PLACEHOLDER, LIMIT_PLACEHOLDER.replace('content=""', f'content="{max_upload_bytes}"'))


def classify(predictor: Predictor, data: bytes, name: str, topk: int) -> dict[str, Any]:
    """Decode uploaded bytes like a training file, predict, and describe the answer as JSON (runs in a thread)."""
    image = load_image(io.BytesIO(data), predictor.preprocessing.channels, name=name)
    model_input = predictor.prepare(image)  # uint8 (C, H, W): what the model sees
    prediction = predictor.predict(model_input.unsqueeze(0), topk=min(topk, len(predictor.classes)))[0]
    rule = predictor.ood
    unsure = None if prediction.in_distribution is None else not prediction.in_distribution
    return {
        "label": prediction.label,
        "probability": prediction.probability,
        "top": [{"label": label, "probability": p} for label, p in prediction.topk],
        "unsure": unsure,
        "ood": {"score": rule.score if rule else "energy", "value": _finite(prediction.ood_score),
                "threshold": rule.threshold if rule else None},
        "input_png": png_data_url(model_input.numpy()),
    }


def png_data_url(image: np.ndarray) -> str:
    """A uint8 (C, H, W) array as a data: URL of a PNG."""
    array = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _display_name(filename: str | None) -> str:
    """The client's file name, only ever shown in messages (never used as a path), kept short and printable."""
    text = "".join(c for c in (filename or "") if c.isprintable()).strip()
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    return repr(text[:80] + ("..." if len(text) > 80 else "")) if text else "the upload"


def _reason(message: str, name: str) -> str:
    """The decoder's message without its leading '<name>: '."""
    return message[len(name) + 2:] if message.startswith(name + ": ") else message


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


async def _http_error(request: Request, exc: Exception) -> Any:
    """HTTP errors as FastAPI answers them, except the form parser's 400 for a body that says it is a multipart
    form and is not one: 422 with one line, like every other unusable upload."""
    assert isinstance(exc, HTTPException)
    if exc.status_code != 400:
        return await http_exception_handler(request, exc)
    reason = " ".join(str(exc.detail).split()).rstrip(".") or "unreadable"
    return JSONResponse({"detail": f"the upload is not a well-formed multipart/form-data body ({reason}): send the "
                                   f"image as a file in the field 'file'"}, status_code=422)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Validation errors as one readable line (415 when the body is not a multipart form at all)."""
    assert isinstance(exc, RequestValidationError)
    if request.method == "POST" and not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return JSONResponse({"detail": "send the image as a multipart/form-data upload in the field 'file'"},
                            status_code=415)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
        if where == "file" and error.get("type") == "missing":
            problems.append("no image: send it as a multipart/form-data upload in the field 'file'")
        else:
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)
