"""The monitor's durable state on disk: written before every effect, read back at start.

One JSON file, replaced atomically (temp file, fsync, rename, fsync of the directory): a reader, or
a monitor started after a crash, sees the state before or after a step, never half of one. A step
that changed nothing durable writes nothing (most ticks). An unreadable journal is moved aside and
the monitor starts fresh, saying so: losing the journal must not stop the healing."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Optional

from monitor import policy as pol
from monitor.core import MonitorState, OutboxItem, PendingAction
from monitor.incidents import Incident, IncidentBook

log = logging.getLogger("monitor.journal")
VERSION = 1


def to_json(state: MonitorState) -> str:
    book = state.book
    data = {
        "version": VERSION,
        "policy": dataclasses.asdict(state.policy),
        "incidents_open": {str(kind): dataclasses.asdict(i) for kind, i in book.open.items()},
        "incidents_closed": [dataclasses.asdict(i) for i in book.closed],
        "pending": None if state.pending is None else dataclasses.asdict(state.pending),
        "known_pid": state.known_pid,
        "expect_new_pid": state.expect_new_pid,
        "supervisord": state.supervisord,
        "unexpected_restarts": list(state.unexpected_restarts),
        "outbox": [dataclasses.asdict(item) for item in state.outbox],
        "next_seq": state.next_seq,
        "alerted": list(state.alerted),
        "log_position": state.log_position,
        "restart_log": list(state.restart_log),
        "last_decision": state.last_decision,
        "last_logged": state.last_logged,
    }
    return json.dumps(data, default=str, sort_keys=True)


def from_json(text: str) -> MonitorState:
    data = json.loads(text)
    if data.get("version") != VERSION:
        raise ValueError(f"journal version {data.get('version')!r}, expected {VERSION}")
    book = IncidentBook()
    book.open = {kind: Incident(**raw) for kind, raw in data["incidents_open"].items()}
    book.closed = deque((Incident(**raw) for raw in data["incidents_closed"]), maxlen=book.closed.maxlen)
    return MonitorState(
        policy=pol.PolicyState(**data["policy"]),
        book=book,
        pending=None if data["pending"] is None else PendingAction(**data["pending"]),
        known_pid=data["known_pid"],
        expect_new_pid=data["expect_new_pid"],
        supervisord=data.get("supervisord", ""),  # (journals of earlier versions have none)
        unexpected_restarts=tuple(data["unexpected_restarts"]),
        outbox=tuple(OutboxItem(**{**raw, "targets": tuple(raw["targets"])}) for raw in data["outbox"]),
        next_seq=data["next_seq"],
        alerted=tuple(data["alerted"]),
        log_position=data["log_position"],
        restart_log=tuple(data["restart_log"]),
        last_decision=data["last_decision"],
        last_logged=None if data["last_logged"] is None else tuple(data["last_logged"]),
    )


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._written: Optional[str] = None
        self.error: Optional[str] = None  # why the last write failed; None once one succeeds

    def load(self) -> MonitorState:
        """The state the last monitor left, or a fresh one (none yet, or unreadable: moved aside)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return MonitorState()
        try:
            state = from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            log.error(
                "monitor journal unreadable: starting fresh",
                extra={
                    "event": "journal_unreadable",
                    "error": f"{exc.__class__.__name__}: {exc}"[:300],
                    "moved_to": str(aside),
                },
            )
            return MonitorState()
        self._written = text
        log.info(
            "monitor journal loaded",
            extra={
                "event": "journal_loaded",
                "incidents_open": len(state.book.open),
                "outbox": len(state.outbox),
                "pending": None if state.pending is None else state.pending.action,
            },
        )
        return state

    def save(self, state: MonitorState) -> bool:
        """Write the state if its durable part changed; True when a write happened.

        A write that fails (a full disk, a file system gone read-only) must not stop the healing:
        raising here left every step unapplied, so the monitor neither healed nor paged while the
        disk was full. The state lives on in memory; `error` says why it is not on disk (the
        journal_unwritable finding pages it), and the next step writes again."""
        text = to_json(state)
        if text == self._written:
            return False
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self._failed(f"{exc.__class__.__name__}: {exc}"[:300], tmp)
            return False
        if self.error is not None:
            log.warning("monitor journal written again", extra={"event": "journal_written_again"})
        self.error = None
        self._written = text
        return True

    def _failed(self, error: str, tmp: Path) -> None:
        if self.error is None:  # said once per outage, not once per step
            log.error(
                "monitor journal not written: healing goes on, a monitor restarted now forgets its state",
                extra={"event": "journal_unwritable", "path": str(self.path), "error": error},
            )
        self.error = error
        try:
            tmp.unlink(missing_ok=True)  # (a half-written temp file holds the space the disk lacks)
        except OSError:
            pass
