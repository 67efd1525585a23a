"""The monitor's decisions as one pure function: `step(state, event, now, cfg) -> (state, effects)`.

Events are what happened (a sample was taken, an action finished, an alert was delivered, an
operator reset the budget); effects are what the loop must do (run an action, write a log line).
Alerts are not effects but entries of the state's outbox, so they are persisted with the decision
that made them and a courier thread delivers them from there. The loop persists the new state
*before* it carries out an effect (monitor/journal.py): a monitor killed at any point resumes
with its open incidents, its budget, the log position, undelivered alerts and the action it was
in the middle of (rolled forward: an app it had stopped is started).

`now` is wall-clock epoch seconds: the state outlives the process (a monotonic clock does not
compare across a reboot). Sample.now (monotonic) only measures spans inside the history.
Pure: nothing here reads a clock, a file or the network; `step` never mutates its input state."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Optional

from common.enums import Action, FindingKind, Severity
from monitor import policy as pol
from monitor.config import MonitorSettings
from monitor.detectors import detect_all
from monitor.findings import Finding
from monitor.samples import Sample
from monitor.state import (  # noqa: F401  (the state machine's vocabulary, re-exported for callers)
    ActionDone,
    Delivered,
    Effect,
    Event,
    LogLine,
    MonitorState,
    Observe,
    OperatorReset,
    OutboxItem,
    PendingAction,
    RunAction,
)

HISTORY_KEEP_S = 65.0  # at least a minute of samples, more when a window setting asks for it
ALERTED_KEEP = 500  # (incident, status) pairs remembered for deduplication


class _Step:
    """One step's working copy: the mutable parts copied once, effects collected in order."""

    def __init__(self, state: MonitorState, now: float, cfg: MonitorSettings):
        self.s = dataclasses.replace(
            state, policy=copy.deepcopy(state.policy), book=copy.deepcopy(state.book)
        )
        self.now, self.cfg = now, cfg
        self.effects: list[Effect] = []
        self.fields: dict = {}

    def set(self, **changes) -> None:
        self.fields.update(changes)

    def get(self, name: str):
        return self.fields.get(name, getattr(self.s, name))

    def log(self, level: int, message: str, **fields) -> None:
        self.effects.append(LogLine(level, message, fields))

    def result(self) -> tuple[MonitorState, list[Effect]]:
        return dataclasses.replace(self.s, **self.fields), self.effects

    # ---- alerts: into the outbox, once per incident and status --------------------------------
    def alert(self, incident: dict, status: str, action: Optional[str] = None) -> None:
        key = f"{incident['id']}:{status}"
        if key in self.get("alerted"):
            return
        self.set(alerted=(self.get("alerted") + (key,))[-ALERTED_KEEP:])
        self.log(
            logging.WARNING,
            f"alert {status}: {incident['reason']}",
            event="alert",
            status=status,
            incident_id=incident["id"],
            kind=incident["kind"],
            severity=incident["severity"],
            action=action,
        )
        targets = tuple(range(len(self.cfg.webhooks)))
        if not targets:
            return
        seq = self.get("next_seq")
        item = OutboxItem(
            seq=seq, status=status, incident=incident, action=action, queued_at=self.now, targets=targets
        )
        outbox = self.get("outbox") + (item,)
        if len(outbox) > self.cfg.alert_queue_size:  # bounded: the oldest go first, and say so
            dropped, outbox = (
                outbox[: len(outbox) - self.cfg.alert_queue_size],
                outbox[-self.cfg.alert_queue_size :],
            )
            self.log(
                logging.ERROR,
                "alert outbox full: oldest alerts dropped",
                event="alert_dropped",
                seqs=[d.seq for d in dropped],
            )
        self.set(outbox=outbox, next_seq=seq + 1)


def step(
    state: MonitorState, event: Event, now: float, cfg: MonitorSettings
) -> tuple[MonitorState, list[Effect]]:
    """Fold one event into the state; return the new state and what the loop must do, in order."""
    work = _Step(state, now, cfg)
    if isinstance(event, Observe):
        _observe(work, event)
    elif isinstance(event, ActionDone):
        _action_done(work, event)
    elif isinstance(event, Delivered):
        _delivered(work, event)
    elif isinstance(event, OperatorReset):
        _reset(work)
    return work.result()


