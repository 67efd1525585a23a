"""Detectors: pure functions of recent samples + settings → findings. No I/O, no clock of their own;
the tests drive them with hand-made samples. Sample.now (monotonic) measures spans inside the
history; Sample.wall is compared with the app's own epoch timestamps and the journal's."""

from __future__ import annotations

from typing import Optional, Sequence

from common.enums import TIER_RANK, Action, FindingKind, Severity
from monitor.config import MonitorSettings
from monitor.findings import Finding
from monitor.memory_detectors import detect_memory, detect_vram_pressure
from monitor.pool_detectors import detect_balancer_down, detect_capacity
from monitor.samples import Sample, tail_count

DOWN_STATES = ("STOPPED", "EXITED", "BACKOFF")


def detect_oom_in_log(sample: Sample) -> Optional[Finding]:
    """New log lines matching the configured patterns, written by the app process running now (the
    core drops lines of earlier processes before this; lines seen before never reach here)."""
    if not sample.log_events:
        return None
    worst = max(sample.log_events, key=lambda e: Severity.of(e.severity).rank)
    action = max((Action(e.action) for e in sample.log_events), key=lambda a: TIER_RANK[a])
    return Finding(
        kind=FindingKind.oom_in_log,
        severity=Severity.of(worst.severity),
        action=action,
        reason=f"{len(sample.log_events)} new matching line(s) in the app log: /{worst.pattern}/",
        evidence={
            "lines": [e.line[:500] for e in sample.log_events[-5:]],
            "patterns": sorted({e.pattern for e in sample.log_events}),
            "pid": sample.pid,
        },
    )


def stall_bound(hb, cfg: MonitorSettings) -> float:
    """How long the running stage may stay silent. Warm and not compiling: max(stall_min_s, k × the
    slowest this stage took at this shape), at most stall_max_s; otherwise the floor, or
    compile_stall_s while compiling."""
    if hb.compiling_since:
        return max(cfg.stall_floor_s, cfg.compile_stall_s)
    if not hb.warm or not hb.stage_slowest_s:
        return cfg.stall_floor_s
    bound = max(cfg.stall_min_s, cfg.stall_factor * hb.stage_slowest_s)
    return bound if cfg.stall_max_s is None else min(bound, cfg.stall_max_s)


