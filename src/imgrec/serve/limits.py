"""The upload limit as ASGI middleware: a too-large request body is refused with 413 before it is read whole.

Two checks, because a client need not announce a length: a Content-Length over the limit is answered at once
(the app never runs and no body byte is read), and the bytes actually received are counted as they stream in
(chunked transfer encoding has no length; the count does not trust the header either), so reading stops at the
first chunk past the limit. The whole body is never held: the form parser spools what it gets, and it never gets more than the limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class UploadTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit; FastAPI passes HTTPExceptions through as they are."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413), by header first, then by counting streamed bytes."""

    def __init__(self, app: ASGIApp, max_bytes: int, detail: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await _send_json(send, 413, self.detail)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self.detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except UploadTooLarge:  # only when no exception handler turned it into the response already
            if started:
                raise
            await _send_json(send, 413, self.detail)


def _content_length(scope: Scope) -> int | None:
    """The Content-Length header as an int (None when absent or not a number: then the count decides)."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
