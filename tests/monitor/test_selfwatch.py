"""The monitor's loop watchdog: quiet while the loop beats, and past its bound a real process writes
its stacks, leaves a marker saying where it hung and exits with EXIT_STALLED."""

import json
import os
import subprocess
import sys
import threading
import time

from common.jsonfile import read_dict as read_marker
from monitor.selfwatch import EXIT_STALLED, LoopWatchdog, where_stuck


def test_beats_keep_it_quiet_and_silence_past_the_bound_calls_the_stall(tmp_path):
    now = [100.0]
    stalls = []
    dog = LoopWatchdog(30.0, tmp_path / "m.json", clock=lambda: now[0], on_stall=stalls.append)
    for _ in range(10):  # a loop that turns every 20 s
        now[0] += 20
        assert not dog.check()
        dog.beat()
    now[0] += 30
    assert not dog.check() and stalls == []  # at the bound, not past it
    now[0] += 0.5
    assert dog.check() and stalls == [30.5]


def test_where_stuck_names_the_function_a_thread_waits_in():
    release = threading.Event()

    def stuck_in_a_probe():
        release.wait(10)

    thread = threading.Thread(target=stuck_in_a_probe)
    thread.start()
    try:
        time.sleep(0.2)
        assert "in stuck_in_a_probe" in where_stuck(thread.ident)
    finally:
        release.set()
        thread.join()
    assert where_stuck(None) == "unknown"


def test_a_wedged_process_exits_with_its_stacks_and_a_marker(tmp_path):
    marker = tmp_path / "monitor-stalled.json"
    code = f"""
import time
from pathlib import Path
from monitor.selfwatch import LoopWatchdog

def wedged_nvml_call():
    time.sleep(60)

LoopWatchdog(0.5, Path({str(marker)!r}), check_every_s=0.1).start()
wedged_nvml_call()
"""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=os.getcwd(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == EXIT_STALLED, done.stderr
    assert time.monotonic() - started < 20  # not the 60 s sleep
    first = json.loads(done.stderr.splitlines()[0])
    assert first["event"] == "monitor_stalled" and first["silent_s"] >= 0.5
    assert "wedged_nvml_call" in done.stderr  # every thread's stack, the stuck one's included
    left = read_marker(marker)
    assert left["bound_s"] == 0.5 and "in wedged_nvml_call" in left["where"] and left["pid"] > 0
    assert read_marker(tmp_path / "none.json") is None


def test_a_loop_whose_every_turn_raises_is_no_progress_and_its_marker_says_what_it_raised(tmp_path):
    """Turning fast and healing nothing is a stall too: the watchdog is told each failure instead of
    a beat, and past the bound the process exits with the error in its marker."""
    marker = tmp_path / "monitor-stalled.json"
    code = f"""
import time
from pathlib import Path
from monitor.selfwatch import LoopWatchdog

dog = LoopWatchdog(0.5, Path({str(marker)!r}), check_every_s=0.1).start()
while True:  # a loop that turns every 10 ms, every turn raising
    dog.failing("KeyError: 'gpu' at detectors.py:12 in detect_leak")
    time.sleep(0.01)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=os.getcwd(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == EXIT_STALLED, done.stderr
    left = read_marker(marker)
    assert left["error"] == "KeyError: 'gpu' at detectors.py:12 in detect_leak", left
    assert left["where"] == "every turn of its loop failing"


def test_a_beat_after_failures_clears_the_error(tmp_path):
    now = [0.0]
    stalls = []
    dog = LoopWatchdog(30.0, tmp_path / "m.json", clock=lambda: now[0], on_stall=stalls.append)
    dog.failing("RuntimeError: once")
    now[0] += 20
    dog.beat()  # the next turn went through
    now[0] += 20
    assert not dog.check() and dog._error is None
