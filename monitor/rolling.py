"""The rolling heal across replicas: one disruptive action at a time, and never one that leaves no
replica serving.

Each replica has its own monitor (supervisor/monitor-replicas.conf). The policy already holds a
restart of a replica that serves while another is not ready (monitor/policy.py, from this tick's
peer probes); this slot closes the race between two monitors that decide in the same tick. It is
an flock on run/heal.lock, held for the whole action (drain, stop, start, warm-up check): the
kernel releases it when the monitor dies, so a killed monitor never leaves it taken. Once held,
the peers are asked again."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx

from common.polling import poll_until

DISRUPTIVE = ("restart", "kill")  # actions that take a serving replica out of the pool


class HealSlot:
    def __init__(self, lock_path: Path, own_url: str, peer_urls: tuple[str, ...], wait_s: float):
        self.lock_path = lock_path
        self.own_url = own_url.rstrip("/")
        self.peer_urls = tuple(u.rstrip("/") for u in peer_urls)
        self.wait_s = wait_s  # how long to wait for another replica's action to finish

    @staticmethod
    def _ready(url: str) -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def refusal(self, action: str) -> Optional[str]:
        """Why `action` must wait now, or None: only a replica that serves is protected."""
        if action not in DISRUPTIVE or not self._ready(self.own_url):
            return None
        down = [u for u in self.peer_urls if not self._ready(u)]
        if down:
            return f"{len(down)} other replica(s) not ready ({', '.join(down)}); this one keeps serving"
        return None

    @contextmanager
    def hold(
        self, action: str, sleep: Callable[[float], None], check: bool = True
    ) -> Iterator[Optional[str]]:
        """Yields None once this monitor holds the slot and may act, or the reason it may not."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:

            def take() -> bool:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            if not poll_until(take, self.wait_s, 0.2, sleep=sleep):
                yield f"another replica's heal still runs after {self.wait_s:.0f} s"
                return
            try:
                yield self.refusal(action) if check else None
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
