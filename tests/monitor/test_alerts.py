"""The courier against a real local webhook receiver: order, retries, refusals, and the ledger that
lets a restarted monitor know what the last one already delivered."""

import time

from monitor import core
from monitor.alerts import Courier, Ledger
from monitor.config import WebhookTarget
from ops.tempstack import WebhookReceiver, wait_for
from tests.monitor.factories import cfg, sample


def incidents_in_outbox(n_incidents: int):
    """A state whose outbox holds firing (and resolved) alerts of real incidents, via core.step."""
    c = cfg(
        webhooks=[WebhookTarget(url="http://127.0.0.1:9/")],
        hang_stopped_s=1,
        resolve_quiet_samples=1,
        backoff_initial_s=0,
    )
    state = core.MonitorState()
    base = time.time() - 100  # recent: alerts older than alert_outbox_max_age_s would expire
    t = 0
    for _ in range(n_incidents):
        for _ in range(3):
            state, _ = core.step(state, core.Observe(sample(t, status="stopped")), base + t, c)
            t += 1
        state, _ = core.step(
            state, core.ActionDone("kill", True, 1.0, warmup_ok=True, warmup_note="ok"), base + t, c
        )
        state, _ = core.step(state, core.Observe(sample(t)), base + t, c)
        t += 1
    return state, c


class Loop:
    """The loop's part: fold what the courier reports into the state."""

    def __init__(self, state, c):
        self.state, self.cfg, self.reports = state, c, []

    def report(self, event):
        self.reports.append(event)
        self.state, _ = core.step(self.state, event, time.time(), self.cfg)


def courier(loop, url, tmp_path, **kw):
    return Courier(
        [WebhookTarget(url=url)],
        lambda: loop.state.outbox,
        loop.report,
        "s3cret",
        "svc",
        "host",
        timeout_s=2,
        backoff_s=0.05,
        backoff_max_s=0.2,
        ledger_dir=tmp_path,
        **kw,
    )


def test_alerts_go_out_in_order_and_the_ledger_is_emptied_once_folded(tmp_path):
    state, c = incidents_in_outbox(2)
    assert [i.status for i in state.outbox] == ["firing", "resolved", "firing", "resolved"]
    receiver = WebhookReceiver()
    loop = Loop(state, c)
    sender = courier(loop, receiver.url, tmp_path).start()
    try:
        wait_for(lambda: loop.state.outbox == (), 10, 0.05, "outbox delivered")
        got = [(a["incident_id"], a["status"]) for a in receiver.alerts()]
        assert got == [(i.incident["id"], i.status) for i in state.outbox]
        wait_for(lambda: Ledger(tmp_path / "monitor-delivered-0.log").read() == [], 5, 0.05, "ledger emptied")
    finally:
        sender.stop()
        receiver.stop()


def test_a_receiver_that_fails_is_retried_and_one_that_refuses_is_not(tmp_path):
    state, c = incidents_in_outbox(1)
    receiver = WebhookReceiver(status=503)
    loop = Loop(state, c)
    sender = courier(loop, receiver.url, tmp_path).start()
    try:
        # The receiver records a request before the courier has read its answer: wait for both.
        wait_for(lambda: len(receiver.requests) >= 3 and sender.failed_attempts >= 3, 10, 0.05, "retries")
        assert loop.state.outbox != ()  # kept for the next try
        receiver.status = 400  # refuses this body for good
        wait_for(lambda: loop.state.outbox == (), 10, 0.05, "given up")
        assert {r.outcome for r in loop.reports} == {"rejected"}
    finally:
        sender.stop()
        receiver.stop()


def test_a_restarted_monitor_skips_what_the_ledger_says_was_delivered(tmp_path):
    state, c = incidents_in_outbox(1)
    firing, resolved = state.outbox
    ledger = Ledger(tmp_path / "monitor-delivered-0.log")
    ledger.record(firing.seq, f"{firing.incident['id']}:firing")  # delivered, then the monitor died
    ledger.record(resolved.seq, "inc-of-another-journal:resolved")  # a stale entry with a reused seq
    with open(ledger.path, "a") as fh:
        fh.write("17")  # a line cut short by the crash
    loop = Loop(state, c)
    recorded = courier(loop, "http://127.0.0.1:9/", tmp_path).recorded()
    assert [(d.seq, d.outcome) for d in recorded] == [(firing.seq, "delivered")]


def test_an_alert_older_than_the_outbox_age_is_dropped_and_said(tmp_path):
    state, c = incidents_in_outbox(1)
    loop = Loop(state, c)
    sender = courier(
        loop, "http://127.0.0.1:9/", tmp_path, max_age_s=60, clock=lambda: time.time() + 7200
    ).start()
    try:
        wait_for(lambda: loop.state.outbox == (), 10, 0.05, "expired")
        assert [r.outcome for r in loop.reports] == ["expired", "expired"]
    finally:
        sender.stop()
