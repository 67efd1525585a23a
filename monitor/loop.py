"""The loop: gather a sample, fold it into the state through core.step, persist, carry out the
effects. Everything that happens to the monitor comes through one queue and one dispatch
(gunicorn's arbiter): signal handlers and courier threads only put events on it and wake the loop.

Persist before acting: the state a step returns is in the journal before any of its effects runs,
so a monitor killed inside an action finds that action in the journal and rolls it forward."""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from common.enums import FindingKind
from common.jsonlog import scrub
from monitor import core
from monitor.actions import ActionResult, Actions
from monitor.alerts import Courier
from monitor.config import MonitorSettings
from monitor.journal import Journal
from monitor.probes import Probes
from monitor.samples import Sample
from monitor.status import MonitorMetrics, write_state

log = logging.getLogger("monitor.loop")


class Monitor:
    def __init__(
        self,
        cfg: MonitorSettings,
        probes: Probes,
        actions: Actions,
        journal: Journal,
        metrics: MonitorMetrics,
        state: Optional[core.MonitorState] = None,
        stop: Optional[threading.Event] = None,
        wall: Callable[[], float] = time.time,
    ):
        self.cfg, self.probes, self.actions = cfg, probes, actions
        self.journal, self.metrics = journal, metrics
        self.state = state if state is not None else journal.load()
        self.events: "queue.Queue[core.Event]" = queue.Queue()
        self.stop = stop or threading.Event()
        self.wake = threading.Event()
        self.wall = wall
        self.courier: Optional[Courier] = None
        self.started_at = wall()
        self.beat: Callable[[], None] = lambda: None  # the loop watchdog's (monitor/selfwatch.py)
        # What the last turn of the loop raised (None: it did not), told to the watchdog: a loop whose
        # every turn fails turns without healing anything, which is no progress either.
        self.failing: Optional[str] = None
        self.tell_failing: Callable[[str], None] = lambda error: None

    # ---- what other threads may call -------------------------------------------------------------
    def post(self, event: core.Event) -> None:
        """From a signal handler or the courier: queue it and wake the loop."""
        self.events.put(event)
        self.wake.set()

    def request_stop(self) -> None:
        self.stop.set()
        self.wake.set()

    # ---- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        log.info("monitor running", extra={"event": "monitor_start", "interval_s": self.cfg.interval_s})
        next_tick = 0.0
        while not self.stop.is_set():
            ticked = False
            try:
                self.drain_events()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.cfg.interval_s
                    self.tick()
                    ticked = True
            except Exception as exc:
                log.exception("tick failed", extra={"event": "tick_error"})
                self.failing = describe_failure(exc)
                self.tell_failing(self.failing)
            else:
                # Only a tick that went through ends a failing run: a turn woken by an event and not
                # due to tick proves nothing.
                if ticked and self.failing is not None:
                    log.warning("ticks succeed again", extra={"event": "tick_recovered"})
                    self.failing = None
                    self.beat()
            woke = self.wake.wait(max(0.0, next_tick - time.monotonic()))
            self.wake.clear()
            if woke and self.events.empty():
                next_tick = 0.0  # the log follower saw new lines: read them now, not at the next interval

    def drain_events(self) -> None:
        """Each turn of the loop, and each poll of an action's waits: the loop is making progress
        (unless its last turn raised: a turn that fails is not progress, however fast it turns)."""
        if self.failing is None:
            self.beat()
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            self.apply(event)

    def tick(self) -> None:
        wall = self.wall()
        chaos = self.probes.receiver_down_until(wall)
        if chaos is not None and self.courier is not None:
            self.courier.blackhole_until = chaos
        sample = self.probes.sample(time.monotonic(), wall)
        sample.journal_error = self.journal.error
        for name, seconds in self.probes.latencies.items():
            self.metrics.probe_latency.labels(probe=name).observe(seconds)
        maintenance = self.probes.maintenance(wall)
        self.apply(core.Observe(sample, maintenance))
        if sample.monitor_stalled and FindingKind.monitor_stalled in self.state.book.open:
            self.probes.ack_stalled()  # the last monitor's stall is an incident in the journal now
        self._publish(sample, maintenance)

    def apply(self, event: core.Event) -> None:
        """One dispatch: fold, persist, then act."""
        outbox_before = self.state.outbox
        state, effects = core.step(self.state, event, self.wall(), self.cfg)
        self.journal.save(state)
        self.state = state
        if self.courier is not None and state.outbox != outbox_before:
            self.courier.nudge()
        if isinstance(event, core.Delivered):
            self.metrics.alerts.labels(outcome=event.outcome).inc()
        for effect in effects:
            self._carry_out(effect)

    def _carry_out(self, effect: core.Effect) -> None:
        if isinstance(effect, core.LogLine):
            event = effect.fields.get("event")
            if event == "incident_open":
                self.metrics.detections.labels(kind=str(effect.fields.get("kind"))).inc()
            log.log(effect.level, effect.message, extra=effect.fields)
            return
        if isinstance(effect, core.RunAction):
            self._run_action(effect)

    def _run_action(self, effect: core.RunAction) -> None:
        action = str(effect.action.value)
        try:
            result = self.actions.run(action, effect.target_pid, effect.resumed)
        except Exception as exc:
            log.exception("action failed", extra={"event": "action_error", "action": action})
            result = ActionResult(action, False, 0.0, detail=f"{exc.__class__.__name__}: {exc}")
        if self.stop.is_set():
            # Our own SIGTERM cut the action's waits short: that is no failed warm-up. The action stays
            # in the journal; the next monitor rolls it forward (or an operator's maintenance takes it over).
            log.warning(
                "action interrupted by the monitor's stop; left to the next monitor",
                extra={"event": "action_interrupted", "action": action, "kind": effect.kind},
            )
            return
        if result.deferred:
            self.apply(
                core.ActionDone(action=action, ok=False, seconds=0.0, detail=result.detail, deferred=True)
            )
            return
        self.metrics.actions.labels(action=action, ok=str(result.ok).lower()).inc()
        warm = result.warmup
        restarting = action != "free_cache"
        if restarting:
            self.metrics.restarts.labels(reason=effect.kind, action=action).inc()
            if warm is not None and warm.ok:
                self.metrics.warmup_seconds.set(warm.seconds)
        self.apply(
            core.ActionDone(
                action=action,
                ok=result.ok,
                seconds=result.seconds,
                detail=result.detail,
                warmup_ok=(warm.ok if warm is not None else False) if restarting else None,
                warmup_note=warm.note() if warm is not None else "",
                old_pid=result.old_pid,
                new_pid=result.new_pid,
            )
        )

    # ---- reporting -----------------------------------------------------------------------------
    def _publish(self, sample: Sample, maintenance: Optional[dict]) -> None:
        now, state, m = self.wall(), self.state, self.metrics
        policy = state.policy
        m.incidents_open.set(len(state.book.open))
        m.circuit_open.set(1 if policy.circuit_open else 0)
        m.budget_left.set(policy.budget_left(now, self.cfg))
        m.outbox.set(len(state.outbox))
        if sample.gpu_total_bytes:
            m.gpu_used.set(sample.gpu_used_bytes)
            m.gpu_total.set(sample.gpu_total_bytes)
        if sample.rss_bytes is not None:
            m.rss.set(sample.rss_bytes)
        m.write_textfile(self.cfg.metrics_file)
        next_at = policy.next_restart_at(now, self.cfg)
        write_state(
            self.cfg.state_file,
            {
                "updated_at": now,
                "monitor_started_at": self.started_at,
                "sample": sample.summary(),
                "gpu_reader": getattr(self.probes.gpu, "reason", None),
                "maintenance": maintenance,
                "decision": state.last_decision,
                "pending_action": None if state.pending is None else vars(state.pending),
                "incidents_open": [i.as_dict() for i in state.book.open.values()],
                "incidents_recent": [i.as_dict() for i in list(state.book.closed)[-10:]],
                "restarts": list(state.restart_log),
                "budget": {
                    "limit": self.cfg.restart_budget,
                    "window_s": self.cfg.restart_budget_window_s,
                    "left": policy.budget_left(now, self.cfg),
                    "circuit_open": policy.circuit_open,
                    "next_restart_in_s": None if next_at is None else max(0.0, round(next_at - now, 1)),
                },
                "unexpected_restarts_in_window": len(state.unexpected_restarts),
                "alerts": {
                    "outbox": len(state.outbox),
                    "delivered": self.courier.delivered if self.courier else 0,
                    "failed_attempts": self.courier.failed_attempts if self.courier else 0,
                },
            },
        )


def describe_failure(exc: BaseException) -> str:
    """The exception as `Type: message at file:line in function` (its innermost frame), secrets
    scrubbed: for the alert that tells on-call why the monitor was replaced."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return scrub(f"{type(exc).__name__}: {exc}"[:240] + where)
