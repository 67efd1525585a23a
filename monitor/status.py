"""The monitor's own state for operators: a JSON status file (read by `zimagectl status`) and
Prometheus metrics (textfile every tick, and /metrics on 127.0.0.1 when a port is set)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    write_to_textfile,
)

from common.jsonfile import read_dict, write_atomic


class MonitorMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.restarts = Counter(
            "zimage_monitor_restarts", "App restarts by the monitor", ["reason", "action"], registry=r
        )
        self.detections = Counter("zimage_monitor_detections", "Findings by kind", ["kind"], registry=r)
        self.actions = Counter("zimage_monitor_actions", "Actions taken", ["action", "ok"], registry=r)
        self.probe_latency = Histogram(
            "zimage_monitor_probe_seconds",
            "Probe latency",
            ["probe"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
        )
        self.alerts = Counter("zimage_monitor_alerts", "Alert deliveries by outcome", ["outcome"], registry=r)
        self.outbox = Gauge("zimage_monitor_alert_outbox", "Alerts waiting for a receiver", registry=r)
        self.incidents_open = Gauge("zimage_monitor_incidents_open", "Open incidents", registry=r)
        self.circuit_open = Gauge("zimage_monitor_circuit_open", "1 when auto-restart is stopped", registry=r)
        self.budget_left = Gauge(
            "zimage_monitor_restart_budget_left", "Restarts left in the window", registry=r
        )
        self.warmup_seconds = Gauge(
            "zimage_monitor_warmup_seconds", "Last warm-up generation time", registry=r
        )
        self.gpu_used = Gauge("zimage_monitor_gpu_used_bytes", "GPU memory used (NVML, device)", registry=r)
        self.gpu_total = Gauge("zimage_monitor_gpu_total_bytes", "GPU memory total (NVML)", registry=r)
        self.rss = Gauge("zimage_monitor_app_rss_bytes", "RSS of the app's process tree", registry=r)

    def serve(self, port: Optional[int]) -> None:
        if port:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def write_textfile(self, path: Path) -> None:
        try:
            write_to_textfile(str(path), self.registry)
        except OSError:
            pass


def write_state(path: Path, state: dict) -> None:
    """Atomic: readers never see half a file."""
    try:
        write_atomic(path, state, default=str, indent=1)
    except OSError:
        pass


def read_state(path: Path) -> Optional[dict]:
    return read_dict(path)
