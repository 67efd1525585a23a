"""The names both processes and the alert payloads share: severities with one ranking, the monitor's
actions (its tiers) and the kinds of finding. str enums: they compare equal to, and serialise as,
their plain names, so logs, JSON state and alerts read the same as before."""

from __future__ import annotations

from enum import Enum


class _Name(str, Enum):
    """Prints, formats and serialises as its plain name on every Python (3.11 would say 'Action.kill')."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Severity(_Name):
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def of(cls, value) -> "Severity":
        return cls(value) if not isinstance(value, cls) else value


_RANK = {Severity.info: 0, Severity.warning: 1, Severity.error: 2, Severity.critical: 3}


class Action(_Name):
    """What the policy decides. The tiers, mildest first: alert, free_cache, restart, kill; start
    brings up an app that is not running; wait (backoff) and page (budget spent) act on nothing."""

    none = "none"
    alert = "alert"
    free_cache = "free_cache"
    restart = "restart"
    kill = "kill"
    start = "start"
    wait = "wait"
    page = "page"

    @property
    def restarts_app(self) -> bool:
        return self in (Action.restart, Action.kill, Action.start)


TIER_RANK = {Action.alert: 0, Action.free_cache: 1, Action.restart: 2, Action.kill: 3, Action.start: 2}


class FindingKind(_Name):
    oom_in_log = "oom_in_log"
    vram_pressure = "vram_pressure"
    hang = "hang"
    leak = "leak"
    memory_limit = "memory_limit"
    crash = "crash"
    crash_loop = "crash_loop"
    engine_unhealthy = "engine_unhealthy"
    not_ready = "not_ready"  # up and answering, but never ready: a start stuck (a load on storage)
    drain_abandoned = "drain_abandoned"  # drained for a restart that nobody finished (its driver died)
    monitor_stalled = "monitor_stalled"  # its loop wedged or failed every turn; its watchdog replaced it
    journal_unwritable = "journal_unwritable"  # the monitor's journal cannot be written (disk full)
    app_fatal = "app_fatal"
    app_down = "app_down"
    warmup_failed = "warmup_failed"
    restart_budget_exhausted = "restart_budget_exhausted"
    capacity = "capacity"  # fewer replicas ready than min_ready (watched by replica 0's monitor)
    balancer_down = "balancer_down"  # HAProxy not answering on the public port (replica 0's monitor)
