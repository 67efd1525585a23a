"""What was generated, newest first: a small durable index in run/ (stdlib sqlite3), written after
each save, read by GET /api/history and the UI's History tab.

The PNGs are the source of truth: each carries its parameters in an iTXt chunk. When the index is
missing or empty at start it is rebuilt from them, so losing run/ loses nothing. For the same reason a
row that cannot be written (the file locked past the wait by another replica or a backup, a full
disk) is told in the log and skipped: the request whose images are saved still gets them (it got a
500 before)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Optional

from PIL import Image

from app.web.outputs import SAFE_NAME

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    request_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    params TEXT NOT NULL,
    seed INTEGER NOT NULL,
    timings TEXT NOT NULL,
    images TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_created ON generations (created_at);
"""


class History:
    def __init__(self, path: Path, busy_timeout_s: float = 10.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from the event loop's threads under a lock: writes are tiny.
        # (replicas of one host share the file: sqlite's own locking, and a wait instead of an error)
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def add(
        self, request_id: str, created_at: float, params: dict, seed: int, timings: dict, images: list[str]
    ) -> bool:
        """Index one generation; False (and a warning) when the row could not be written."""
        try:
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        request_id,
                        created_at,
                        json.dumps(params),
                        seed,
                        json.dumps(timings),
                        json.dumps(images),
                    ),
                )
        except sqlite3.Error as exc:
            log.warning(
                "history row not written: the images are saved, the History list lacks them",
                extra={"event": "history_write_failed", "request_id": request_id, "error": str(exc)[:200]},
            )
            return False
        return True

    def page(self, limit: int = 20, before: Optional[float] = None) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, created_at, params, seed, timings, images FROM generations "
                "WHERE created_at < ? ORDER BY created_at DESC LIMIT ?",
                (before if before is not None else float("inf"), limit),
            ).fetchall()
        return [
            {
                "request_id": r[0],
                "created_at": r[1],
                "parameters": json.loads(r[2]),
                "seed": r[3],
                "timings": json.loads(r[4]),
                "images": json.loads(r[5]),
            }
            for r in rows
        ]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    def forget_images(self, names: set[str]) -> None:
        """Rows whose images were all deleted (retention) go; the others keep what is left."""
        if not names:
            return
        with self._lock:
            for request_id, images in self._db.execute(
                "SELECT request_id, images FROM generations"
            ).fetchall():
                listed = json.loads(images)
                left = [n for n in listed if n not in names]
                if not left:
                    self._db.execute("DELETE FROM generations WHERE request_id = ?", (request_id,))
                elif len(left) != len(listed):
                    self._db.execute(
                        "UPDATE generations SET images = ? WHERE request_id = ?",
                        (json.dumps(left), request_id),
                    )

    def rebuild_from(self, outputs_dir: Path) -> int:
        """Index the PNGs of outputs_dir by their own `parameters` chunk (an empty index only)."""
        if self.count() or not outputs_dir.is_dir():
            return 0
        grouped: dict[str, dict] = {}
        for path in sorted(outputs_dir.glob("*.png")):
            if not SAFE_NAME.match(path.name):
                continue
            params = read_parameters(path)
            if params is None:
                continue  # a file we cannot read is not history
            request_id = params.get("request_id") or path.name
            entry = grouped.setdefault(
                request_id, {"created_at": path.stat().st_mtime, "params": params, "images": []}
            )
            entry["images"].append(path.name)
        for request_id, entry in grouped.items():
            params = {k: v for k, v in entry["params"].items() if k not in ("index", "request_id")}
            self.add(request_id, entry["created_at"], params, int(params.get("seed", 0)), {}, entry["images"])
        return len(grouped)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_parameters(path: Path) -> Optional[dict]:
    """The generation parameters this service wrote into a PNG (its `parameters` iTXt chunk), or
    None. Only the chunks before the pixels are read (ours come first): no pixel is decoded, so a
    huge or malicious image costs nothing here."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return None
            params = json.loads(image.info.get("parameters", ""))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return params if isinstance(params, dict) else None
