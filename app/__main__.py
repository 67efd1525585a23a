"""python -m app: validate the config (one clear line and exit 2 when invalid), then serve."""

from __future__ import annotations

import logging
import signal
import sys

from common.configfile import ConfigError, parse_command_line
from common.parent import die_with_parent, started_by_supervisord


def main(argv: list[str] | None = None) -> int:
    if started_by_supervisord():  # first: a supervisord that dies from here on takes this program along
        die_with_parent(signal.SIGTERM)
    parse_command_line(
        "python -m app",
        "zimage-serve app: the Gradio UI and JSON API serving Z-Image-Turbo (or the embedded demo model).",
        "app",
        argv,
    )
    from app.config import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"zimage-serve app: {exc}", file=sys.stderr)
        return 2
    from common.jsonlog import setup_logging

    setup_logging("app", settings.log_level, secrets=[settings.api_token or "", settings.admin_token or ""])
    from app import ranks

    group = ranks.start(settings)  # parallel = "context": the other ranks, before anything touches CUDA
    from app.runtime import start_weight_prefetch

    # The weights start streaming to the GPU now, under the imports below (docs/PERFORMANCE.md).
    start_weight_prefetch(settings)
    from app.web.api import create_app
    from app.web.server import serve

    log = logging.getLogger("app")
    log.info(
        "starting",
        extra={
            "event": "starting",
            "host": settings.host,
            "port": settings.port,
            "model": "demo" if settings.is_demo_model else str(settings.model_dir),
        },
    )
    serve(create_app(settings, with_ui=settings.ui, start_engine=True), settings)
    if group is not None:
        group.stop()
    log.info("stopped", extra={"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
