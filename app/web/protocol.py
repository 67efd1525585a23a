"""The HTTP protocol the app serves with: uvicorn's h11, with two things uvicorn leaves out.

- Whole answers: it writes through a CorkedTransport (app.web.whole_answer says why).
- Deadlines for the client. uvicorn waits for a request as long as the client likes: a connection
  that sends half a head, or declares a body and stops sending it, was held for good (measured: no
  answer in 70 s, nor ever). Each such connection holds a file descriptor; a few hundred from one
  client (slowloris) use up the process's, and then the app can open neither sockets nor files.
  Now, as in nginx (client_header_timeout, client_body_timeout) and HAProxy (timeout http-request):
  - a request's head must arrive whole within `timeout_s` of the connection's opening (or of the
    last answer on it);
  - its body may pause no longer than `timeout_s` between two pieces (a slow upload still goes
    through; a stopped one does not);
  past either, the client gets a 408 with the API's JSON reason, and the connection closes. A
  connection that sent nothing is closed without a word (a browser's speculative connection: an
  answer it never asked for confuses it). While the app itself stopped reading (uvicorn's flow
  control: a large body the app has not yet taken), the client is not to blame and waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.web.whole_answer import CorkedTransport

log = logging.getLogger("app.web.protocol")

# In a request's ASGI scope: the protocol answered it 408 because its body stopped coming. The app,
# told the client is gone, makes a 400 of the body it never got; the access log shows the 408.
TIMED_OUT = "zimage.timed_out"


def logged_status(scope, status: int) -> int:
    """The status the access log shows for a request the app answered with `status`."""
    return 408 if scope.get(TIMED_OUT) else status


class ServerProtocol(H11Protocol):
    timeout_s: float = 30.0  # set per server by protocol_class()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: Optional[asyncio.TimerHandle] = None
        self._heard = False  # bytes of the request under way have arrived
        super().connection_made(CorkedTransport(transport, asyncio.get_running_loop()))
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._heard = True
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm()  # the body's clock counts the pause since this piece
        elif state is not h11.IDLE:
            self._disarm()  # the request is whole (or the connection is ending): the app's time now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._heard = False
            self._arm()  # the next request on this connection gets its own time

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()  # a websocket keeps its own time
        corked = self.transport
        if isinstance(corked, CorkedTransport):  # a websocket frames its own writes
            corked.flush()
            self.transport = corked._transport
        super().handle_websocket_upgrade(event)

    # ---- the deadline ----------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_s, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE and not self._heard:
            self.transport.close()  # opened and said nothing: no answer owed
            return
        if state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.flow.read_paused:
            self._arm()  # the app has not taken what came: the pause is ours, not the client's
            return
        cycle = self.cycle
        body_under_way = state is h11.SEND_BODY and cycle is not None and not cycle.response_complete
        if state is h11.IDLE or (body_under_way and not cycle.response_started):
            self._send_408("head" if state is h11.IDLE else "body")
            if body_under_way:
                cycle.scope[TIMED_OUT] = True
        if body_under_way:
            # The app waits in receive(): it hears that the client is gone, and its answer goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _send_408(self, part: str) -> None:
        # Raw bytes, not h11's state machine: h11 cannot answer a head it has not parsed yet, and the
        # connection closes right after.
        what = "its head whole" if part == "head" else "the next piece of its body"
        message = f"the request did not send {what} within {self.timeout_s:g} s; send it again"
        body = json.dumps({"error": "request_timeout", "message": message}).encode()
        head = (
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        log.info("request timed out", extra={"event": "request_timeout", "part": part, "client": self.client})


def protocol_class(timeout_s: float) -> type[ServerProtocol]:
    """uvicorn makes one protocol object per connection from a class: this one, with its deadline."""
    return type("ServerProtocol", (ServerProtocol,), {"timeout_s": timeout_s})
