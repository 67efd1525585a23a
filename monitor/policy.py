"""Policy: findings → one action, in tiers, with backoff, a restart budget and a circuit breaker.
Pure: the state is a plain dataclass the loop keeps; `now` is passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from common.enums import Action
from monitor.config import MonitorSettings
from monitor.findings import Finding

RESTARTING_ACTIONS = tuple(a for a in Action if a.restarts_app)


@dataclass
class PolicyState:
    restarts: list[float] = field(default_factory=list)  # when the monitor restarted the app (monotonic)
    circuit_open: bool = False
    circuit_opened_at: Optional[float] = None
    free_cache_at: dict[str, float] = field(default_factory=dict)  # finding kind → last free-cache
    app_bytes_at_free: dict[str, Optional[int]] = field(default_factory=dict)  # the app's GPU share then

    def restarts_in_window(self, now: float, cfg: MonitorSettings) -> list[float]:
        return [t for t in self.restarts if t > now - cfg.restart_budget_window_s]

    def budget_left(self, now: float, cfg: MonitorSettings) -> int:
        return max(0, cfg.restart_budget - len(self.restarts_in_window(now, cfg)))

    def next_restart_at(self, now: float, cfg: MonitorSettings) -> Optional[float]:
        recent = self.restarts_in_window(now, cfg)
        if not recent:
            return None
        return recent[-1] + backoff_seconds(len(recent), cfg)


@dataclass
class Decision:
    action: str  # none | alert | free_cache | restart | kill | start | wait | page
    reason: str
    finding: Optional[Finding] = None
    wait_s: float = 0.0


def backoff_seconds(restarts_in_window: int, cfg: MonitorSettings) -> float:
    """Doubling delay after each restart in the window: initial, 2×, 4×, … capped."""
    if restarts_in_window <= 0:
        return 0.0
    return min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (restarts_in_window - 1))


def decide(
    findings: list[Finding],
    state: PolicyState,
    now: float,
    cfg: MonitorSettings,
    serving: bool = False,
    peers_down: int = 0,
) -> Decision:
    """serving: this replica answers /readyz 200 now; peers_down: other replicas not ready. A
    replica that serves is not taken down while another is down or warming (a rolling heal): the
    balancer would have nothing to send work to. One that does not serve is healed at once."""
    if not findings:
        return Decision("none", "healthy")
    finding = findings[0]  # most urgent first (detect_all sorts)
    action = finding.action

    if action == "free_cache":
        last = state.free_cache_at.get(finding.kind)
        if last is None:
            return Decision(
                "free_cache", f"tier 1 for {finding.kind}: ask the app to free its cache", finding
            )
        if now - last < cfg.vram_escalate_after_s:
            return Decision("none", f"cache freed {now - last:.0f} s ago; watching whether it helps", finding)
        app_bytes = finding.evidence.get("app_bytes")
        before = state.app_bytes_at_free.get(finding.kind)
        used = finding.evidence.get("used_bytes") or 0
        if app_bytes is not None and used and app_bytes < used / 2:
            # Most of the memory belongs to other processes: restarting ours would not help.
            return Decision("alert", "memory pressure comes mostly from other processes; alert only", finding)
        if app_bytes is not None and before is not None and app_bytes <= before * 1.05:
            # Our share did not grow after the cache was freed: the growth is someone else's
            # (seen on the H100 while a neighbour filled the card), so a restart would not help.
            return Decision("alert", "the app's own GPU memory is not growing; alert only", finding)
        action = "restart"

    if action == "alert":
        return Decision("alert", finding.reason, finding)

    if action in RESTARTING_ACTIONS:
        if state.circuit_open:
            return Decision(
                "none", "restart budget exhausted: auto-restart stopped until an operator resets", finding
            )
        if state.budget_left(now, cfg) == 0:
            return Decision(
                "page",
                f"restart budget exhausted ({cfg.restart_budget} per "
                f"{cfg.restart_budget_window_s:.0f} s): stopping auto-restarts",
                finding,
            )
        next_at = state.next_restart_at(now, cfg)
        if next_at is not None and now < next_at:
            return Decision(
                "wait",
                f"backing off: next restart allowed in {next_at - now:.0f} s",
                finding,
                wait_s=next_at - now,
            )
        if serving and peers_down and action in (Action.restart, Action.kill):
            return Decision(
                "wait",
                f"rolling heal: {peers_down} other replica(s) not ready; this one serves until they are",
                finding,
            )
        return Decision(
            action, f"tier {'3' if action == 'kill' else '2'} for {finding.kind}: {finding.reason}", finding
        )
    return Decision("none", f"no action for {finding.kind}", finding)


def record(decision: Decision, state: PolicyState, now: float) -> None:
    """Apply what an executed decision changes in the policy state."""
    if decision.action in RESTARTING_ACTIONS:
        state.restarts.append(now)
    elif decision.action == "free_cache" and decision.finding:
        state.free_cache_at[decision.finding.kind] = now
        state.app_bytes_at_free[decision.finding.kind] = decision.finding.evidence.get("app_bytes")
    elif decision.action == "page":
        state.circuit_open, state.circuit_opened_at = True, now


def reset_circuit(state: PolicyState) -> None:
    state.circuit_open, state.circuit_opened_at = False, None
    state.restarts.clear()


def forget_old(state: PolicyState, now: float, cfg: MonitorSettings) -> None:
    state.restarts = state.restarts_in_window(now, cfg)
    quiet_after = cfg.vram_escalate_after_s * 4
    state.free_cache_at = {k: t for k, t in state.free_cache_at.items() if now - t < quiet_after}
    state.app_bytes_at_free = {k: v for k, v in state.app_bytes_at_free.items() if k in state.free_cache_at}
