"""Structured logs: one JSON object per line on stdout, with secrets scrubbed before they are written."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Iterable

# Attributes every LogRecord has; anything else passed through `extra=` becomes a JSON field.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; known secret values are replaced by '***'."""

    def __init__(self, service: str, secrets: Iterable[str] = ()):
        super().__init__()
        self.service = service
        self.secrets = [s for s in secrets if s]

    def add_secret(self, secret: str | None) -> None:
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            # Which process wrote it: the monitor acts only on lines of the app process running now.
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return line


_formatter: JsonFormatter | None = None


def setup_logging(service: str, level: str = "info", secrets: Iterable[str] = ()) -> JsonFormatter:
    """Route the root logger (and uvicorn's) to JSON lines on stdout. Returns the formatter so that
    secrets learned later (a token file created at start) can be added to its scrub list."""
    global _formatter
    _formatter = JsonFormatter(service, secrets)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Third-party chatter that would drown the events operators read.
    for name in ("httpx", "httpcore", "watchdog", "urllib3", "diffusers", "transformers", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return _formatter


def add_secret(secret: str | None) -> None:
    """Scrub this value from every log line written from now on."""
    if _formatter is not None:
        _formatter.add_secret(secret)


def scrub(text: str) -> str:
    """`text` with every secret known to the log formatter replaced by '***': for text that leaves
    the process by another way than a log line (an alert's reason, a raw write to stderr)."""
    for secret in _formatter.secrets if _formatter is not None else ():
        text = text.replace(secret, "***")
    return text
