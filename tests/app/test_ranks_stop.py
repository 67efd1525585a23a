"""Rank 0's stop: the other ranks are waited for (reaped: no process of the group outlives the
program) and a rank that does not stop in time is killed, without the watcher taking that for a
crash of the group (exit 70). Real child processes; no GPU involved."""

import subprocess
import sys
import time

from app.ranks import Ranks


def child(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_ranks_that_stop_are_reaped_and_one_that_does_not_is_killed():
    quick, stuck = child(0.3), child(60)
    group = Ranks([quick, stuck])
    group.watch()  # a watcher that saw a rank die outside a stop would end this process (exit 70)
    started = time.monotonic()
    group.stop(timeout_s=2.0)
    assert time.monotonic() - started < 10
    assert quick.returncode == 0 and stuck.returncode == -9  # both reaped: no zombie, no straggler
    time.sleep(0.3)  # the watcher threads have seen both exits, and this process is still here
