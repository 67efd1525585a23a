"""The pool's detectors, run by replica 0's monitor only (cfg.watch_capacity) so that the pool is
paged once, not once per replica: too few replicas ready, and the balancer in front of them not
answering. Pure, like monitor/detectors.py."""

from __future__ import annotations

from typing import Optional, Sequence

from common.enums import Action, FindingKind, Severity
from monitor.config import MonitorSettings
from monitor.findings import Finding
from monitor.samples import Sample, tail_count


def detect_capacity(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """Fewer replicas ready (this one and its peers) than min_ready for capacity_after_s: page. Only
    the monitor that is told its peers (replica 0's) reports it, so it is paged once, not N times."""
    last = history[-1]
    if last.peers_ready is None or not cfg.watch_capacity:
        return None

    def ready_count(s: Sample) -> int:
        return (s.peers_ready or 0) + (1 if s.ready is not None and s.ready.ok else 0)

    short = tail_count(history, lambda s: s.peers_ready is not None and ready_count(s) < cfg.min_ready)
    if not short or last.now - history[-short].now < cfg.capacity_after_s:
        return None
    return Finding(
        kind=FindingKind.capacity,
        severity=Severity.critical,
        action=Action.alert,
        reason=f"{ready_count(last)} of {last.peers_total + 1} replicas ready (min_ready {cfg.min_ready})",
        evidence={"ready": ready_count(last), "replicas": last.peers_total + 1},
    )


def detect_balancer_down(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """HAProxy not answering on the public port for balancer_after_s: every replica may be
    healthy and still no client gets through, which no replica's own probes can see. A crash that
    supervisord restarts within the bound is not paged; a wedged or FATAL one is. Alert only: the
    monitor's actions heal the app program, and a restart of the balancer drops every connection
    in flight, which is the operator's call."""
    last = history[-1]
    if last.balancer_live is None or not cfg.watch_capacity:
        return None
    silent = tail_count(history, lambda s: s.balancer_live is not None and s.balancer_live.status is None)
    if not silent or last.now - history[-silent].now < cfg.balancer_after_s:
        return None
    seconds = last.now - history[-silent].now
    return Finding(
        kind=FindingKind.balancer_down,
        severity=Severity.critical,
        action=Action.alert,
        reason=f"the balancer has not answered on the public port for {seconds:.0f} s "
        f"({last.balancer_live.error}; supervisord: {last.balancer_state or 'unknown'}): clients reach no "
        "replica. See logs/haproxy.log; `supervisorctl restart haproxy`",
        evidence={
            "state": last.balancer_state,
            "error": last.balancer_live.error,
            "seconds": round(seconds, 1),
        },
    )
