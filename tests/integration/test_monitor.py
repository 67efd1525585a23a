"""The real monitor against a real supervisord + app (tiny model), with a real webhook receiver."""

import os
import signal
import time

import httpx
import pytest

from monitor.alert_payloads import verify
from ops.tempstack import StackHome
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
SECRET = "hook-secret-for-tests"
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    root = tmp_path_factory.mktemp("mon")
    s = StackHome(
        root,
        app={"fault_injection": True},
        monitor={
            "webhooks": receiver.url,
            "webhook_secret": SECRET,
            "rss_limit_mb": 2500,
            "stall_floor_s": 4,
            "stall_factor": 8,
        },
    )
    # A stale OOM line from a previous life of the app: history, not news.
    (root / "logs" / "app.log").write_text("old run\n" + OOM_LINE)
    try:
        s.up()
        yield s
    finally:
        s.stop()


def pairs(receiver, kind):
    alerts = receiver.alerts(kind)
    return [(a["incident_id"], a["status"]) for a in alerts]


def wait_resolved(stack, receiver, kind, count=1, timeout=60):
    """The incident healed (a restart: the bound stretches by the machine's pace) and resolved."""
    return wait_for(
        lambda: len([a for a in receiver.alerts(kind) if a["status"] == "resolved"]) >= count,
        stack.within(timeout),
        0.2,
        f"{kind} resolved alert",
    )


def test_stale_oom_line_at_start_does_nothing(stack, receiver):
    time.sleep(3)  # several ticks
    assert stack.restarts() == []
    assert receiver.alerts() == []
    assert stack.state()["incidents_open"] == []


def test_sigstop_is_a_hang_killed_restarted_warmed_and_alerted(stack, receiver):
    old = stack.pid()
    stopped_at = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    firing = wait_for(
        lambda: [a for a in receiver.alerts("hang") if a["status"] == "firing"], 10, 0.1, "hang firing alert"
    )
    detected_after = time.monotonic() - stopped_at
    assert detected_after < 10
    wait_resolved(stack, receiver, "hang")
    assert stack.pid() != old and stack.ready()
    (restart,) = stack.restarts()
    assert restart["kind"] == "hang" and restart["action"] == "kill" and restart["ok"]
    assert "warm-up image" in restart["warmup"]
    # firing then resolved, one incident id, both signed with the shared secret
    assert pairs(receiver, "hang") == [
        (firing[0]["incident_id"], "firing"),
        (firing[0]["incident_id"], "resolved"),
    ]
    for r in receiver.requests:
        assert verify(r["body"], SECRET, r["headers"]["x-signature-256"])
    resolved = receiver.alerts("hang")[-1]
    assert (
        resolved["evidence"]["warmup"].startswith("ready after") and resolved["host"] and resolved["service"]
    )


def test_oom_line_appended_gives_one_restart_one_incident(stack, receiver):
    before = len(stack.restarts())
    with open(stack.home / "logs" / "app.log", "a") as fh:
        fh.write(OOM_LINE)
    wait_resolved(stack, receiver, "oom_in_log")
    time.sleep(2)
    restarts = stack.restarts()[before:]
    assert [r["kind"] for r in restarts] == ["oom_in_log"] and restarts[0]["action"] == "restart"
    ids = {a["incident_id"] for a in receiver.alerts("oom_in_log")}
    assert len(ids) == 1 and [s for _, s in pairs(receiver, "oom_in_log")] == ["firing", "resolved"]
    assert "CUDA out of memory" in receiver.alerts("oom_in_log")[0]["evidence"]["lines"][0]


def test_long_progressing_generation_is_not_restarted(stack, receiver):
    before = len(stack.restarts())
    admin = stack.admin_headers()
    # 0.6 s per step against a 4 s stall floor: a 15 s generation that keeps stepping.
    httpx.post(stack.url + "/admin/fault", json={"kind": "slow", "seconds": 0.6}, headers=admin, timeout=5)
    try:
        r = httpx.post(
            stack.url + "/api/generate",
            timeout=120,
            json={"prompt": "slow but fine", "width": 128, "height": 128, "num_inference_steps": 25},
        )
    finally:
        httpx.post(stack.url + "/admin/fault", json={"kind": "clear"}, headers=admin, timeout=5)
    assert r.status_code == 200
    assert len(stack.restarts()) == before


def test_memory_limit_is_enforced_by_the_monitor(stack, receiver):
    before = len(stack.restarts())
    old = stack.pid()
    admin = stack.admin_headers()
    r = httpx.post(
        stack.url + "/admin/fault", json={"kind": "leak", "megabytes": 2600}, headers=admin, timeout=30
    )
    assert r.status_code == 200
    wait_resolved(stack, receiver, "memory_limit", timeout=90)
    (restart,) = stack.restarts()[before:]
    assert restart["kind"] == "memory_limit" and restart["action"] == "restart" and stack.pid() != old


def test_an_engine_that_fails_every_generation_is_found_by_its_self_check_and_replaced(stack, receiver):
    """No fatal CUDA error, no OOM, no hang: the app answers and calls itself ready while every
    generation fails. Its self-check (the warm-up image) fails too, so it says it is unhealthy,
    the request is told 503 + Retry-After, and the monitor replaces the process."""
    before, old = len(stack.restarts()), stack.pid()
    armed = stack.ctl("chaos", "broken", "--count", "100", timeout=30)  # the operator's command
    assert armed.returncode == 0 and '"broken_pending": 100' in armed.stdout, armed.stderr
    body = {"prompt": "a fox", "width": 128, "height": 128, "num_inference_steps": 2}
    r = httpx.post(stack.url + "/api/generate", json=body, timeout=60)
    # Never a 500 from a broken engine: the check ran before the request was answered.
    assert r.status_code == 503 and r.json()["error"] == "engine_unhealthy" and r.headers["retry-after"]
    wait_resolved(stack, receiver, "engine_unhealthy", timeout=90)
    (restart,) = stack.restarts()[before:]
    assert restart["kind"] == "engine_unhealthy" and restart["ok"] and stack.pid() != old
    firing = receiver.alerts("engine_unhealthy")[0]
    assert "self-check" in firing["reason"]
    r = httpx.post(stack.url + "/api/generate", json=body, timeout=60)  # the new process: no fault armed
    assert r.status_code == 200


def test_unreachable_receiver_never_slows_healing(tmp_path):
    dead = f"http://127.0.0.1:{_closed_port()}/hook"
    s = StackHome(tmp_path, monitor={"webhooks": dead, "webhook_backoff_s": 1.0})
    try:
        s.up()
        old = s.pid()
        t0 = time.monotonic()
        os.kill(old, signal.SIGSTOP)
        bound = s.within(30)  # 5 s to call the hang, then a kill and a start: the machine's share stretches
        wait_for(lambda: s.pid() not in (0, old) and s.ready(), bound + 10, 0.2, "healed")
        assert time.monotonic() - t0 < bound
        wait_for(
            lambda: s.state().get("alerts", {}).get("failed_attempts", 0) >= 1,
            60,
            0.5,
            "delivery failure counted",
        )
        assert s.state()["alerts"]["outbox"] >= 1  # kept for when the receiver comes back
    finally:
        s.stop()


def _closed_port() -> int:
    from tests.helpers import free_port

    return free_port()
