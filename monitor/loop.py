"""The tick: sample → detect → decide → act → record. One thread does all of it, in that order;
signals only set flags, alerts go out on their own threads."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Optional

from monitor import policy as pol
from monitor.actions import ActionResult, Actions
from monitor.alerts import AlertDispatcher
from monitor.config import MonitorSettings
from monitor.detectors import Finding, detect_all
from monitor.incidents import IncidentBook
from monitor.probes import Probes
from monitor.samples import Sample
from monitor.status import MonitorMetrics, write_state

log = logging.getLogger("monitor.loop")


class Monitor:
    def __init__(self, cfg: MonitorSettings, probes: Probes, actions: Actions, alerts: AlertDispatcher,
                 metrics: MonitorMetrics, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.cfg = cfg
        self.probes, self.actions, self.alerts, self.metrics = probes, actions, alerts, metrics
        self.clock, self.wall = clock, wall
        self.history: deque[Sample] = deque()
        self.policy = pol.PolicyState()
        self.book = IncidentBook()
        self.known_pid = 0
        self.expect_new_pid = False  # set by our own restarts: that pid change is not a crash
        self.unexpected_restarts: list[float] = []
        self.last_decision: Optional[pol.Decision] = None
        self.last_action: Optional[ActionResult] = None
        self.restart_log: deque[dict] = deque(maxlen=20)
        self.stop_requested = threading.Event()
        self.reset_requested = threading.Event()  # SIGHUP from an operator: close the circuit
        self.wake = threading.Event()
        self.started_at = wall()

    # ---- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        log.info("monitor running", extra={"event": "monitor_start", "interval_s": self.cfg.interval_s})
        while not self.stop_requested.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("tick failed", extra={"event": "tick_error"})
            self.wake.wait(self.cfg.interval_s)
            self.wake.clear()

    def tick(self) -> None:
        if self.reset_requested.is_set():
            self.reset_requested.clear()
            log.warning("restart budget reset by an operator", extra={"event": "circuit_reset"})
            self.reset_circuit()
        now, wall = self.clock(), self.wall()
        chaos = self.probes.receiver_down_until(wall)
        if chaos is not None:
            self.alerts.blackhole_until = chaos
        sample = self.probes.sample(now, wall)
        maintenance = self.probes.maintenance(wall)
        self._record_sample(sample, planned=maintenance is not None)
        findings: list[Finding] = []
        if sample.supervisor_ok and not maintenance:
            findings = detect_all(list(self.history), self.unexpected_restarts, self.cfg)
        for finding in findings:
            self.metrics.detections.labels(kind=finding.kind).inc()
            opened = self.book.observe(finding, now, wall)
            if opened is not None:
                log.warning("incident opened: %s", finding.reason,
                            extra={"event": "incident_open", "incident_id": opened.id, "kind": finding.kind,
                                   "severity": finding.severity, "evidence": finding.evidence})
        decision = pol.decide(findings, self.policy, now, self.cfg)
        self.last_decision = decision
        if decision.action not in ("none",):
            self._act(decision, now, wall)
        app_ready = bool(sample.ready and sample.ready.ok)
        for incident in self.book.settle({f.kind for f in findings}, app_ready, self.cfg.resolve_quiet_samples,
                                         self.wall()):
            log.warning("incident resolved", extra={"event": "incident_resolved", "incident_id": incident.id,
                                                    "kind": incident.kind})
            self.alerts.send(incident.as_dict(), "resolved")
        pol.forget_old(self.policy, now, self.cfg)
        self._publish(sample, maintenance)
        if self.probes.follower is not None:
            self.probes.follower.save_position()

    def _record_sample(self, sample: Sample, planned: bool) -> None:
        self.history.append(sample)
        keep = max(self.cfg.leak_window_s, self.cfg.vram_trend_window_s, 60.0) + 5
        while self.history and self.history[0].now < sample.now - keep:
            self.history.popleft()
        if sample.pid:
            if self.known_pid and sample.pid != self.known_pid and not (self.expect_new_pid or planned):
                self.unexpected_restarts.append(sample.now)
                log.warning("app restarted outside the monitor", extra={"event": "unexpected_restart",
                                                                        "old_pid": self.known_pid,
                                                                        "new_pid": sample.pid})
            if sample.pid != self.known_pid:
                self.expect_new_pid = False
            self.known_pid = sample.pid
        cutoff = sample.now - self.cfg.crash_loop_window_s
        self.unexpected_restarts = [t for t in self.unexpected_restarts if t >= cutoff]
        for name, seconds in self.probes.latencies.items():
            self.metrics.probe_latency.labels(probe=name).observe(seconds)

    # ---- acting --------------------------------------------------------------------------------
    def _act(self, decision: pol.Decision, now: float, wall: float) -> None:
        finding = decision.finding
        kind = finding.kind if finding else "unknown"
        log.warning("decision: %s", decision.action, extra={"event": "decision", "action": decision.action,
                                                           "kind": kind, "reason": decision.reason})
        incident = self.book.open.get(kind)
        if decision.action == "wait":
            return
        if decision.action == "alert":
            if incident is not None and "alert" not in incident.actions:
                self.book.note_action(kind, "alert")
                self.alerts.send(incident.as_dict(), "firing", "alert only")
            return
        if decision.action == "page":
            pol.record(decision, self.policy, now)
            budget = self.book.observe(Finding(
                kind="restart_budget_exhausted", severity="critical", action="alert",
                reason=f"restart budget exhausted ({self.cfg.restart_budget} per "
                       f"{self.cfg.restart_budget_window_s:.0f} s); auto-restart stopped, an operator must act "
                       f"(zimagectl restart resets it). Last problem: {finding.reason if finding else '?'}",
                evidence={"last_finding": kind, "restarts": len(self.policy.restarts)}), now, wall)
            if budget is not None:
                self.alerts.send(budget.as_dict(), "firing", "auto-restart stopped")
            if incident is not None and "page" not in incident.actions:
                self.book.note_action(kind, "page")
                self.alerts.send(incident.as_dict(), "firing", "none: restart budget exhausted")
            return
        # free_cache / restart / kill / start: the firing alert goes out before the action runs.
        if incident is not None and not incident.actions:
            self.alerts.send(incident.as_dict(), "firing", decision.action)
        restarting = decision.action in pol.RESTARTING_ACTIONS
        if restarting:
            self.expect_new_pid = True
            self.book.note_action(kind, decision.action, awaiting_warmup=True)
        else:
            self.book.note_action(kind, decision.action)
        pol.record(decision, self.policy, now)
        try:
            result = {"free_cache": self.actions.free_cache, "restart": self.actions.graceful_restart,
                      "kill": self.actions.kill_restart, "start": self.actions.start}[decision.action]()
        except Exception as exc:
            log.exception("action failed", extra={"event": "action_error", "action": decision.action})
            result = ActionResult(decision.action, False, 0.0, detail=f"{exc.__class__.__name__}: {exc}")
        self.last_action = result
        self.metrics.actions.labels(action=decision.action, ok=str(result.ok).lower()).inc()
        if restarting:
            self.metrics.restarts.labels(reason=kind, action=decision.action).inc()
            self.restart_log.append({"at": self.wall(), "kind": kind, "action": decision.action, "ok": result.ok,
                                     "seconds": round(result.seconds, 2), "old_pid": result.old_pid,
                                     "new_pid": result.new_pid, "detail": result.detail,
                                     "warmup": result.warmup.note() if result.warmup else None})
            self._after_restart(result, kind)

    def _after_restart(self, result: ActionResult, kind: str) -> None:
        warm = result.warmup
        # History from the old process would re-trigger detectors (stale stopped/timeout samples).
        self.history.clear()
        if warm is not None and warm.ok:
            self.metrics.warmup_seconds.set(warm.seconds)
            self.book.warmed_up(warm.note())
            failed = self.book.open.get("warmup_failed")
            if failed is not None:
                self.alerts.send(self.book.resolve("warmup_failed", self.wall(), warm.note()).as_dict(), "resolved")
            return
        note = warm.note() if warm else result.detail
        opened = self.book.observe(Finding(kind="warmup_failed", severity="error", action="restart",
                                           reason=f"after {result.action} for {kind}: {note}",
                                           evidence={"action": result.action, "detail": result.detail}),
                                   self.clock(), self.wall())
        # The original incident stays open; it no longer waits for a warm-up that did not come.
        self.book.warmed_up(note)
        if opened is not None:
            self.alerts.send(opened.as_dict(), "firing", "none yet: the next tick decides")

    def reset_circuit(self) -> None:
        pol.reset_circuit(self.policy)
        if "restart_budget_exhausted" in self.book.open:
            incident = self.book.resolve("restart_budget_exhausted", self.wall(), "reset by an operator")
            self.alerts.send(incident.as_dict(), "resolved")

    # ---- reporting -----------------------------------------------------------------------------
    def _publish(self, sample: Sample, maintenance: Optional[dict]) -> None:
        now = self.clock()
        m = self.metrics
        m.incidents_open.set(len(self.book.open))
        m.circuit_open.set(1 if self.policy.circuit_open else 0)
        m.budget_left.set(self.policy.budget_left(now, self.cfg))
        if sample.gpu_total_bytes:
            m.gpu_used.set(sample.gpu_used_bytes)
            m.gpu_total.set(sample.gpu_total_bytes)
        if sample.rss_bytes is not None:
            m.rss.set(sample.rss_bytes)
        m.write_textfile(self.cfg.metrics_file)
        next_at = self.policy.next_restart_at(now, self.cfg)
        write_state(self.cfg.state_file, {
            "updated_at": self.wall(),
            "monitor_started_at": self.started_at,
            "sample": sample.summary(),
            "gpu_reader": getattr(self.probes.gpu, "reason", None),
            "maintenance": maintenance,
            "decision": None if self.last_decision is None else {
                "action": self.last_decision.action, "reason": self.last_decision.reason},
            "incidents_open": [i.as_dict() for i in self.book.open.values()],
            "incidents_recent": [i.as_dict() for i in list(self.book.closed)[-10:]],
            "restarts": list(self.restart_log),
            "budget": {"limit": self.cfg.restart_budget, "window_s": self.cfg.restart_budget_window_s,
                       "left": self.policy.budget_left(now, self.cfg), "circuit_open": self.policy.circuit_open,
                       "next_restart_in_s": None if next_at is None else max(0.0, round(next_at - now, 1))},
            "unexpected_restarts_in_window": len(self.unexpected_restarts),
            "alerts": vars(self.alerts.counters),
        })
