"""A process killed as it answers sends its answer whole or not at all (app.web.whole_answer): a real
uvicorn server in its own process, SIGKILLed by itself at the worst moments, read over a real socket.
The stock server, killed at the same moment, sends the head alone: the hazard is real, and these
tests tell the two apart."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.runtime.faults import FaultInjector

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve():
    procs = []

    def start(mode: str) -> int:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/app/answer_server.py"), str(port), mode],
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                assert proc.poll() is None, "the answer server exited"
                time.sleep(0.05)
        raise AssertionError("the answer server did not listen")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def ask(port: int, path: str) -> list[tuple[float, bytes]]:
    """Every piece the socket gave, with the seconds since the request, until the server closed."""
    pieces = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sent = time.monotonic()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        while data := sock.recv(65536):
            pieces.append((time.monotonic() - sent, data))
    return pieces


def received(pieces) -> bytes:
    return b"".join(data for _, data in pieces)


@pytest.mark.parametrize("path", ["/die-after-head", "/die-after-a-turn", "/api/generate"])
def test_a_server_killed_as_it_answers_sends_nothing_rather_than_a_head_alone(serve, path):
    assert received(ask(serve("whole"), path)) == b""


@pytest.mark.parametrize("path", ["/die-after-head", "/api/generate"])
def test_the_stock_server_killed_there_sends_the_head_alone(serve, path):
    got = received(ask(serve("stock"), path))
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\n"), got


def test_a_whole_answer_still_arrives_whole(serve):
    port = serve("whole")
    for _ in range(3):  # the server lives on: a corked answer leaves nothing behind for the next one
        got = received(ask(port, "/ok"))
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b'{"images": ["a made image"]}'), got


def test_a_large_answer_arrives_whole(serve):
    got = received(ask(serve("whole"), "/big"))
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == 3 * 2**20 + len(b'{"images": [""]}'), len(body)


def test_an_event_streams_head_goes_at_once(serve):
    pieces = ask(serve("whole"), "/stream")
    head_at = next(t for t, data in pieces if b"\r\n\r\n" in data)
    assert head_at < 0.8, pieces  # its first event comes a second after the head
    assert b"data: 0" in received(pieces) and b"data: 1" in received(pieces)


def test_die_answering_counts_down_and_is_cleared():
    faults = FaultInjector(enabled=True)
    faults.inject("die_answering", count=2)
    assert faults.state()["die_answering_pending"] == 2
    assert not faults.take_die_answering()  # not in the moment the admin's own answer leaves
    time.sleep(0.25)
    assert faults.take_die_answering() and faults.take_die_answering()
    assert not faults.take_die_answering()
    faults.inject("die_answering")
    time.sleep(0.25)
    faults.inject("clear")
    assert not faults.take_die_answering()
    assert not FaultInjector(enabled=False).take_die_answering()


def test_a_leak_being_filled_never_keeps_an_answer_waiting():
    """The event loop asks take_die_answering on every answer; a leak's fill takes seconds. The fill
    held the lock that asks for, so the loop waited out the whole fill (found by the drill: three
    liveness probes missed, the leak taken for a hang)."""
    import threading

    faults = FaultInjector(enabled=True)
    filling = threading.Thread(target=faults.inject, args=("leak",), kwargs={"megabytes": 1024})
    filling.start()
    try:
        time.sleep(0.05)
        asked = time.monotonic()
        faults.inject("die_answering")  # takes the lock: the fill must not hold it
        assert not faults.take_die_answering()
        assert time.monotonic() - asked < 0.1
    finally:
        filling.join()
    assert faults.state()["leaked_mb"] == 1024
