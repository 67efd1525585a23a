"""The operator's maintenance mark: a small JSON file that tells a monitor "a stop or a pid change is
planned here: observe, do not heal", until a deadline or until the command that wrote it is gone.

Why the owner: `zimagectl restart` marks 930 s (its timeout + 30). Killed halfway (its terminal
closed: SIGHUP ends Python without its `finally`), its mark used to hold the healing off for the
rest of those 15 minutes while the app might be stopped or drained. The mark now names the process
that wrote it (pid, start time, pid namespace); a monitor that can see that process is gone voids
the mark at once. One that cannot tell (another pid namespace, a mark without an owner) keeps the
deadline, the bound it always had."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import psutil

from common.jsonfile import write_atomic


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"; a pid means nothing across them
    except OSError:
        return None


def _start_time(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def this_process() -> dict:
    pid = os.getpid()
    return {"pid": pid, "started": _start_time(pid), "pidns": _pid_namespace(), "uid": os.getuid()}


def write_mark(path: Path, seconds: float, reason: str, now: Optional[float] = None) -> None:
    """Atomically (a reader never sees half a mark), owned by this process."""
    until = (time.time() if now is None else now) + seconds
    write_atomic(path, {"until": until, "reason": reason, "owner": this_process()})


def owner_alive(owner: object) -> Optional[bool]:
    """True/False when this process can tell whether the mark's writer still runs; None when it
    cannot (no owner recorded, another pid namespace, no start time to rule out a reused pid, or
    another user's process, which /proc mounted with hidepid shows as absent)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    if owner.get("pidns") is None or owner.get("pidns") != _pid_namespace():
        return None
    if owner.get("uid") != os.getuid() and os.getuid() != 0:
        return None
    started = owner.get("started")
    if not isinstance(started, (int, float)):
        return None
    now_started = _start_time(owner["pid"])
    # A different start time is another process that got the pid since: the writer is gone.
    return now_started is not None and abs(now_started - started) < 0.5


def mark_status(data: object, wall: float, alive: Callable[[object], Optional[bool]]) -> tuple[bool, str]:
    """(in force, why) for a mark's content at `wall`. Pure but for `alive` (injected in tests)."""
    if not isinstance(data, dict) or not isinstance(data.get("until"), (int, float)):
        return False, "unreadable"
    if data["until"] <= wall:
        return False, "expired"
    if alive(data.get("owner")) is False:
        return False, "owner gone"
    return True, "in force"
