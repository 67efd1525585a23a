"""An operator's `zimagectl restart` that dies halfway: after its drain, before its stop (it waits
for a generation in flight). Ctrl-C: the command lifts its drain on the way out, and the same
process serves again. Its terminal closed (SIGHUP ends Python without its `finally`): its
maintenance mark names a process that is gone, so the monitor voids it at once instead of holding
its healing off for the mark's 90 s; and the app, drained with nobody to finish the restart, would
refuse all work for good: past drain_abandoned_s the monitor finishes the restart itself."""

from __future__ import annotations

import signal
import subprocess
import threading

import httpx
import pytest

from ops.tempstack import REPO, ZIMAGECTL, StackHome
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    s = StackHome(
        tmp_path_factory.mktemp("interrupted"),
        app={"fault_injection": True, "request_timeout_s": 40, "drain_timeout_s": 40},
        monitor={"webhooks": receiver.url, "drain_abandoned_s": 45},
    )
    try:
        s.up()
        yield s
    finally:
        s.stop()


def health(stack) -> dict:
    return httpx.get(stack.url + "/healthz", timeout=5).json()


def restart_cut_short_in_its_drain(stack, sig: int) -> subprocess.CompletedProcess:
    """A 24 s generation in flight (0.6 s a step), `zimagectl restart` started; once the app says it
    drains, the command gets `sig`."""
    admin = stack.admin_headers()
    httpx.post(stack.url + "/admin/fault", json={"kind": "slow", "seconds": 0.6}, headers=admin, timeout=5)
    body = {"prompt": "in flight", "width": 128, "height": 128, "num_inference_steps": 40}
    client = threading.Thread(
        target=lambda: httpx.post(stack.url + "/api/generate", json=body, timeout=120), daemon=True
    )
    client.start()
    wait_for(lambda: health(stack)["heartbeat"]["busy"], 20, 0.05, "the generation running")
    ctl = subprocess.Popen(
        ZIMAGECTL + ["restart", "--timeout", "60"],
        cwd=REPO,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: health(stack)["draining"], stack.within(30), 0.05, "zimagectl's drain")
        assert health(stack)["heartbeat"]["busy"], "the generation ended before the cut: no 'halfway'"
        ctl.send_signal(sig)
        out, _ = ctl.communicate(timeout=30)
    finally:
        ctl.kill()
    client.join(timeout=stack.within(60))
    return subprocess.CompletedProcess(ctl.args, ctl.returncode, out)


def test_ctrl_c_between_drain_and_stop_leaves_the_same_process_serving(stack):
    pid = stack.pid()
    result = restart_cut_short_in_its_drain(stack, signal.SIGINT)
    assert result.returncode != 0, result.stdout
    h = health(stack)
    assert not h["draining"] and h["draining_since"] is None, h
    assert stack.ready() and stack.pid() == pid
    assert not (stack.home / "run" / "maintenance").exists()  # its `finally` ran
    assert stack.restarts() == []


def test_a_restart_killed_with_its_terminal_is_finished_by_the_monitor(stack, receiver):
    pid = stack.pid()
    result = restart_cut_short_in_its_drain(stack, signal.SIGHUP)
    assert result.returncode == -signal.SIGHUP, result.stdout
    assert (stack.home / "run" / "maintenance").exists()  # left behind: nothing cleaned up
    wait_for(
        lambda: "maintenance mark void" in stack.log("monitor"), stack.within(10), 0.2, "the mark voided"
    )
    assert health(stack)["draining"] and stack.pid() == pid  # still drained, nobody finishing
    firing = wait_for(lambda: receiver.alerts("drain_abandoned"), stack.within(90), 0.2, "drain_abandoned")
    assert firing[0]["status"] == "firing" and "never finished" in firing[0]["reason"], firing
    wait_for(lambda: stack.pid() not in (0, pid) and stack.ready(), stack.within(90), 0.2, "restarted")
    done = wait_for(stack.restarts, stack.within(30), 0.2, "the restart recorded (after its warm-up)")
    assert [(r["kind"], r["action"], r["ok"]) for r in done] == [("drain_abandoned", "restart", True)]
    wait_for(
        lambda: [a for a in receiver.alerts("drain_abandoned") if a["status"] == "resolved"],
        stack.within(30),
        0.2,
        "drain_abandoned resolved",
    )
    assert not health(stack)["draining"]