# ---- observe -----------------------------------------------------------------------------------
def _observe(w: _Step, event: Observe) -> None:
    cfg, now = w.cfg, w.now
    sample = _current_lines_only(w, event.sample)
    planned = event.maintenance is not None
    _record_sample(w, sample, planned)
    if sample.log_position is not None:
        w.set(log_position=sample.log_position)
    pending = w.get("pending")
    if pending is not None:
        if planned:
            w.set(pending=None)
            w.log(
                logging.WARNING,
                "an operator's maintenance took over the interrupted action",
                event="resume_skipped",
                action=pending.action,
                kind=pending.kind,
            )
            return
        # Only a monitor that died mid-action finds one here (actions run to the end inside a tick).
        w.log(
            logging.WARNING,
            "resuming the action the previous monitor did not finish",
            event="resume",
            action=pending.action,
            kind=pending.kind,
            target_pid=pending.target_pid,
        )
        w.effects.append(
            RunAction(
                Action(pending.action), pending.kind, pending.incident_id, pending.target_pid, resumed=True
            )
        )
        return
    findings: list[Finding] = []
    if sample.supervisor_ok and not planned:
        findings = detect_all(list(w.get("history")), w.get("unexpected_restarts"), cfg)
    book, policy = w.s.book, w.s.policy
    for finding in findings:
        opened = book.observe(finding, now, now)
        if opened is not None:
            w.log(
                logging.WARNING,
                f"incident opened: {finding.reason}",
                event="incident_open",
                incident_id=opened.id,
                kind=finding.kind,
                severity=finding.severity,
                evidence=finding.evidence,
            )
    serving = bool(sample.ready and sample.ready.ok)
    peers_down = 0 if sample.peers_ready is None else sample.peers_total - sample.peers_ready
    decision = pol.decide(findings, policy, now, cfg, serving=serving, peers_down=peers_down)
    w.set(last_decision={"action": decision.action, "reason": decision.reason})
    _log_decision(w, decision)
    if decision.action not in (Action.none, Action.wait):
        _act(w, decision, sample)
    elif decision.action == Action.wait and decision.wait_s > 0:  # backoff (not a rolling heal)
        _held_back(w, decision)
    app_ready = bool(sample.ready and sample.ready.ok)
    for incident in book.settle({f.kind for f in findings}, app_ready, cfg.resolve_quiet_samples, now):
        w.log(
            logging.WARNING,
            "incident resolved",
            event="incident_resolved",
            incident_id=incident.id,
            kind=incident.kind,
        )
        w.alert(incident.as_dict(), "resolved")
    pol.forget_old(policy, now, cfg)


def _record_sample(w: _Step, sample: Sample, planned: bool) -> None:
    cfg = w.cfg
    keep = max(cfg.leak_window_s, cfg.vram_trend_window_s, HISTORY_KEEP_S) + 5
    history = tuple(s for s in w.get("history") if s.now >= sample.now - keep) + (sample,)
    unexpected = tuple(t for t in w.get("unexpected_restarts") if t >= w.now - cfg.crash_loop_window_s)
    known, expect = w.get("known_pid"), w.get("expect_new_pid")
    if sample.pid:
        if known and sample.pid != known and not (expect or planned):
            unexpected += (w.now,)
            w.log(
                logging.WARNING,
                "app restarted outside the monitor",
                event="unexpected_restart",
                old_pid=known,
                new_pid=sample.pid,
            )
        if sample.pid != known:
            expect = False
        known = sample.pid
    w.set(history=history, unexpected_restarts=unexpected, known_pid=known, expect_new_pid=expect)


def _current_lines_only(w: _Step, sample: Sample) -> Sample:
    """Log lines of another process than the one running now are history, never a restart."""
    current = [e for e in sample.log_events if e.pid is None or (sample.pid and e.pid == sample.pid)]
    if len(current) == len(sample.log_events):
        return sample
    old = [e for e in sample.log_events if e not in current]
    w.log(
        logging.INFO,
        "log lines of an earlier app process: history, not acted on",
        event="log_history",
        pids=sorted({e.pid for e in old}),
        current_pid=sample.pid,
        lines=[e.line[:200] for e in old[-3:]],
    )
    return dataclasses.replace(sample, log_events=current)


def _log_decision(w: _Step, decision: pol.Decision) -> None:
    """A decision is logged when it changes, not on every tick it stays the same."""
    kind = decision.finding.kind if decision.finding else ""
    key = (str(decision.action), str(kind))
    if decision.action == Action.none:
        w.set(last_logged=None)
        return
    if key != w.get("last_logged"):
        w.set(last_logged=key)
        w.log(
            logging.WARNING,
            f"decision: {decision.action}",
            event="decision",
            action=decision.action,
            kind=kind,
            reason=decision.reason,
        )


def _held_back(w: _Step, decision: pol.Decision) -> None:
    """The backoff holds a heal back (a second problem soon after a restart; up to backoff_max_s):
    the incident fires now, saying so, instead of when the action finally runs. Noted as an action
    so that the action itself sends no second firing."""
    kind = decision.finding.kind if decision.finding else "unknown"
    incident = w.s.book.open.get(kind)
    if incident is not None and not incident.actions:
        w.s.book.note_action(kind, "wait")
        w.alert(incident.as_dict(), "firing", decision.reason)


