"""The monitor wedged: one of its probes never returns (fault injection: as an NVML call into a
wedged driver would); or failing: every turn of its loop raises (a bug on a sample it never met).
supervisord cannot see either: the process is alive. Its loop watchdog ends it past loop_stall_s,
with every thread's stack in its log; supervisord starts a new monitor, which pages
`monitor_stalled` (saying where the last one hung, or what it raised), resolves it, and heals as
before."""

from __future__ import annotations

import os
import signal

import pytest

from monitor.selfwatch import EXIT_STALLED
from ops.tempstack import StackHome
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

LOOP_STALL_S = 12


@pytest.mark.parametrize(
    "fault, told",
    [
        ("monitor-stall", "in sample"),  # where it hung: the probe
        ("monitor-fail", "RuntimeError: every sample fails"),  # what every turn raised
    ],
)
def test_a_wedged_or_failing_monitor_is_replaced_says_why_and_heals_again(tmp_path, receiver, fault, told):
    stack = StackHome(
        tmp_path,
        app={"fault_injection": True},
        monitor={"webhooks": receiver.url, "loop_stall_s": LOOP_STALL_S, "warmup_timeout_s": 10},
    )
    try:
        stack.up()
        wedged = stack.pid("monitor")
        # the receiver is the module's: the other case's alerts are in it too
        seen = len(receiver.alerts("monitor_stalled"))

        def pages():
            return receiver.alerts("monitor_stalled")[seen:]

        result = stack.ctl("chaos", fault)
        assert result.returncode == 0 and f"monitor pid {wedged}" in result.stdout, result.stderr
        # Detection is the watchdog's own bound (not the machine's pace), then supervisord's start.
        wait_for(lambda: stack.pid("monitor") not in (0, wedged), LOOP_STALL_S + 20, 0.2, "a new monitor")
        assert f"exited: monitor (exit status {EXIT_STALLED}; not expected)" in stack.log("supervisord")
        log = stack.log("monitor")
        assert '"event": "monitor_stalled"' in log and told in log
        firing = wait_for(pages, stack.within(30), 0.2, "the page")
        reason = firing[0]["reason"]
        assert firing[0]["status"] == "firing" and "probes.py" in reason and told in reason, firing
        wait_for(
            lambda: [a for a in pages() if a["status"] == "resolved"],
            stack.within(30),
            0.2,
            "monitor_stalled resolved",
        )
        assert not (stack.home / "run" / "monitor-stalled.json").exists()  # told once, then gone

        old = stack.pid()  # the new monitor heals: a hung app is killed and replaced
        os.kill(old, signal.SIGSTOP)
        wait_for(lambda: stack.pid() not in (0, old) and stack.ready(), stack.within(60), 0.2, "healed")
        assert len(pages()) == 2  # one firing, one resolved: no repeat
    finally:
        stack.stop()
