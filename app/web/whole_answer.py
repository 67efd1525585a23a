"""An answer's head never reaches the socket without its body: a replica killed as it answers
leaves the balancer an empty answer, which HAProxy sends again to another replica
(`retry-on empty-response`), not a head without its body, which it must pass on (the client gets a
truncated response, "peer closed connection without sending complete message body").

Found by CI: a replica SIGKILLed under load cost one client that truncated response, once in many
runs of test_replicas. The head had left alone twice over:
- the app's http middleware (Starlette's BaseHTTPMiddleware) hands the response on through a
  memory channel, so the event loop ran between the head and the body;
- uvicorn's h11 protocol writes the head, the body and the end of the message in three writes.
Each of the two parts below closes one:
- HeadWithBody (ASGI middleware, outermost): holds `http.response.start` until the first body
  message, and sends them back to back. An event stream's head goes at once (it commits to no
  body, and a browser waits for it).
- CorkedTransport (app.web.protocol.ServerProtocol writes through it): gathers what one turn of
  the event loop writes and gives it to the socket in one write.
What stays: an answer larger than the socket's send buffer (a big base64 image) is written in parts,
and a kill between them still truncates it; a stream cut short is never retried.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Awaitable, Callable

Message = dict
Send = Callable[[Message], Awaitable[None]]


class HeadWithBody:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None

        async def send_head_with_body(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and not _is_stream(message):
                held = message
                return
            if held is not None:
                head, held = held, None
                await send(head)
            await send(message)

        await self.app(scope, receive, send_head_with_body)
        # A head and no body: whatever the app meant, the server gets what it sent.
        if held is not None:
            await send(held)


def _is_stream(start: Message) -> bool:
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-type":
            return value.split(b";")[0].strip().lower() == b"text/event-stream"
    return False


class CorkedTransport:
    """A transport whose writes within one turn of the event loop reach the socket as one write.

    Everything but write/close/abort/write_eof goes to the real transport (flow control, peer
    address, set_protocol)."""

    # Past this much gathered, it goes at once (with what came before it: a head and its large body
    # still leave together): the socket's flow control must see a large stream as it is written, or
    # an app writing it in one turn would gather all of it here.
    FLUSH_AT = 2**16

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size >= self.FLUSH_AT:
            self.flush()

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._size = 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class DieAnswering:
    """Fault hook (`fault_injection = true` only; `zimagectl chaos die-answering`): the app SIGKILLs
    itself right after handing the server the head of a generation's answer, the worst moment a
    replica can be killed. Outside HeadWithBody, so the head it lets through comes with its body
    right behind: only the corked transport then keeps the head off the wire."""

    def __init__(self, app, should_die: Callable[[], bool]):
        self.app = app
        self.should_die = should_die

    async def __call__(self, scope, receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/api/generate":
            await self.app(scope, receive, send)
            return

        async def send_then_die(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start" and message["status"] == 200 and self.should_die():
                os.kill(os.getpid(), signal.SIGKILL)

        await self.app(scope, receive, send_then_die)
