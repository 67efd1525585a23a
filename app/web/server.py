"""uvicorn with a drain: SIGTERM first stops readiness and new work, waits for in-flight requests up
to drain_timeout_s, then lets uvicorn shut down and the process exit 0. A second SIGINT/SIGTERM
forces the exit. Signal handlers only set flags; the tick acts on them (gunicorn's rule)."""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

from app.web.protocol import protocol_class
from common.parent import orphaned, write_to_own_log
from common.replicas import POOL_LEAVE_S

log = logging.getLogger("app.web.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service, drain_timeout_s: float, drain_min_s: float = 0.0):
        super().__init__(config)
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        # In a pool, a drain lasts at least until the balancer has taken the replica out
        # (common.replicas.POOL_LEAVE_S): until then its retries still come here, and find a 503.
        self.drain_min_s = drain_min_s
        self.drain_requested = False
        self.drain_started_at: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Not calling super(): uvicorn would re-raise the captured signal at exit, and supervisord
        # would see a death by SIGTERM instead of a clean exit 0.
        if self.drain_requested:
            self.should_exit = True
            self.force_exit = True
        self.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and not self.should_exit:
            now = time.monotonic()
            if self.drain_started_at is None:
                self.drain_started_at = now
                if orphaned() and write_to_own_log():  # TERM from the kernel: supervisord died
                    log.warning(
                        "supervisord is gone: draining, writing to the log file itself",
                        extra={"event": "orphaned"},
                    )
                self.service.begin_shutdown()
                log.warning(
                    "drain started",
                    extra={
                        "event": "drain_start",
                        "in_flight": self.service.in_flight,
                        "timeout_s": self.drain_timeout_s,
                    },
                )
            idle = self.service.idle() and now - self.drain_started_at >= self.drain_min_s
            late = now - self.drain_started_at >= self.drain_timeout_s
            if idle or late:
                log.warning(
                    "drain finished" if idle else "drain timed out; exiting with work in flight",
                    extra={
                        "event": "drain_done",
                        "idle": idle,
                        "in_flight": self.service.in_flight,
                        "seconds": round(now - self.drain_started_at, 2),
                    },
                )
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app, settings) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        server_header=False,
        # h11, each answer in one write, and deadlines for the client: app.web.protocol says why
        http=protocol_class(settings.client_timeout_s),
    )
    server = DrainingServer(
        config, app.state.service, settings.drain_timeout_s, POOL_LEAVE_S if app.state.pooled else 0.0
    )
    server.run()
    # Restore default SIGTERM behaviour so a wedged atexit cannot keep the process alive.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
