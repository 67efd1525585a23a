"""Follow the app's log: only bytes written after we started (or after the position the journal
kept), through rotation (rename + new file) and truncation, so a line is acted on at most once.

Every line is attributed to the app process that wrote it: the app's JSON lines carry their pid,
and a raw line (a traceback a thread printed, a C++ message) belongs to the process of the last JSON
line before it. The core acts only on lines of the process running now: a line an earlier process
wrote (or one appended to the file while the app was down) is history, never a restart.

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
from pathlib import Path
from typing import Optional

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from common.enums import Severity
from monitor.config import LogPattern
from monitor.samples import LogEvent

log = logging.getLogger("monitor.logwatch")
MAX_LINE = 64 * 1024  # a runaway line without newline is cut here rather than buffered forever
MAX_READ = 8 * 2**20  # per poll: a burst of log is read over several ticks


class LogFollower:
    def __init__(
        self,
        path: Path,
        patterns: list[LogPattern],
        resume: Optional[dict] = None,
        wake: Optional[threading.Event] = None,
    ):
        self.path = Path(path)
        self.patterns = [(re.compile(p.pattern), p) for p in patterns]
        self.wake = wake
        self._fh = None
        self._inode: Optional[int] = None
        self._offset = 0
        self._partial = b""
        self._last_pid: Optional[int] = None
        self._observer: Optional[Observer] = None
        self._open(resume)

    # ---- position ------------------------------------------------------------------------------
    def _open(self, saved: Optional[dict]) -> None:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return  # the app has not written yet; poll() opens it when it appears, from byte 0
        st = os.fstat(fh.fileno())
        self._fh, self._inode = fh, st.st_ino
        if (
            saved
            and saved.get("path") == str(self.path)
            and saved.get("inode") == st.st_ino
            and saved.get("offset", -1) <= st.st_size
        ):
            # Resume: lines written while the monitor was away count once, each for its own process.
            self._offset, self._last_pid = saved["offset"], saved.get("last_pid")
            log.info("log follow resumed", extra={"event": "log_resume", "offset": self._offset})
        else:
            self._offset = st.st_size  # history is not news: start at the end
            self._last_pid = _last_pid_before(fh, self._offset)
        fh.seek(self._offset)

    @property
    def position(self) -> Optional[dict]:
        """What the journal keeps, so a restarted monitor reads on from here (and knows whose lines)."""
        if self._inode is None:
            return None
        return {
            "path": str(self.path),
            "inode": self._inode,
            "offset": self._offset,
            "last_pid": self._last_pid,
        }

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
            pid = _pid_of(raw)
            if pid is not None:
                self._last_pid = pid
            text = raw.decode("utf-8", errors="replace")
            hits = [(regex, p) for regex, p in self.patterns if regex.search(text)]
            if hits:
                _, p = max(hits, key=lambda h: Severity.of(h[1].severity).rank)
                events.append(
                    LogEvent(
                        line=text.strip(),
                        pattern=p.pattern,
                        severity=p.severity,
                        action=p.action,
                        pid=self._last_pid,
                    )
                )
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


def _pid_of(raw: bytes) -> Optional[int]:
    """The pid of one of the app's JSON log lines; None for any other line."""
    if not raw.startswith(b"{") or b'"pid"' not in raw:
        return None
    try:
        pid = json.loads(raw).get("pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


def _last_pid_before(fh, offset: int, window: int = 256 * 1024) -> Optional[int]:
    """The pid of the last JSON line before offset: whose lines come next, when we start at the end."""
    fh.seek(max(0, offset - window))
    lines = fh.read(min(offset, window)).split(b"\n")
    for raw in reversed(lines):
        pid = _pid_of(raw)
        if pid is not None:
            return pid
    return None
