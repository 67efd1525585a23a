"""Small JSON files the processes share (the monitor's state, the operator's maintenance mark, the
stall marker the monitor's watchdog leaves): written whole (a temp file, then a rename), so a
reader never sees half of one; read back as a dict, or None when absent or unreadable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def write_atomic(path: Path, data: dict, **dumps) -> None:
    """Raises OSError (callers decide whether a failed write matters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, **dumps))
    os.replace(tmp, path)


def read_dict(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
