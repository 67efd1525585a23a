"""python -m monitor: the self-healing sidecar, run by supervisord next to the app."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from common.configfile import ConfigError, parse_command_line


def main(argv: list[str] | None = None) -> int:
    parse_command_line("python -m monitor", "zimage-serve monitor: the self-healing sidecar that watches the "
                       "app (probes, GPU, memory, log) and heals it through supervisord.", "monitor", argv)
    from app.config import load_settings as load_app_settings
    from monitor.config import load_monitor_settings

    try:
        app_cfg = load_app_settings()
        cfg = load_monitor_settings()
    except ConfigError as exc:
        print(f"zimage-serve monitor: {exc}", file=sys.stderr)
        return 2
    from common.jsonlog import setup_logging

    setup_logging("monitor", cfg.log_level, secrets=[cfg.webhook_secret or "", app_cfg.api_token or "",
                                                      app_cfg.admin_token or ""])
    from common.gpu import open_gpu_reader
    from common.supervisor_client import SupervisorClient
    from monitor.actions import Actions
    from monitor.alerts import AlertDispatcher
    from monitor.logwatch import LogFollower
    from monitor.loop import Monitor
    from monitor.probes import Probes
    from monitor.status import MonitorMetrics

    log = logging.getLogger("monitor")
    app_url = cfg.app_url or app_cfg.local_url
    metrics = MonitorMetrics()
    metrics.serve(cfg.metrics_port)
    gpu = open_gpu_reader()
    log.info("GPU reader: %s", gpu.reason, extra={"event": "gpu_reader", "available": gpu.available})
    wake = threading.Event()
    follower = LogFollower(cfg.app_log, cfg.log_patterns, cfg.log_position_file, wake=wake)
    follower.start_watching()
    supervisor = SupervisorClient(cfg.supervisor_socket, timeout=max(2.0, cfg.probe_timeout_s))
    alerts = AlertDispatcher(cfg.webhooks, cfg.webhook_secret, cfg.service_name, cfg.host_name,
                             timeout_s=cfg.webhook_timeout_s, retries=cfg.webhook_retries,
                             backoff_s=cfg.webhook_backoff_s, queue_size=cfg.alert_queue_size,
                             on_result=lambda _url, outcome: metrics.alerts.labels(outcome=outcome).inc())
    chaos_file = cfg.home / "run" / "chaos.json" if app_cfg.fault_injection else None
    probes = Probes(app_url, supervisor, cfg.program, gpu, follower, cfg.probe_timeout_s, cfg.maintenance_file,
                    chaos_file)
    monitor_ref: list = []
    actions = Actions(app_url, supervisor, cfg.program, app_cfg.admin_token_file, app_cfg.admin_token,
                      app_cfg.api_token, cfg, should_stop=lambda: bool(monitor_ref) and
                      monitor_ref[0].stop_requested.is_set())
    monitor = Monitor(cfg, probes, actions, alerts, metrics)
    monitor.wake = wake
    monitor_ref.append(monitor)

    def on_stop(signum, _frame):
        monitor.stop_requested.set()
        wake.set()

    def on_hup(_signum, _frame):
        monitor.reset_requested.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("watching", extra={"event": "monitor_config", "app_url": app_url, "program": cfg.program,
                                "log": str(cfg.app_log), "webhooks": len(cfg.webhooks),
                                "signed": bool(cfg.webhook_secret)})
    try:
        monitor.run()
    finally:
        follower.save_position()
        follower.stop()
        alerts.stop(timeout=3.0)
        probes.close()
        gpu.close()
        log.info("monitor stopped", extra={"event": "monitor_stop"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
