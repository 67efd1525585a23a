"""What stands in the way of `zimagectl up` starting a stack: what a dead supervisord left running
(seen gone first), and a port some other program holds (told, instead of a start that cannot bind).

A program of this home is told to stop when its supervisord dies (common/parent.py): the app drains
its in-flight work and exits, the monitor exits, HAProxy stops softly. `up` in the meantime would
start a second set beside them (a port already taken, two monitors on one app), so it waits for
them, as supervisord would have on a stop: up to the app's stopwaitsecs, then SIGKILL to each one's
process group (killasgroup).

Found by their environment: supervisord gives its children SUPERVISOR_ENABLED=1, and `zimagectl`
starts it with ZIMAGE_HOME; their own children (the ranks, HAProxy's worker) inherit both. Asked
only when this home's supervisord does not answer, so whatever matches is left over."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psutil

from common.contract import supervisor_stopwaitsecs

if TYPE_CHECKING:
    from ops.stack import Stack


def find(home: Path) -> list[psutil.Process]:
    """The processes a supervisord of `home` started (and their children), other than this one and
    its ancestors (an operator may run zimagectl from a shell with the same environment)."""
    home = home.resolve()
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            env = proc.environ()
            if env.get("SUPERVISOR_ENABLED") != "1" or not env.get("ZIMAGE_HOME"):
                continue
            if Path(env["ZIMAGE_HOME"]).resolve() == home and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):  # gone, or another user's (not ours to judge)
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    parts = []
    for proc in procs:
        try:
            command = " ".join(proc.cmdline()[:4])
        except psutil.Error:
            command = "?"
        parts.append(f"pid {proc.pid} ({command[:80]})")
    return ", ".join(parts)


def see_gone(home: Path, bound_s: float, say: Callable[[str], None]) -> None:
    """Return once nothing of `home`'s dead supervisord is running: waiting up to bound_s for them
    to finish, then killing what is left (each one's process group)."""
    procs = find(home)
    if not procs:
        return
    say(
        f"supervisord is gone but {len(procs)} of its processes still run: {describe(procs)}; "
        f"they stop by themselves (their parent died): waiting up to {bound_s:.0f} s"
    )
    _, alive = psutil.wait_procs(procs, timeout=bound_s)
    if not alive:
        say("they have exited")
        return
    say(f"still running after {bound_s:.0f} s, killed: {describe(alive)}")
    for proc in alive:
        try:
            group = os.getpgid(proc.pid)
            if group == os.getpgid(0):  # never our own group
                proc.kill()
            else:
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, psutil.Error):
            pass
    psutil.wait_procs(alive, timeout=10)


def taken_ports(host: str, ports: list[int]) -> list[int]:
    """The ports of `ports` that cannot be bound on `host` now (something listens there)."""
    taken = []
    for port in ports:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and HAProxy bind
            try:
                sock.bind((host, port))
            except OSError:
                taken.append(port)
    return taken


def clear_the_way(stack: "Stack", say: Callable[[str], None]) -> bool:
    """Before a supervisord of `stack` starts (none answers): what the last one left is gone, and
    every port the stack binds is free. False (and said why) when a port is held by another program."""
    program_conf = stack.home / "supervisor" / ("app-replicas.conf" if stack.replicated else "app.conf")
    see_gone(stack.home, supervisor_stopwaitsecs(program_conf) or 180.0, say)
    ports = [stack.app.port] + [r.port for r in stack.replicas if r.port != stack.app.port]
    if stack.replicated:
        ports.append(stack.app.balancer_stats_port)
    taken = taken_ports(stack.app.host or "0.0.0.0", ports)
    if taken:
        say(f"error: port(s) {taken} already in use by another program; free them or change [app] ports")
        return False
    return True


def main() -> int:
    """python -m ops.leftovers: clear_the_way for the stack of ZIMAGE_HOME (systemd's ExecStartPre:
    supervisord runs in the foreground there, without `zimagectl up`)."""
    from ops.stack import Stack

    return 0 if clear_the_way(Stack.load(), lambda line: print(line, flush=True)) else 1


if __name__ == "__main__":
    sys.exit(main())
