"""The monitor's view of the app's process tree, on real processes: a stopped child (a rank, a
worker) is found as surely as a stopped app."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil

from monitor.probes import first_stopped, process_tree
from tests.helpers import wait_for

# A parent that starts one child and waits on it: the shape of an app with one follower rank.
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def test_first_stopped_names_a_stopped_child_and_then_the_stopped_root_first():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        tree = process_tree(parent.pid)
        assert [p.pid for p in tree] == [parent.pid, child]
        assert first_stopped(tree) is None
        parent_proc = psutil.Process(parent.pid)
        child_proc = psutil.Process(child)
        child_proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: child_proc.status() == psutil.STATUS_STOPPED, 10, 0.02, "child stopped")
        assert first_stopped(process_tree(parent.pid)) == child
        parent_proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: parent_proc.status() == psutil.STATUS_STOPPED, 10, 0.02, "parent stopped")
        assert first_stopped(process_tree(parent.pid)) == parent.pid  # the app's own stop first
        parent_proc.send_signal(signal.SIGCONT)
        child_proc.send_signal(signal.SIGCONT)
        wait_for(lambda: first_stopped(process_tree(parent.pid)) is None, 10, 0.02, "both resumed")
        # a child gone between the listing and the look is skipped, not an error
        tree = process_tree(parent.pid)
        child_proc.kill()  # a zombie until its parent reaps it: its status is no longer "stopped"
        wait_for(lambda: not child_proc.is_running() or child_proc.status() == "zombie", 10, 0.02, "gone")
        assert first_stopped(tree) is None
    finally:
        for pid in (child, parent.pid):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        parent.wait(10)
