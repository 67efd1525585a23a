"""Request bodies bounded as they arrive: an ASGI middleware around the whole app (API, Gradio,
admin). A Content-Length over the limit is refused before a byte of the body is read; a chunked
body (no Content-Length) is counted on `receive` and refused at the first chunk that crosses the
limit, without reading the rest. uvicorn stops reading the socket while nobody calls `receive`
(its flow control), so a 64 MiB upload never sits in the app's memory.

Why not FastAPI middleware: `@app.middleware("http")` sees only headers, and a chunked body has
none that tells its size; and the Gradio routes mounted on the app need the same bound."""

from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable, Optional

log = logging.getLogger("app.web.bodylimit")

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """Raised from `receive` to whatever reads the body; the middleware answers 413 instead."""


def json_413(limit: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The API's error shape (app.web.schemas.ErrorResponse), built by hand: this runs outside FastAPI."""
    body = {"error": "body_too_large", "message": f"request body over {limit} bytes; send a smaller body"}
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    return headers, data


class BodyLimit:
    """`limit_for(path)` gives the byte limit of a request to that path (uploads get a larger one)."""

    def __init__(self, app, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _refuse(send, limit)
            return
        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:  # asked again after the refusal: the body is abandoned, not read
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the inner app makes of the exception, the answer is ours: 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over:
            log.warning(
                "request body over the limit",
                extra={
                    "event": "body_too_large",
                    "path": scope.get("path"),
                    "limit_bytes": limit,
                    "received_bytes": received,
                    "chunked": length is None,
                },
            )
            if not started:
                await _refuse(send, limit)


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _refuse(send: Send, limit: int) -> None:
    headers, data = json_413(limit)
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": data})
