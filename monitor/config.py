"""The monitor's one typed settings object: zimage.toml [monitor] + ZIMAGE_MONITOR_* env.

The app's address and tokens are read from the [app] section through common.contract, so the two
processes cannot disagree about where the app listens, and the monitor imports nothing of app/.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.configfile import ConfigError, load_section, resolve_under
from common.contract import check_timeout_chain, load_app_contract, supervisor_stopwaitsecs
from common.cuda_markers import FATAL_CUDA_MARKERS, OOM_MARKERS
from common.replicas import Replica

Tier = Literal["alert", "free_cache", "restart", "kill"]


class LogPattern(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str  # a regular expression, searched in each new log line
    severity: Literal["warning", "error", "critical"] = "error"
    # The app frees its cache itself when it catches an OOM (that is tier 1), and the line is
    # written after it did: a line in the log therefore starts at tier 2, a graceful restart.
    action: Tier = "restart"


# The markers are plain text without regex metacharacters (a test keeps them so): as patterns they
# read in an alert as they read in the log.
DEFAULT_PATTERNS = [
    LogPattern(pattern=marker, severity="error", action="restart") for marker in OOM_MARKERS
] + [LogPattern(pattern=marker, severity="critical", action="restart") for marker in FATAL_CUDA_MARKERS]


class WebhookTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    format: Literal["generic", "slack", "alertmanager", "pagerduty"] = "generic"
    routing_key: Optional[str] = None  # PagerDuty Events v2: the integration's routing key


class MonitorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Path(".")
    program: str = "app"  # the supervisord program to watch
    supervisor_socket: Path = Path("run/supervisor.sock")
    app_url: Optional[str] = None  # default: http://<app.host>:<app.port>
    app_log: Path = Path("logs/app.log")
    state_file: Path = Path("run/monitor-state.json")  # what `zimagectl status` shows, rewritten each tick
    # The decision state that must survive the monitor's own death (open incidents, the action in
    # progress, budget, log position, alert outbox), written before every effect (monitor/journal.py).
    journal_file: Path = Path("run/monitor-journal.json")
    maintenance_file: Path = Path("run/maintenance")
    metrics_file: Path = Path("run/monitor.prom")  # node_exporter textfile format, written every tick
    metrics_port: Optional[int] = Field(None, ge=1, le=65535)  # also serve /metrics on 127.0.0.1:port

    interval_s: float = Field(1.0, gt=0, le=60)
    probe_timeout_s: float = Field(1.5, gt=0, le=60)
    # A process that has never answered liveness may refuse it this long (it is importing: 6–16 s
    # here, idle to busy; ~10× that); once it has answered, a refusal means its server is gone.
    startup_grace_s: float = Field(180.0, ge=0)
    # Answering liveness but not ready this long after the start, with no generation running nor
    # torch.compile at work: a start stuck (a load from storage that never answers) is paged. A
    # cold start that builds the AOT packages took 150–190 s on an H200 (docs/PERFORMANCE.md); under
    # Kubernetes the pod's startupProbe (/readyz, 1200 s) kills it later, as the last resort.
    ready_timeout_s: float = Field(600.0, gt=0)

    # hang
    hang_liveness_failures: int = Field(3, ge=1)  # consecutive timed-out liveness probes
    # A process stopped (state T: SIGSTOP, a debugger) is not probed; it is a hang once stopped this
    # long. A shorter pause (an operator's Ctrl-Z, a checkpoint) is not.
    hang_stopped_s: float = Field(5.0, gt=0)
    # A stage (encode, a denoising step, decode) silent longer than max(stall_min_s, stall_factor ×
    # the slowest time of that stage at that shape, as the app reports it) is a stall, once the app
    # is warm. Before the warm-up has ended, or when the app has no time for the stage, stall_floor_s.
    stall_min_s: float = Field(10.0, gt=0)
    stall_floor_s: float = Field(60.0, gt=0)
    stall_factor: float = Field(10.0, gt=1)
    # ...and never longer than this once warm. That bound is k × the slowest time seen, extrapolated
    # (× 8 for 4× the pixels) to a shape not seen yet, so one slow outlier (a contended host, a
    # memory squeeze) could stretch it to many minutes while every request queued behind the stuck
    # stage timed out. None: app.request_timeout_s (no stage may outlast a whole generation: its
    # caller has given up by then).
    stall_max_s: Optional[float] = Field(None, gt=0)
    # ...unless the app says torch.compile is at work (a first start with an empty compile cache
    # compiles for 40-100 s before its first step ends): then this long.
    compile_stall_s: float = Field(600.0, gt=0)

    # GPU memory
    vram_threshold: float = Field(0.92, gt=0, le=1)
    vram_samples: int = Field(5, ge=1)
    vram_trend_window_s: float = Field(30.0, gt=0)
    vram_trend_horizon_s: float = Field(60.0, gt=0)  # warn when the trend crosses the threshold this soon
    vram_escalate_after_s: float = Field(60.0, gt=0)  # pressure persisting after free-cache → restart

    # process memory (the memory limit supervisord has no key for)
    rss_limit_mb: Optional[int] = Field(None, ge=1)  # hard limit on the app tree's RSS → graceful restart
    leak_window_s: float = Field(600.0, gt=0)
    leak_growth_mb: int = Field(2048, ge=1)  # RSS growth within the window that counts as a leak
    leak_min_span_s: float = Field(60.0, ge=0)  # need at least this much history before judging

    # crash loop (supervisord restarting the app by itself)
    crash_loop_count: int = Field(3, ge=2)
    crash_loop_window_s: float = Field(300.0, gt=0)
    crash_report_s: float = Field(10.0, gt=0)  # a single crash is reported (alert only) for this long
    # The app STOPPED or EXITED this long with no maintenance mark (zimagectl down/restart) is down:
    # the monitor starts it. BACKOFF (supervisord retrying) is reported; FATAL is started at once.
    down_after_s: float = Field(3.0, ge=0)

    # policy
    restart_budget: int = Field(3, ge=1)
    restart_budget_window_s: float = Field(900.0, gt=0)
    backoff_initial_s: float = Field(10.0, ge=0)
    backoff_max_s: float = Field(300.0, ge=0)
    drain_wait_s: float = Field(150.0, ge=0)  # graceful restart: wait for in-flight work this long
    # Drained (readiness off) this long outside a maintenance mark: the restart it began was never
    # finished (a `zimagectl restart` interrupted or killed between its drain and its stop), and
    # the app refuses work until someone does: the monitor finishes it. Longer than any drain still
    # in progress: the app's own on SIGTERM ends in its exit within app.drain_timeout_s (checked at
    # load), and the monitor's own drain runs inside one of its ticks.
    drain_abandoned_s: float = Field(300.0, gt=0)
    stop_timeout_s: float = Field(200.0, gt=0)  # > supervisord's stopwaitsecs
    # The monitor's own loop silent this long (a call that never returns: NVML into a wedged
    # driver, /proc of a process stuck in the kernel): its watchdog exits it for a new one
    # (monitor/selfwatch.py). Above the longest single call an action makes (the warm-up request).
    loop_stall_s: float = Field(300.0, gt=0)
    resolve_quiet_samples: int = Field(3, ge=1)  # an incident resolves after this many clean samples

    # warm-up after every restart
    warmup_ready_timeout_s: float = Field(600.0, gt=0)
    warmup_size: int = Field(256, ge=64)
    warmup_steps: int = Field(2, ge=1)
    warmup_timeout_s: float = Field(120.0, gt=0)

    log_patterns: list[LogPattern] = Field(default_factory=lambda: list(DEFAULT_PATTERNS))

    # alerts
    webhooks: list[WebhookTarget] = Field(default_factory=list)
    webhook_secret: Optional[str] = None
    webhook_timeout_s: float = Field(5.0, gt=0, le=60)
    webhook_backoff_s: float = Field(1.0, ge=0)  # first retry delay; doubles up to webhook_backoff_max_s
    webhook_backoff_max_s: float = Field(30.0, ge=0)
    # Alerts wait in the journal's outbox, in order, until the receiver takes them, for this long.
    alert_outbox_max_age_s: float = Field(3600.0, ge=60)
    alert_queue_size: int = Field(1000, ge=1)  # outbox entries kept at most; the oldest go first
    service_name: str = "zimage-serve"
    # Replicas (app.replicas > 1): page when fewer than this many are ready for capacity_after_s.
    min_ready: int = Field(1, ge=0)
    capacity_after_s: float = Field(10.0, ge=0)
    watch_capacity: bool = False  # set for replica 0's monitor: one page for the whole pool
    # ...which also probes the balancer (HAProxy) on the public port: silent this long → page.
    balancer_url: Optional[str] = None  # set by load_monitor_settings for replica 0 of N > 1
    balancer_program: str = "haproxy"
    balancer_after_s: float = Field(5.0, ge=0)
    host_name: str = Field(default_factory=socket.gethostname)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhooks_from_text(cls, value):
        """Env form: comma-separated URLs, each optionally suffixed with #format."""
        if isinstance(value, str):
            targets = []
            for item in filter(None, (v.strip() for v in value.split(","))):
                url, _, fmt = item.partition("#")
                targets.append({"url": url, "format": fmt or "generic"})
            return targets
        return value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _empty_secret(cls, value):
        return value or None

    @model_validator(mode="after")
    def _paths(self):
        for name in (
            "supervisor_socket",
            "app_log",
            "state_file",
            "journal_file",
            "maintenance_file",
            "metrics_file",
        ):
            setattr(self, name, resolve_under(self.home, getattr(self, name)))
        return self


