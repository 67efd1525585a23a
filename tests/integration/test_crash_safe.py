"""The monitor killed (SIGKILL) at each point of a graceful restart and of a kill-restart, under a real
supervisord with the real app (tiny model) and a real webhook receiver: every time the app is ready
again within 30 s (on a slower machine, as much longer as it loads the model: StackHome.pace),
and the incident gets exactly one firing and one resolved alert. Also: a receiver
down for 120 s through an incident, a stall healed within 20 s, a line of an earlier process, and an
app left STOPPED by a monitor that died."""

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from common.polling import poll_until
from common.supervisor_client import SupervisorClient
from ops.tempstack import StackHome
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    s = StackHome(
        tmp_path_factory.mktemp("crashsafe"),
        app={"fault_injection": True},
        # A warm-up of 8 steps at 512²: long enough (about a second) to be caught in the middle.
        monitor={
            "webhooks": receiver.url,
            "hang_stopped_s": 1.0,
            "drain_wait_s": 3,
            "warmup_size": 512,
            "warmup_steps": 8,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 0.5,
            "restart_budget": 50,
            "webhook_backoff_s": 0.2,
            "webhook_backoff_max_s": 1,
        },
    )
    try:
        s.up()
        yield s
    finally:
        s.stop()


def journal(stack) -> dict:
    try:
        return json.loads((stack.home / "run" / "monitor-journal.json").read_text())
    except (OSError, ValueError):
        return {}


MISSED = "missed"


def kill_monitor_when(stack, predicate, old: int, timeout: float = 60) -> str:
    """Poll supervisord and the journal every 10 ms; SIGKILL the monitor the moment predicate(app
    state, app pid, journal) holds. Returns the app state seen at that moment, or MISSED when the
    action finished first (a point can be a window of a few ms: STOPPED lasts from the exit to the
    monitor's next 0.1 s poll, and a poll here under CPU contention can be slower than that)."""
    client = SupervisorClient(stack.home / "run" / "supervisor.sock", timeout=2)

    def reached():
        info = client.process("app")
        j = journal(stack)
        if predicate(info.state, info.pid, j):
            return info.state
        if not j.get("pending") and info.pid not in (0, old) and info.state == "RUNNING":
            return MISSED  # the action is over: a new process, nothing pending
        return None

    seen = poll_until(reached, timeout, 0.01)
    if seen is None:
        raise AssertionError(f"the point was not reached in {timeout} s\n{stack.logs()}")
    if seen != MISSED:
        os.kill(client.process("monitor").pid, signal.SIGKILL)
    return seen


def post_in_background(url: str, body: dict, timeout: float) -> threading.Thread:
    """A client whose request may end any way (the app it waits on is about to be killed)."""

    def run():
        try:
            httpx.post(url + "/api/generate", json=body, timeout=timeout)
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


SLOW_STEP_S, SLOW_STEPS = 0.3, 40
SLOW_GENERATION_S = SLOW_STEP_S * SLOW_STEPS


def slow_generation_in_flight(stack) -> threading.Thread:
    """A 12 s generation (0.3 s a step): a drain waits for it, so the stop lasts long enough to be caught."""
    admin = stack.admin_headers()
    httpx.post(
        stack.url + "/admin/fault", json={"kind": "slow", "seconds": SLOW_STEP_S}, headers=admin, timeout=5
    )
    body = {"prompt": "in flight", "width": 128, "height": 128, "num_inference_steps": SLOW_STEPS}
    thread = post_in_background(stack.url, body, 90)
    wait_for(
        lambda: httpx.get(stack.url + "/healthz", timeout=2).json()["heartbeat"]["busy"], 10, 0.05, "busy"
    )
    return thread


def resolved(receiver, start: int, kind: str) -> list:
    return [
        r
        for r in receiver.requests[start:]
        if r["json"]["kind"] == kind and r["json"]["status"] == "resolved"
    ]


def one_firing_one_resolved(receiver, start: int, kind: str) -> str:
    alerts = [r["json"] for r in receiver.requests[start:] if r["json"]["kind"] == kind]
    assert [a["status"] for a in alerts] == ["firing", "resolved"], alerts
    assert alerts[0]["incident_id"] == alerts[1]["incident_id"]
    return alerts[0]["incident_id"]


def firing_recorded(j) -> bool:
    """The firing alert delivered and its delivery in the journal: the one instant an alert can be
    sent twice (delivered, not yet recorded: a few ms) is behind us. Receivers dedupe on dedup_key."""
    return bool(j.get("alerted")) and not any(item["status"] == "firing" for item in j.get("outbox", []))


