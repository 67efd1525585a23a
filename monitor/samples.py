"""What one tick of the monitor saw. Probes fill these; detectors read them; nothing here does I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from common.heartbeat import Heartbeat


@dataclass
class HttpResult:
    ok: bool  # got an answer with the expected status
    status: Optional[int] = None
    latency_s: float = 0.0
    error: Optional[str] = None  # "timeout", "refused", or another short reason
    body: Optional[dict] = None

    @property
    def timed_out(self) -> bool:
        return self.error == "timeout"


@dataclass
class LogEvent:
    line: str
    pattern: str
    severity: str
    action: str
    pid: Optional[int] = None  # the app process that wrote it (its JSON line, or the last one before it)


def tail_count(history, predicate) -> int:
    """How many of the most recent samples satisfy predicate, counted back until one does not."""
    count = 0
    for s in reversed(history):
        if not predicate(s):
            break
        count += 1
    return count


@dataclass
class Sample:
    now: float  # monotonic seconds (the injected clock)
    wall: float  # epoch seconds, to compare with the app's heartbeat
    supervisor_ok: bool = True
    program_state: Optional[str] = None  # RUNNING, STARTING, BACKOFF, STOPPED, EXITED, FATAL, ...
    pid: int = 0
    uptime_s: float = 0.0
    live: Optional[HttpResult] = None
    ready: Optional[HttpResult] = None
    process_status: Optional[str] = None  # psutil status: running, sleeping, stopped, zombie, ...
    # A process of the app's tree in state T (SIGSTOP or another stop signal): the app's own pid,
    # else the first of its children (a context-parallel rank, a compile worker) found so.
    stopped_pid: Optional[int] = None
    rss_bytes: Optional[int] = None  # whole process tree
    gpu_used_bytes: Optional[int] = None  # device
    gpu_total_bytes: Optional[int] = None
    gpu_app_bytes: Optional[int] = None  # the app tree's share, when NVML can attribute it
    gpu_name: Optional[str] = None
    log_events: list[LogEvent] = field(default_factory=list)
    log_position: Optional[dict] = None  # where the log follower stands after this sample's read
    # Replicas: how many of the other replicas answered /readyz 200 this tick (None: no peers).
    peers_ready: Optional[int] = None
    peers_total: int = 0
    # What the last monitor left when its own watchdog ended it (monitor/selfwatch.py): on the new
    # monitor's samples until one of them is in the journal.
    monitor_stalled: Optional[dict] = None
    # Why this monitor's journal is not on disk now (monitor/journal.py), None when it is.
    journal_error: Optional[str] = None
    # Replica 0's monitor of a stack with replicas: the balancer (HAProxy) on the public port, at
    # the path it answers itself. Any HTTP answer counts; status None is a refusal or a timeout.
    balancer_live: Optional[HttpResult] = None
    balancer_state: Optional[str] = None  # supervisord's state of the balancer program

    @cached_property
    def heartbeat(self) -> Optional[Heartbeat]:
        if self.live and self.live.body and isinstance(self.live.body.get("heartbeat"), dict):
            try:
                return Heartbeat.model_validate(self.live.body["heartbeat"])
            except ValueError:
                return None  # a body we cannot read is no heartbeat, not a crash of the monitor
        return None

    @property
    def engine_state(self) -> Optional[str]:
        if self.live and self.live.body:
            return self.live.body.get("state")
        return None

    @property
    def draining_for_s(self) -> Optional[float]:
        """How long the app has been drained for a restart, by its clock against ours (None: not
        draining, or an app too old to say since when)."""
        since = (self.live.body or {}).get("draining_since") if self.live else None
        return max(0.0, self.wall - since) if isinstance(since, (int, float)) else None

    def summary(self) -> dict:
        return {
            "program_state": self.program_state,
            "pid": self.pid,
            "uptime_s": round(self.uptime_s, 1),
            "live": None
            if self.live is None
            else {
                "ok": self.live.ok,
                "status": self.live.status,
                "latency_s": round(self.live.latency_s, 4),
                "error": self.live.error,
            },
            "ready": None if self.ready is None else self.ready.ok,
            "engine_state": self.engine_state,
            "heartbeat": None if self.heartbeat is None else self.heartbeat.model_dump(),
            "process_status": self.process_status,
            "stopped_pid": self.stopped_pid,
            "rss_bytes": self.rss_bytes,
            "gpu": None
            if self.gpu_total_bytes is None
            else {
                "name": self.gpu_name,
                "used_bytes": self.gpu_used_bytes,
                "total_bytes": self.gpu_total_bytes,
                "app_bytes": self.gpu_app_bytes,
            },
        }
