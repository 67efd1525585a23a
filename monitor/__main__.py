"""python -m monitor: the self-healing sidecar, run by supervisord next to the app."""

from __future__ import annotations

import logging
import signal
import sys

from common.configfile import ConfigError, parse_command_line
from common.parent import die_with_parent, orphaned, started_by_supervisord, write_to_own_log


def main(argv: list[str] | None = None) -> int:
    if started_by_supervisord():  # first: a supervisord that dies from here on takes this program along
        die_with_parent(signal.SIGTERM)
    parse_command_line(
        "python -m monitor",
        "zimage-serve monitor: the self-healing sidecar that watches the "
        "app (probes, GPU, memory, log) and heals it through supervisord.",
        "monitor",
        argv,
    )
    from common.contract import load_app_contract
    from monitor.config import load_monitor_settings

    try:
        app_cfg = load_app_contract()
        cfg = load_monitor_settings()
    except ConfigError as exc:
        print(f"zimage-serve monitor: {exc}", file=sys.stderr)
        return 2
    from common.jsonlog import setup_logging

    setup_logging(
        "monitor",
        cfg.log_level,
        secrets=[cfg.webhook_secret or "", app_cfg.api_token or "", app_cfg.admin_token or ""]
        + [t.routing_key or "" for t in cfg.webhooks],
    )
    from monitor.selfwatch import MARKER_NAME, LoopWatchdog

    # First, before anything that could hang (NVML's init): a wedged monitor exits for a new one.
    stall_marker = cfg.journal_file.parent / MARKER_NAME
    watchdog = LoopWatchdog(cfg.loop_stall_s, stall_marker).start()
    from common.gpu import open_gpu_reader
    from common.supervisor_client import SupervisorClient
    from monitor import core
    from monitor.actions import Actions
    from monitor.alerts import Courier
    from monitor.journal import Journal
    from monitor.logwatch import LogFollower
    from monitor.loop import Monitor
    from monitor.probes import Probes
    from monitor.state import under_supervisord
    from monitor.status import MonitorMetrics

    log = logging.getLogger("monitor")
    app_url = cfg.app_url or app_cfg.local_url
    # A replica's monitor knows the others (the rolling heal) and reads its own GPU.
    peers: tuple[str, ...] = ()
    heal_slot = None
    if app_cfg.replica is not None:
        from monitor.rolling import HealSlot

        host = app_url.rsplit(":", 1)[0]
        peers = tuple(f"{host}:{r.port}" for r in app_cfg.replica_set() if r.index != app_cfg.replica)
        heal_slot = HealSlot(cfg.home / "run" / "heal.lock", app_url, peers, cfg.warmup_ready_timeout_s)
    metrics = MonitorMetrics()
    metrics.serve(cfg.metrics_port)
    gpu = open_gpu_reader(None if app_cfg.replica is None else [app_cfg.replica])
    log.info("GPU reader: %s", gpu.reason, extra={"event": "gpu_reader", "available": gpu.available})
    journal = Journal(cfg.journal_file)
    supervisor = SupervisorClient(cfg.supervisor_socket, timeout=max(2.0, cfg.probe_timeout_s))
    journaled = journal.load()
    state = under_supervisord(journaled, supervisor.identity())
    if journaled.supervisord and state.supervisord != journaled.supervisord:
        log.info(
            "the journal was written under an earlier supervisord: its app pid is forgotten, the new "
            "app's pid is no crash",
            extra={"event": "journal_new_supervisord", "forgotten_pid": journaled.known_pid},
        )
    follower = LogFollower(cfg.app_log, cfg.log_patterns, resume=state.log_position)
    chaos_file = cfg.home / "run" / "chaos.json" if app_cfg.fault_injection else None
    probes = Probes(
        app_url,
        supervisor,
        cfg.program,
        gpu,
        follower,
        cfg.probe_timeout_s,
        cfg.maintenance_file,
        chaos_file,
        peer_urls=peers,
        stall_marker=stall_marker,
        balancer=(cfg.balancer_url, cfg.balancer_program) if cfg.balancer_url else None,
    )
    monitor = None
    actions = Actions(
        app_url,
        supervisor,
        cfg.program,
        app_cfg.admin_token_file,
        app_cfg.admin_token,
        app_cfg.api_token,
        cfg,
        should_stop=lambda: monitor is not None and monitor.stop.is_set(),
        heal_slot=heal_slot,
    )
    monitor = Monitor(cfg, probes, actions, journal, metrics, state=state)
    actions.idle = monitor.drain_events
    monitor.beat = watchdog.beat
    monitor.tell_failing = watchdog.failing
    follower.wake = monitor.wake
    follower.start_watching()
    courier = Courier(
        cfg.webhooks,
        lambda: monitor.state.outbox,
        monitor.post,
        cfg.webhook_secret,
        cfg.service_name,
        cfg.host_name,
        timeout_s=cfg.webhook_timeout_s,
        backoff_s=cfg.webhook_backoff_s,
        backoff_max_s=cfg.webhook_backoff_max_s,
        max_age_s=cfg.alert_outbox_max_age_s,
        ledger_dir=cfg.journal_file.parent,
    )
    for delivered in courier.recorded():  # finished by the last monitor's couriers, maybe not yet recorded
        monitor.apply(delivered)
    monitor.courier = courier.start()

    # Signals only post to the loop's queue (gunicorn's rule): no work inside a handler.
    signal.signal(signal.SIGTERM, lambda *_: monitor.request_stop())
    signal.signal(signal.SIGINT, lambda *_: monitor.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: monitor.post(core.OperatorReset()))
    log.info(
        "watching",
        extra={
            "event": "monitor_config",
            "app_url": app_url,
            "program": cfg.program,
            "peers": list(peers),
            "balancer": cfg.balancer_url,
            "log": str(cfg.app_log),
            "webhooks": len(cfg.webhooks),
            "signed": bool(cfg.webhook_secret),
            "outbox": len(state.outbox),
        },
    )
    try:
        monitor.run()
    finally:
        if orphaned():  # stopped by its supervisord's death: its pipe is gone, its log file is not
            write_to_own_log()
            log.warning("supervisord is gone: the monitor stops with it", extra={"event": "orphaned"})
        watchdog.stop()
        follower.stop()
        courier.stop(timeout=3.0)
        probes.close()
        gpu.close()
        log.info("monitor stopped", extra={"event": "monitor_stop"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