# Each point is inside the action: the journal names it (pending) and supervisord shows where it is.
POINTS = {
    "before_stop": lambda stack, old: (
        lambda state, pid, j: j.get("pending") and pid == old and state == "RUNNING" and firing_recorded(j)
    ),
    "while_stopping": lambda stack, old: lambda state, pid, j: j.get("pending") and state == "STOPPING",
    "after_stopped": lambda stack, old: (
        lambda state, pid, j: j.get("pending") and state in ("STOPPED", "EXITED")
    ),
    "while_starting": lambda stack, old: lambda state, pid, j: j.get("pending") and state == "STARTING",
    # supervisord says STARTING for startsecs (10 s), longer than the tiny app needs to be ready: the
    # warm-up is when the new process answers /readyz while the action is still under way.
    "during_warmup": lambda stack, old: (
        lambda state, pid, j: (
            j.get("pending") and pid not in (0, old) and state in ("STARTING", "RUNNING") and stack.ready()
        )
    ),
}


def quiet(stack) -> None:
    """Ready, no incident, and supervisord past startsecs (RUNNING, not STARTING)."""
    wait_for(
        lambda: (
            stack.ready()
            and not journal(stack).get("incidents_open")
            and "RUNNING" in stack.supervisorctl("status", "app").stdout
        ),
        stack.within(60),
        0.2,
        "a quiet stack",
    )


@pytest.mark.parametrize(
    "action,point",
    [
        ("restart", "before_stop"),
        ("restart", "while_stopping"),
        ("restart", "after_stopped"),
        ("restart", "while_starting"),
        ("restart", "during_warmup"),
        ("kill", "after_stopped"),
        ("kill", "while_starting"),
        ("kill", "during_warmup"),
    ],
)
def test_monitor_killed_mid_action_leaves_nothing_down_and_alerts_once(stack, receiver, action, point):
    kind = "oom_in_log" if action == "restart" else "hang"
    for _ in range(4):
        quiet(stack)
        start, old, monitor_pid = len(receiver.requests), stack.pid(), stack.pid("monitor")
        resumes = stack.log("monitor").count('"event": "resume"')
        if action == "restart":
            slow_generation_in_flight(stack)
            with open(stack.home / "logs" / "app.log", "a") as fh:
                fh.write(OOM_LINE)  # after the app's own JSON lines: the running process's line
        else:
            os.kill(old, signal.SIGSTOP)
        seen = kill_monitor_when(stack, POINTS[point](stack, old), old)
        if seen != MISSED:
            break
        print(f"missed {point}: another incident")
        # The window passed between two polls: let this incident end (healed by the monitor that
        # was never killed), then try again with a new one.
        wait_for(
            lambda: resolved(receiver, start, kind), stack.within(60), 0.2, f"{kind} resolved (missed point)"
        )
    else:
        pytest.fail(f"the point {point} was missed 4 times in a row")
    killed_at = time.monotonic()
    wait_for(
        lambda: stack.pid("monitor") not in (0, monitor_pid), 20, 0.1, "supervisord restarts the monitor"
    )
    # A graceful restart lets the slow generation in flight end first (its 12 s are sleeps, not the
    # machine's pace; CI saw 47.4 s against a bound of 47 s without them).
    bound = stack.within(30) + (SLOW_GENERATION_S if action == "restart" else 0)
    wait_for(lambda: stack.ready() and stack.pid() not in (0, old), bound, 0.1, "the app ready again")
    assert time.monotonic() - killed_at < bound, f"killed with the app {seen}"
    wait_for(lambda: resolved(receiver, start, kind), stack.within(60), 0.2, f"{kind} resolved")
    time.sleep(1.5)  # a duplicate, if any, would come now
    one_firing_one_resolved(receiver, start, kind)
    assert journal(stack)["pending"] is None
    # The new monitor found the action in the journal and rolled it forward.
    assert stack.log("monitor").count('"event": "resume"') == resumes + 1, f"killed with the app {seen}"


def test_receiver_down_for_two_minutes_gets_both_alerts_after_once_in_order(stack, receiver):
    quiet(stack)
    start = len(receiver.requests)
    down_until = time.time() + 120
    (stack.home / "run" / "chaos.json").write_text(json.dumps({"receiver_down_until": down_until}))
    time.sleep(1.5)  # the monitor reads the chaos file on its next tick
    old = stack.pid()
    os.kill(old, signal.SIGSTOP)
    wait_for(
        lambda: stack.ready() and stack.pid() not in (0, old),
        stack.within(40),
        0.2,
        "healed while the receiver is down",
    )
    wait_for(
        lambda: not journal(stack).get("incidents_open"), 30, 0.2, "incident resolved (not yet delivered)"
    )
    assert receiver.requests[start:] == [] and len(journal(stack)["outbox"]) == 2
    wait_for(
        lambda: len(receiver.requests[start:]) >= 2,
        down_until - time.time() + 30,
        0.5,
        "alerts after the outage",
    )
    time.sleep(3)
    assert min(r["at"] for r in receiver.requests[start:]) >= down_until - 0.5
    one_firing_one_resolved(receiver, start, "hang")
    assert journal(stack)["outbox"] == []
    (stack.home / "run" / "chaos.json").unlink()