def detect_hang(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """A process stopped for hang_stopped_s, liveness timing out N times in a row, or a stage silent
    past its bound. A long generation whose stages keep ending is never a hang."""
    if not history:
        return None
    last = history[-1]
    if last.program_state != "RUNNING":
        return None  # supervisord is (re)starting or stopped it: not ours to call a hang
    # The app or any process of its tree: a stopped rank hangs every generation of the group.
    stopped = tail_count(history, lambda s: s.pid == last.pid and s.stopped_pid is not None)
    if stopped:
        stopped_s = last.now - history[-stopped].now
        if stopped_s >= cfg.hang_stopped_s:
            who = (
                f"app process {last.pid}"
                if last.stopped_pid == last.pid
                else f"process {last.stopped_pid} of app {last.pid}'s tree (a rank, a worker)"
            )
            return Finding(
                kind=FindingKind.hang,
                severity=Severity.critical,
                action=Action.kill,
                reason=f"{who} is stopped (state T) for {stopped_s:.1f} s",
                evidence={
                    "pid": last.pid,
                    "stopped_pid": last.stopped_pid,
                    "process_status": last.process_status,  # the app's own: "stopped" unless a child is
                    "stopped_s": round(stopped_s, 1),
                },
            )
        if last.process_status == "stopped":
            return None  # a pause, so far: a stopped app is not probed, so nothing else to judge

    answered = any(s.pid == last.pid and s.live is not None and s.live.ok for s in history)

    def failed_live(s: Sample) -> bool:
        if s.pid != last.pid or s.live is None or s.live.ok:
            return False
        if s.live.timed_out:
            return True
        # Refused (nothing listens): a process that answered before lost its server; one that never
        # has is still importing until startup_grace_s (a loaded machine took 30 s and more: a
        # fixed short grace killed every start, one after the other). A 5xx is the app answering.
        return s.live.status is None and (answered or s.uptime_s >= cfg.startup_grace_s)

    failures = tail_count(history, failed_live)
    if failures >= cfg.hang_liveness_failures:
        return Finding(
            kind=FindingKind.hang,
            severity=Severity.critical,
            action=Action.kill,
            reason=f"liveness probe failed {failures} times in a row ({last.live.error})",
            evidence={
                "pid": last.pid,
                "failures": failures,
                "last_error": last.live.error,
                "probe_timeout_s": cfg.probe_timeout_s,
            },
        )
    hb = last.heartbeat
    silent = hb.silent_for(last.wall) if (hb and last.live and last.live.ok) else None
    if silent is not None:
        bound = stall_bound(hb, cfg)
        if silent > bound:
            where = (
                f"{hb.stage} (step {hb.steps_done + 1} of {hb.steps_total})"
                if hb.stage == "denoise"
                else (hb.stage or "generation")
            )
            return Finding(
                kind=FindingKind.hang,
                severity=Severity.critical,
                action=Action.kill,
                reason=f"generation stalled in {where}: no progress for {silent:.0f} s (bound {bound:.0f} s)",
                evidence={
                    "pid": last.pid,
                    "stage": hb.stage,
                    "seconds_silent": round(silent, 1),
                    "bound_s": bound,
                    "stage_slowest_s": hb.stage_slowest_s,
                    "steps_done": hb.steps_done,
                    "steps_total": hb.steps_total,
                    "request_ids": hb.request_ids,
                },
            )
    return None


STARTING_STATES = ("starting", "loading", "warming")


def detect_not_ready(last: Sample, cfg: MonitorSettings) -> Optional[Finding]:
    """Up and answering liveness, but still starting ready_timeout_s after the process began, and
    nothing to show for it: no generation running (a stalled warm-up is detect_hang's) and no
    torch.compile at work. Without this a start stuck on storage is a silent hang: alive, never
    ready, never reported. Reported, not killed: from outside it looks the same as a first AOT
    build that is slow (it runs inside the load), and killing that would start it again from
    nothing, forever."""
    if last.program_state != "RUNNING" or not (last.live and last.live.ok) or last.ready is None:
        return None
    if last.ready.ok or last.uptime_s < cfg.ready_timeout_s or last.engine_state not in STARTING_STATES:
        return None
    hb = last.heartbeat
    if hb is not None and (hb.busy or hb.compiling_since):
        return None
    return Finding(
        kind=FindingKind.not_ready,
        severity=Severity.critical,
        action=Action.alert,
        reason=f"not ready {last.uptime_s:.0f} s after the start (engine {last.engine_state}, "
        f"bound {cfg.ready_timeout_s:.0f} s): a load stuck on storage, or a slow first build",
        evidence={"pid": last.pid, "engine_state": last.engine_state, "uptime_s": round(last.uptime_s, 1)},
    )


def detect_drain_abandoned(last: Sample, cfg: MonitorSettings) -> Optional[Finding]:
    """Drained for a restart drain_abandoned_s ago and still running: whoever drained it (a
    `zimagectl restart` interrupted between its drain and its stop, or killed with its terminal) is
    gone, and the app refuses all work until the restart happens. The monitor finishes it: a graceful
    restart (the drain is already done), warmed and checked like any other. A drain inside a
    maintenance mark is never seen here (the core does not judge planned windows)."""
    if last.program_state != "RUNNING" or not (last.live and last.live.ok):
        return None
    drained_s = last.draining_for_s
    if drained_s is None or drained_s < cfg.drain_abandoned_s:
        return None
    return Finding(
        kind=FindingKind.drain_abandoned,
        severity=Severity.error,
        action=Action.restart,
        reason=f"drained for a restart {drained_s:.0f} s ago and still running (bound "
        f"{cfg.drain_abandoned_s:.0f} s): the restart was never finished; finishing it",
        evidence={"pid": last.pid, "draining_s": round(drained_s, 1)},
    )


def detect_engine_unhealthy(sample: Sample) -> Optional[Finding]:
    """The app says so itself: /healthz 503 with state unhealthy (fatal CUDA error) or failed (load)."""
    if sample.live and sample.live.status == 503 and sample.engine_state in ("unhealthy", "failed"):
        reason = (sample.live.body or {}).get("reason") or sample.engine_state
        return Finding(
            kind=FindingKind.engine_unhealthy,
            severity=Severity.critical,
            action=Action.restart,
            reason=f"the app reports its engine {sample.engine_state}: {reason}",
            evidence={"state": sample.engine_state, "reason": reason, "pid": sample.pid},
        )
    return None


def detect_not_running(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """The app not RUNNING is never healthy. FATAL: supervisord gave up, start it. STOPPED/EXITED for
    down_after_s: nothing will start it (a stop outside the operator's maintenance mark, or a monitor
    that died between stopping and starting it), so the monitor does. BACKOFF: supervisord is
    retrying; reported, and FATAL follows if it keeps failing."""
    last = history[-1]
    if last.program_state == "FATAL":
        return Finding(
            kind=FindingKind.app_fatal,
            severity=Severity.critical,
            action=Action.start,
            reason="supervisord gave up on the app (FATAL: it exited too quickly, startretries used)",
            evidence={"state": "FATAL"},
        )
    down = tail_count(history, lambda s: s.program_state in DOWN_STATES)
    if not down:
        return None
    down_s = last.now - history[-down].now
    if down_s < cfg.down_after_s:
        return None
    action = Action.alert if last.program_state == "BACKOFF" else Action.start
    return Finding(
        kind=FindingKind.app_down,
        severity=Severity.critical,
        action=action,
        reason=f"the app is {last.program_state} for {down_s:.0f} s"
        + (" (supervisord is retrying)" if action == Action.alert else " and nothing starts it"),
        evidence={"state": last.program_state, "down_s": round(down_s, 1)},
    )


def detect_crash_loop(
    unexpected_restarts: Sequence[float], sample: Sample, cfg: MonitorSettings
) -> Optional[Finding]:
    """supervisord restarting the app by itself again and again (pid changes we did not cause).
    unexpected_restarts are epoch seconds (they outlive the monitor in its journal)."""
    recent = [t for t in unexpected_restarts if t >= sample.wall - cfg.crash_loop_window_s]
    if len(recent) >= cfg.crash_loop_count:
        return Finding(
            kind=FindingKind.crash_loop,
            severity=Severity.critical,
            action=Action.alert,
            reason=f"the app died and was restarted by supervisord {len(recent)} times in "
            f"{cfg.crash_loop_window_s:.0f} s",
            evidence={"restarts_in_window": len(recent), "state": sample.program_state},
        )
    fresh = [t for t in recent if t >= sample.wall - cfg.crash_report_s]
    if fresh:
        # One crash: supervisord already restarted it; on-call hears of it, the monitor need not act.
        return Finding(
            kind=FindingKind.crash,
            severity=Severity.warning,
            action=Action.alert,
            reason="the app died and supervisord restarted it",
            evidence={"restarts_in_window": len(recent), "state": sample.program_state, "pid": sample.pid},
        )
    return None


def detect_monitor_stalled(last: Sample) -> Optional[Finding]:
    """The monitor before this one wedged (its loop silent past loop_stall_s) or raised on every
    turn for as long, and its watchdog replaced it: nothing was healed meanwhile, so on-call hears
    of it, and where it hung or what it raised."""
    stalled = last.monitor_stalled
    if not stalled:
        return None
    bound = f"{stalled.get('silent_s')} s (bound {stalled.get('bound_s')} s)"
    what = (
        f"every turn of the monitor's loop raised for {bound}: {stalled['error']}"
        if stalled.get("error")
        else f"the monitor's loop was stuck {bound} in {stalled.get('where')}"
    )
    return Finding(
        kind=FindingKind.monitor_stalled,
        severity=Severity.error,
        action=Action.alert,
        reason=f"{what}; its watchdog replaced it and healing resumed",
        evidence=dict(stalled),
    )


def detect_journal_unwritable(last: Sample) -> Optional[Finding]:
    """The monitor heals on from memory, but its crash-safety is gone until the journal is written:
    a monitor restarted now forgets the open incidents, the action under way and the alerts owed."""
    if not last.journal_error:
        return None
    return Finding(
        kind=FindingKind.journal_unwritable,
        severity=Severity.error,
        action=Action.alert,
        reason=f"the monitor cannot write its journal ({last.journal_error}); it heals on, but a "
        "restarted monitor would forget its open incidents and any action under way",
        evidence={"error": last.journal_error},
    )


def detect_all(
    history: Sequence[Sample], unexpected_restarts: Sequence[float], cfg: MonitorSettings
) -> list[Finding]:
    """Every finding for the newest sample, most urgent first."""
    last = history[-1]
    candidates = [
        detect_not_running(history, cfg),
        detect_hang(history, cfg),
        detect_engine_unhealthy(last),
        detect_not_ready(last, cfg),
        detect_drain_abandoned(last, cfg),
        detect_crash_loop(unexpected_restarts, last, cfg),
        detect_oom_in_log(last),
        detect_memory(history, cfg),
        detect_vram_pressure(history, cfg),
        detect_capacity(history, cfg),
        detect_balancer_down(history, cfg),
        detect_monitor_stalled(last),
        detect_journal_unwritable(last),
    ]
    found = [f for f in candidates if f is not None]
    return sorted(found, key=lambda f: -f.severity.rank)
