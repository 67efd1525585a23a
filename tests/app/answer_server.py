"""A uvicorn server whose process SIGKILLs itself partway through an answer, for
tests/app/test_whole_answer.py. argv: port, mode: "whole" (HeadWithBody and
app.web.protocol.ServerProtocol, as app.web.server and app.web.api run them) or "stock" (uvicorn's
own h11, nothing added).

Paths: /ok answers whole; /big answers 3 MiB whole; /die-after-head dies as soon as the server took
the head; /die-after-a-turn lets the event loop run once between head and body (as
BaseHTTPMiddleware does), then dies; /api/generate dies through the app's fault hook (DieAnswering,
outermost): after the server wrote the head and before it writes the body; /stream is an event
stream whose first event comes a second after its head."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import uvicorn

from app.web.protocol import ServerProtocol
from app.web.whole_answer import DieAnswering, HeadWithBody

BODY = b'{"images": ["a made image"]}'
BIG = b'{"images": ["' + b"A" * (3 * 2**20) + b'"]}'  # a base64 answer, over the socket's buffers


async def answers(scope, receive, send):
    path = scope["path"]
    stream = path == "/stream"
    body = BIG if path == "/big" else BODY
    kind = b"text/event-stream" if stream else b"application/json"
    headers = [(b"content-type", kind)] + ([] if stream else [(b"content-length", str(len(body)).encode())])
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if path == "/die-after-a-turn":
        await asyncio.sleep(0.05)
    if path.startswith("/die-"):
        os.kill(os.getpid(), signal.SIGKILL)
    if stream:
        await asyncio.sleep(1.0)
        for n in range(2):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % n, "more_body": True})
    await send({"type": "http.response.body", "body": b"" if stream else body})


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), sys.argv[2]
    whole = mode == "whole"
    uvicorn.run(
        DieAnswering(HeadWithBody(answers) if whole else answers, should_die=lambda: True),
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        http=ServerProtocol if whole else "h11",
    )