def test_a_stall_on_a_warm_app_is_healed_within_20_s(stack, receiver):
    quiet(stack)
    start, old = len(receiver.requests), stack.pid()
    admin = stack.admin_headers()
    httpx.post(stack.url + "/admin/fault", json={"kind": "slow", "seconds": 120}, headers=admin, timeout=5)
    post_in_background(
        stack.url, {"prompt": "stuck", "width": 128, "height": 128, "num_inference_steps": 4}, 60
    )
    stalled_at = time.monotonic()
    bound = stack.within(30)
    wait_for(lambda: stack.ready() and stack.pid() not in (0, old), bound, 0.1, "healed")
    healed_s = time.monotonic() - stalled_at
    # ~20 s on an idle machine: the 10 s stall bound, up to 3 s of drain, then one start of the app.
    # The start is the machine's (two test files at a time on two cores made it 22.4 s once); the
    # monitor's share, stall to the new process (10.0 s of 17.2 s here, idle), is held to its bound.
    start_s = time.time() - psutil.Process(stack.pid()).create_time()
    assert healed_s - start_s <= 14, (healed_s, start_s)  # 10 s bound, up to 3 s of drain, 1 s of rest
    assert healed_s <= bound, healed_s
    firing = [r["json"] for r in receiver.requests[start:] if r["json"]["kind"] == "hang"][0]
    assert "stalled in denoise" in firing["reason"] and firing["evidence"]["bound_s"] == 10


def test_a_line_of_an_earlier_process_never_restarts_the_new_one(stack, receiver):
    """zimagectl down, an OOM line appended to the log, zimagectl up: the fresh app is left alone,
    and no alert fires."""
    quiet(stack)
    restarts, start = len(stack.restarts()), len(receiver.requests)
    result = stack.ctl("down", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    with open(stack.home / "logs" / "app.log", "a") as fh:
        fh.write(OOM_LINE)
    stack.up()
    time.sleep(5)
    assert len(stack.restarts()) == restarts and stack.ready()
    assert '"event": "log_history"' in stack.log("monitor")
    # Nor is the new app's pid a crash: the journal's pid was an earlier supervisord's (it used to
    # fire a "crash" alert on every down and up).
    assert [r["json"]["kind"] for r in receiver.requests[start:]] == []
    assert '"event": "journal_new_supervisord"' in stack.log("monitor")


def test_an_app_left_stopped_by_a_dead_monitor_is_started(stack, receiver):
    """Issue 17's first case, made certain: the monitor frozen, the app stopped behind its back, the
    monitor killed; the new one finds the app STOPPED without a maintenance mark and starts it."""
    quiet(stack)
    start = len(receiver.requests)
    monitor_pid = stack.pid("monitor")
    os.kill(monitor_pid, signal.SIGSTOP)
    assert stack.supervisorctl("stop", "app").returncode == 0
    os.kill(monitor_pid, signal.SIGKILL)
    wait_for(lambda: stack.ready(), stack.within(40), 0.2, "the app started again")
    wait_for(
        lambda: [
            r
            for r in receiver.requests[start:]
            if r["json"]["kind"] == "app_down" and r["json"]["status"] == "resolved"
        ],
        60,
        0.2,
        "app_down resolved",
    )
    one_firing_one_resolved(receiver, start, "app_down")


def test_a_journal_that_cannot_be_written_pages_and_the_monitor_still_heals(stack, receiver):
    """The journal's temp file made a directory: every write fails, as on a full disk. Before, each
    step raised before it was applied, so nothing was healed and nothing paged. Now a hang is still
    healed, journal_unwritable pages, and it resolves once the journal is written again."""
    quiet(stack)
    start, old = len(receiver.requests), stack.pid()
    blocker = stack.home / "run" / "monitor-journal.json.tmp"
    blocker.mkdir()
    try:
        os.kill(old, signal.SIGSTOP)
        wait_for(
            lambda: stack.ready() and stack.pid() not in (0, old), stack.within(60), 0.2, "healed, no journal"
        )
        wait_for(
            lambda: [r for r in receiver.requests[start:] if r["json"]["kind"] == "journal_unwritable"],
            30,
            0.2,
            "journal_unwritable paged",
        )
        assert '"event": "journal_unwritable"' in stack.log("monitor")
    finally:
        blocker.rmdir()
    wait_for(lambda: resolved(receiver, start, "journal_unwritable"), 60, 0.2, "journal_unwritable resolved")
    one_firing_one_resolved(receiver, start, "journal_unwritable")
    wait_for(lambda: resolved(receiver, start, "hang"), 60, 0.2, "hang resolved")
    assert journal(stack)["pending"] is None