def load_monitor_settings(env: Mapping[str, str] | None = None, **overrides) -> MonitorSettings:
    """The [monitor] section; the timeout chain is checked against the [app] section and supervisord's.
    In a replica's monitor (ZIMAGE_REPLICA set) the program, log and own files are that replica's."""
    settings = load_section(MonitorSettings, "monitor", env, overrides)
    app = load_app_contract(env)
    if app.replica is not None:
        settings = for_replica(settings, app.replica_set()[app.replica])
        if app.replica == 0 and settings.balancer_url is None:
            settings.balancer_url = app.public_url
    check_timeout_chain(
        app.request_timeout_s, app.drain_timeout_s, supervisor_stopwaitsecs(), settings.stop_timeout_s
    )
    if settings.stall_max_s is None:
        settings.stall_max_s = max(app.request_timeout_s, settings.stall_min_s)
    if settings.stall_max_s < settings.stall_min_s:
        raise ConfigError(
            f"invalid timeouts: monitor.stall_max_s ({settings.stall_max_s:g} s) must be >= "
            f"monitor.stall_min_s ({settings.stall_min_s:g} s)"
        )
    if settings.loop_stall_s <= settings.warmup_timeout_s + settings.interval_s:
        raise ConfigError(
            f"invalid timeouts: monitor.loop_stall_s ({settings.loop_stall_s:g} s) must be > "
            f"monitor.warmup_timeout_s + interval_s ({settings.warmup_timeout_s + settings.interval_s:g} s), "
            "or the watchdog ends a monitor waiting on a warm-up"
        )
    if settings.drain_abandoned_s <= app.drain_timeout_s:
        raise ConfigError(
            f"invalid timeouts: monitor.drain_abandoned_s ({settings.drain_abandoned_s:g} s) must be > "
            f"app.drain_timeout_s ({app.drain_timeout_s:g} s), or the monitor restarts an app still draining"
        )
    return settings


def for_replica(settings: MonitorSettings, replica: Replica) -> MonitorSettings:
    """The settings of the monitor that watches `replica` (common/replicas.py names its files)."""
    run = resolve_under(settings.home, replica.run_dir)
    return settings.model_copy(
        update={
            "program": replica.program,
            "app_log": resolve_under(settings.home, replica.log),
            "state_file": run / "monitor-state.json",
            "journal_file": run / "monitor-journal.json",
            "maintenance_file": run / "maintenance",
            "metrics_file": run / "monitor.prom",
            "metrics_port": None if settings.metrics_port is None else settings.metrics_port + replica.index,
            "service_name": f"{settings.service_name}/{replica.label}",
            "watch_capacity": replica.index == 0,
        }
    )
