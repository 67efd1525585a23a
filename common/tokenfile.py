"""The admin token shared by the app and the monitor through a 0600 file, never through argv or env.

The app creates the file at start when the operator configured no token; the monitor and zimagectl
read it when they need it. A file keeps the secret out of `ps`, supervisord's config and the logs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def read_token(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    return value or None


def ensure_token(path: Path) -> str:
    """Return the token in `path`, creating it (mode 0600, atomically) when absent."""
    existing = read_token(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    try:
        # link() fails if another process won the race; then its token is the one.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return read_token(path) or token


def bearer_headers(token: str | None) -> dict:
    """The admin routes' header for `token` (none when there is no token: the app then answers 401)."""
    return {"authorization": f"Bearer {token}"} if token else {}
