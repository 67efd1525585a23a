"""Helpers for tests that start real processes: free ports, a started app, polling with a bound."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import zlib
from pathlib import Path
from typing import Optional

import httpx

from ops.tempstack import PYTHON, REPO, free_port, wait_for  # noqa: F401  (re-exported for the tests)
from ops.tempstack import app_env as tempstack_app_env


def app_env(tmp: Path, port: int, **settings) -> dict:
    """The app's environment with its outputs and admin token inside tmp."""
    return tempstack_app_env(
        tmp / "none.toml",
        port,
        **{"outputs_dir": tmp / "outputs", "admin_token_file": tmp / "admin.token", **settings},
    )


class AppProcess:
    """The real app (`python -m app`) on the tiny model, in a subprocess with its own port and dirs."""

    def __init__(self, tmp: Path, **settings):
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = app_env(tmp, self.port, **settings)
        self.log_path = tmp / "app.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "AppProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "app"],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 90) -> "AppProcess":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited with {self.proc.returncode}:\n{self.log()}")
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200

        try:
            wait_for(ready, timeout, 0.2, "app readiness")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- app log ---\n{self.log()[-4000:]}") from None
        return self

    def admin_token(self) -> str:
        return (self.tmp / "admin.token").read_text().strip()

    def fault(self, kind: str, **fields) -> None:
        """POST /admin/fault (the app runs with fault_injection on): `kind` with its fields."""
        headers = {"authorization": f"Bearer {self.admin_token()}"}
        r = httpx.post(self.url + "/admin/fault", json={"kind": kind, **fields}, headers=headers, timeout=5)
        assert r.status_code == 200, r.text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width×height pixels, and nothing behind it: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def post_and_leave(port: int, body: dict, stay_s: float, path: str = "/api/generate") -> None:
    """POST body as JSON over a raw socket, then close it after stay_s without reading a byte: a
    client that gave up waiting."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        time.sleep(stay_s)
