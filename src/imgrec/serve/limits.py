"""The upload limit as ASGI middleware: a too-large request body is refused with 413 before it is read whole.

Two checks, because a client need not announce a length: a Content-Length over the limit is answered at once
(the app never runs and no body byte is parsed), and the bytes actually received are counted as they stream in
(chunked transfer encoding has no length; the count does not trust the header either), so parsing stops at the
first chunk past the limit. The whole body is never held: the form parser spools what it gets, and it never gets
more than the limit.

After a 413 the connection closes the way nginx's lingering close does: the answer goes out first, then what the
client is still sending is read and dropped (for at most LINGER_SECONDS, and until it pauses for
LINGER_IDLE_SECONDS), and only then is the connection closed. Closing with unread data makes the kernel answer
with a reset, and a client that sends its whole body before reading (Python's urllib, some browsers) would then
see "connection reset" instead of the 413.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LINGER_SECONDS = 30.0  # at most this long reading and dropping a refused body (nginx's lingering_time)
LINGER_IDLE_SECONDS = 5.0  # and no longer than this waiting for its next bytes (nginx's lingering_timeout)
CLOSE = (b"connection", b"close")


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
            # a client that asked to be told before it sends (Expect: 100-continue) sends nothing: nothing to drop
            await _refuse(send, self.detail, None if _expects_continue(scope) else receive)
            return
        received = 0
        more_body = True  # the client may still be sending
        refused = started = False

        async def limited_receive() -> Message:
            nonlocal received, more_body, refused
            message = await receive()
            more_body = message["type"] == "http.request" and message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    raise UploadTooLarge(self.detail)
            return message

        async def lingering_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if refused:
                    message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            elif refused and more_body and not message.get("more_body", False):  # the answer's last part
                await send({**message, "more_body": True})
                await _drop_body(receive)
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        try:
            await self.app(scope, limited_receive, lingering_send)
        except UploadTooLarge:  # only when no exception handler turned it into the response already
            if started:
                raise
            await _refuse(send, self.detail, receive if more_body else None)


def _content_length(scope: Scope) -> int | None:
    """The Content-Length header as an int (None when absent or not a number: then the count decides)."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _expects_continue(scope: Scope) -> bool:
    return any(key == b"expect" and value.lower() == b"100-continue" for key, value in scope.get("headers", []))


async def _refuse(send: Send, detail: str, unread: Receive | None) -> None:
    """Answer 413 (connection: close), then drop what the client still sends through `unread`, then close."""
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          CLOSE]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": unread is not None})
    if unread is not None:
        await _drop_body(unread)
        await send({"type": "http.response.body", "body": b""})


async def _drop_body(receive: Receive) -> None:
    """Read and drop the rest of a request body, for a bounded time (see the module's docstring)."""
    deadline = anyio.current_time() + LINGER_SECONDS
    while (left := deadline - anyio.current_time()) > 0:
        with anyio.move_on_after(min(left, LINGER_IDLE_SECONDS)) as waiting:
            message = await receive()
        if waiting.cancelled_caught or message["type"] != "http.request" or not message.get("more_body", False):
            return
