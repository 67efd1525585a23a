"""Follow the app's log: only bytes written after we started (or after the position we saved),
through rotation (rename + new file) and truncation, so a line is acted on at most once.

watchdog tells us promptly that the file changed; the reading itself happens in `poll()`, called
from the monitor's loop (one thread touches the file). Polling also runs on every tick, so a
missed filesystem event delays a line by one tick at most, never loses it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Optional

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from monitor.config import LogPattern
from monitor.samples import LogEvent

log = logging.getLogger("monitor.logwatch")
MAX_LINE = 64 * 1024  # a runaway line without newline is cut here rather than buffered forever
MAX_READ = 8 * 2**20  # per poll: a burst of log is read over several ticks


class LogFollower:
    def __init__(self, path: Path, patterns: list[LogPattern], position_file: Optional[Path] = None,
                 resume_max_age_s: float = 300.0, wake: Optional[threading.Event] = None):
        self.path = Path(path)
        self.patterns = [(re.compile(p.pattern), p) for p in patterns]
        self.position_file = position_file
        self.wake = wake
        self._fh = None
        self._inode: Optional[int] = None
        self._offset = 0
        self._partial = b""
        self._observer: Optional[Observer] = None
        self._open(resume_max_age_s)

    # ---- position ------------------------------------------------------------------------------
    def _open(self, resume_max_age_s: float) -> None:
        saved = self._load_position(resume_max_age_s)
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return  # the app has not written yet; poll() opens it when it appears, from byte 0
        st = os.fstat(fh.fileno())
        self._fh, self._inode = fh, st.st_ino
        if saved and saved["inode"] == st.st_ino and saved["offset"] <= st.st_size:
            self._offset = saved["offset"]  # resume: lines written while the monitor was away count once
            log.info("log follow resumed", extra={"event": "log_resume", "offset": self._offset})
        else:
            self._offset = st.st_size  # history is not news: start at the end
        fh.seek(self._offset)

    def _load_position(self, max_age_s: float) -> Optional[dict]:
        if not self.position_file:
            return None
        try:
            data = json.loads(self.position_file.read_text())
            if data.get("path") == str(self.path) and time.time() - data.get("saved_at", 0) <= max_age_s:
                return data
        except (OSError, ValueError):
            pass
        return None

    def save_position(self) -> None:
        if not self.position_file or self._inode is None:
            return
        tmp = self.position_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"path": str(self.path), "inode": self._inode, "offset": self._offset,
                                       "saved_at": time.time()}))
            os.replace(tmp, self.position_file)
        except OSError:
            pass

    @property
    def offset(self) -> int:
        return self._offset

    # ---- watching ------------------------------------------------------------------------------
    def start_watching(self) -> None:
        if self.wake is None:
            return
        wake, name = self.wake, self.path.name

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                src = os.path.basename(getattr(event, "src_path", "") or "")
                dest = os.path.basename(getattr(event, "dest_path", "") or "")
                if name in (src, dest) or src.startswith(name):
                    wake.set()

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.path.parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(2)
        if self._fh:
            self._fh.close()

    # ---- reading -------------------------------------------------------------------------------
    def poll(self) -> list[LogEvent]:
        """Read what is new since the last poll and return the lines that match a pattern."""
        lines = self._read_new_lines()
        events = []
        for raw in lines:
            text = raw.decode("utf-8", errors="replace")
            hits = [(regex, p) for regex, p in self.patterns if regex.search(text)]
            if hits:
                _, p = max(hits, key=lambda h: {"warning": 1, "error": 2, "critical": 3}[h[1].severity])
                events.append(LogEvent(line=text.strip(), pattern=p.pattern, severity=p.severity, action=p.action))
        return events

    def _read_new_lines(self) -> list[bytes]:
        chunks: list[bytes] = []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._fh is not None and (st is None or st.st_ino != self._inode):
            # Rotated: finish the old file through the handle we hold, then switch to the new one.
            chunks.append(self._fh.read(MAX_READ))
            self._fh.close()
            self._fh, self._inode, self._offset = None, None, 0
            log.info("log rotated", extra={"event": "log_rotated", "path": str(self.path)})
        if self._fh is None and st is not None:
            try:
                self._fh = open(self.path, "rb")
                self._inode, self._offset = os.fstat(self._fh.fileno()).st_ino, 0
            except FileNotFoundError:
                self._fh = None
        if self._fh is not None:
            size = os.fstat(self._fh.fileno()).st_size
            if size < self._offset:  # truncated in place (copytruncate, > app.log)
                log.info("log truncated", extra={"event": "log_truncated", "path": str(self.path)})
                self._offset, self._partial = 0, b""
                self._fh.seek(0)
            data = self._fh.read(MAX_READ)
            self._offset += len(data)
            chunks.append(data)
        data = self._partial + b"".join(chunks)
        if not data:
            return []
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        return lines