def _act(w: _Step, decision: pol.Decision, sample: Sample) -> None:
    finding, book, policy, now = decision.finding, w.s.book, w.s.policy, w.now
    kind = finding.kind if finding else "unknown"
    incident = book.open.get(kind)
    if decision.action == Action.alert:
        if incident is not None and "alert" not in incident.actions:
            book.note_action(kind, "alert")
            w.alert(incident.as_dict(), "firing", "alert only")
        return
    if decision.action == Action.page:
        pol.record(decision, policy, now)
        window = f"{w.cfg.restart_budget} per {w.cfg.restart_budget_window_s:.0f} s"
        last_problem = finding.reason if finding else "?"
        budget = book.observe(
            Finding(
                kind=FindingKind.restart_budget_exhausted,
                severity=Severity.critical,
                action=Action.alert,
                reason=f"restart budget exhausted ({window}); auto-restart stopped, an operator must act "
                + f"(zimagectl restart resets it). Last problem: {last_problem}",
                evidence={"last_finding": kind, "restarts": len(policy.restarts)},
            ),
            now,
            now,
        )
        if budget is not None:
            w.alert(budget.as_dict(), "firing", "auto-restart stopped")
        if incident is not None and "page" not in incident.actions:
            book.note_action(kind, "page")
            w.alert(incident.as_dict(), "firing", "none: restart budget exhausted")
        return
    # free_cache / restart / kill / start: the firing alert is queued before the action runs.
    if incident is not None and not incident.actions:
        w.alert(incident.as_dict(), "firing", decision.action)
    restarting = decision.action in pol.RESTARTING_ACTIONS
    book.note_action(kind, decision.action, awaiting_warmup=restarting)
    pol.record(decision, policy, now)
    if restarting:
        w.set(
            expect_new_pid=True,
            pending=PendingAction(
                str(decision.action), str(kind), incident.id if incident else None, sample.pid, now
            ),
        )
    w.effects.append(
        RunAction(Action(decision.action), str(kind), incident.id if incident else None, sample.pid)
    )


# ---- action done -----------------------------------------------------------------------------
def _action_done(w: _Step, done: ActionDone) -> None:
    pending = w.get("pending")
    kind = pending.kind if pending else "free_cache"
    w.set(pending=None)
    if done.deferred:  # nothing happened to the app: take back what _act counted, decide again
        if pending is not None and pending.since in w.s.policy.restarts:
            w.s.policy.restarts.remove(pending.since)
        w.set(expect_new_pid=False)
        w.s.book.warmed_up(done.detail)
        w.log(logging.WARNING, f"{done.action} deferred", event="deferred", kind=kind, detail=done.detail)
        return
    if done.warmup_ok is None:  # free_cache: nothing to warm up
        return
    book = w.s.book
    w.set(
        restart_log=(
            w.get("restart_log")
            + (
                {
                    "at": w.now,
                    "kind": kind,
                    "action": done.action,
                    "ok": done.ok,
                    "seconds": round(done.seconds, 2),
                    "old_pid": done.old_pid,
                    "new_pid": done.new_pid,
                    "detail": done.detail,
                    "warmup": done.warmup_note,
                },
            )
        )[-20:],
        history=(),
    )  # samples of the old process would re-trigger detectors (stale stopped/timeout)
    if done.warmup_ok:
        book.warmed_up(done.warmup_note)
        if FindingKind.warmup_failed in book.open:
            w.alert(book.resolve(FindingKind.warmup_failed, w.now, done.warmup_note).as_dict(), "resolved")
        return
    note = done.warmup_note or done.detail
    opened = book.observe(
        Finding(
            kind=FindingKind.warmup_failed,
            severity=Severity.error,
            action=Action.restart,
            reason=f"after {done.action} for {kind}: {note}",
            evidence={"action": done.action, "detail": done.detail},
        ),
        w.now,
        w.now,
    )
    book.warmed_up(
        note
    )  # the original incident stays open; it no longer waits for a warm-up that did not come
    if opened is not None:
        w.alert(opened.as_dict(), "firing", "none yet: the next tick decides")


# ---- delivery and operator -------------------------------------------------------------------------
def _delivered(w: _Step, event: Delivered) -> None:
    outbox = []
    for item in w.get("outbox"):
        if item.seq == event.seq:
            item = dataclasses.replace(item, targets=tuple(t for t in item.targets if t != event.target))
            if event.outcome != "delivered":
                w.log(
                    logging.ERROR,
                    f"alert {event.outcome}",
                    event="alert_failed",
                    outcome=event.outcome,
                    incident_id=item.incident["id"],
                    status=item.status,
                    target=event.target,
                    detail=event.detail,
                )
        if item.targets:
            outbox.append(item)
    w.set(outbox=tuple(outbox))


def _reset(w: _Step) -> None:
    w.log(logging.WARNING, "restart budget reset by an operator", event="circuit_reset")
    pol.reset_circuit(w.s.policy)
    if FindingKind.restart_budget_exhausted in w.s.book.open:
        incident = w.s.book.resolve(FindingKind.restart_budget_exhausted, w.now, "reset by an operator")
        w.alert(incident.as_dict(), "resolved")
