"""A program of the stack ends with the supervisord that started it.

Why: supervisord killed (the OOM killer, a stray `kill -9`) leaves its programs running with no one
to restart them, and an operator's `zimagectl up` then started a second set beside them: the new
app could not bind the port, `up` said "ready" from the old one's /readyz, and two monitors healed
one app through the new supervisord's socket. So each program asks the kernel for a signal when its
parent dies (PR_SET_PDEATHSIG), the one supervisord would send it to stop (TERM: the app drains and
exits, the monitor exits; USR1: HAProxy's soft stop). `zimagectl up` waits for them to be gone
(ops/leftovers.py).

Linux only; elsewhere nothing is set. The signal survives exec (not setuid), so
`python -m common.parent SIGNAL COMMAND...` sets it and becomes COMMAND, for a program that is not
ours (HAProxy)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# The file supervisord writes this program's output to (its stdout_logfile), set in the program's
# environment by supervisor/*.conf: where the program writes itself once supervisord is gone.
LOG_ENV = "ZIMAGE_LOG"
_parent: int | None = None  # the parent as first seen by die_with_parent


def started_by_supervisord(env=os.environ) -> bool:
    return env.get("SUPERVISOR_ENABLED") == "1"


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent exits. `parent` is the parent's pid
    as first seen (the caller's getppid() at its start): gone already, and the signal comes now.
    Returns whether it was set (False where prctl is not there)."""
    global _parent
    parent = os.getppid() if parent is None else parent
    _parent = parent
    if not sys.platform.startswith("linux"):
        return False
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig)) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request: nothing would ever come
        os.kill(os.getpid(), sig)
    return True


def orphaned() -> bool:
    """Whether the parent die_with_parent saw has died (this process was handed to another)."""
    return _parent is not None and os.getppid() != _parent


def write_to_own_log(env=os.environ) -> bool:
    """stdout and stderr were the pipe to supervisord, gone with it (every write fails from then on):
    point both at the log file supervisord wrote them to, appending, so what the program says while
    it ends (the app's drain) is still there to read. Returns whether it could."""
    path = env.get(LOG_ENV)
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return False
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return True


def main(argv: list[str]) -> None:
    """python -m common.parent SIGNAL COMMAND [ARG...]: SIGNAL (TERM, USR1, …) on the parent's death,
    then exec COMMAND (the same pid: supervisord's pid for the program stays right)."""
    if len(argv) < 2:
        raise SystemExit("usage: python -m common.parent SIGNAL COMMAND [ARG...]")
    name = argv[0].upper()
    die_with_parent(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
