"""Alert delivery from the journal's outbox: one courier thread per webhook target, each taking that
target's oldest undelivered alert, retrying it with capped exponential backoff until the receiver
takes it (then the next, in order) or it is older than alert_outbox_max_age_s. A receiver that
refuses a body for good (a 4xx other than 408/429) is not asked again for it.

The courier never changes the outbox itself: it tells the loop (`report`), which folds the outcome
into the state through core.step and persists it, so a delivery survives the monitor's restart
exactly like a decision. The loop may be busy in an action for seconds when the report comes, so
each courier also appends the finished alert to a small ledger of its own (fsync'd before the
report): a monitor killed before the loop folded a delivery finds it there at start
(`recorded()`), and does not send it again. The ledger is emptied when the outbox has nothing left
for that target. Delivery runs on its own threads: an unreachable receiver delays alerts,
never the healing."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import httpx

from monitor.alert_payloads import SIGNATURE_HEADER, generic_payload, render, sign
from monitor.config import WebhookTarget
from monitor.core import Delivered, OutboxItem

log = logging.getLogger("monitor.alerts")


def permanent(status: int) -> bool:
    """A refusal that retrying will not change (408 and 429 ask for a retry)."""
    return 400 <= status < 500 and status not in (408, 429)


class Courier:
    def __init__(
        self,
        targets: list[WebhookTarget],
        outbox: Callable[[], tuple[OutboxItem, ...]],
        report: Callable[[Delivered], None],
        secret: Optional[str],
        service: str,
        host: str,
        timeout_s: float = 5.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        ledger_dir: Optional[Path] = None,
    ):
        self.targets, self.outbox, self.report = targets, outbox, report
        self.secret, self.service, self.host = secret, service, host
        self.timeout_s, self.backoff_s = timeout_s, backoff_s
        self.backoff_max_s, self.max_age_s = backoff_max_s, max_age_s
        self.clock = clock
        self.ledgers = [
            None if ledger_dir is None else Ledger(ledger_dir / f"monitor-delivered-{i}.log")
            for i in range(len(targets))
        ]
        # Drill hook (zimagectl chaos receiver-down): until this epoch time, deliveries go to a closed
        # local port, so the real failure path (refused, retried, delivered later) runs.
        self.blackhole_until = 0.0
        self.delivered = 0
        self.failed_attempts = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"courier-{i}", daemon=True)
            for i in range(len(targets))
        ]

    def start(self) -> "Courier":
        for thread in self._threads:
            thread.start()
        return self

    def nudge(self) -> None:
        """New alerts in the outbox: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def recorded(self) -> list[Delivered]:
        """What the couriers of a previous monitor finished but its loop may not have recorded: only
        entries naming an alert still in the outbox (same seq, incident and status) count, so a ledger
        older than the journal (a journal moved aside, seqs counted from 1 again) cannot hide a new alert."""
        pending = {(item.seq, _key(item)) for item in self.outbox()}
        return [
            Delivered(seq, target, "delivered", "from the ledger")
            for target, ledger in enumerate(self.ledgers)
            if ledger is not None
            for seq, key in ledger.read()
            if (seq, key) in pending
        ]

    def _finish(self, target: int, item: OutboxItem, outcome: str, detail: str, done: set[int]) -> None:
        ledger = self.ledgers[target]
        if ledger is not None:
            ledger.record(item.seq, _key(item))  # durable before anyone is told
        done.add(item.seq)
        self.report(Delivered(item.seq, target, outcome, detail))

    def _next(self, target: int, done: set[int]) -> Optional[OutboxItem]:
        for item in self.outbox():
            if target in item.targets and item.seq not in done:
                return item
        return None

    def _run(self, target_index: int) -> None:
        target = self.targets[target_index]
        done: set[int] = set()  # reported, not yet folded into the outbox by the loop
        attempt = 0
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                item = self._next(target_index, done)
                live = {i.seq for i in self.outbox()}
                done &= live
                if item is None:
                    ledger = self.ledgers[target_index]
                    if ledger is not None and not done:
                        ledger.clear()  # every finished alert is folded into the journal by now
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if self.clock() - item.queued_at > self.max_age_s:
                    expired = f"not delivered within {self.max_age_s:.0f} s"
                    self._finish(target_index, item, "expired", expired, done)
                    continue
                outcome, detail = self._deliver(client, target, item)
                if outcome is not None:
                    attempt = 0
                    self._finish(target_index, item, outcome, detail, done)
                    continue
                self.failed_attempts += 1
                delay = min(self.backoff_max_s, self.backoff_s * 2**attempt)
                attempt += 1
                log.warning(
                    "alert delivery failed; retrying",
                    extra={
                        "event": "alert_retry",
                        "target": _redact(target.url),
                        "incident_id": item.incident["id"],
                        "status": item.status,
                        "error": detail,
                        "retry_in_s": round(delay, 1),
                    },
                )
                self._stop.wait(delay)

    def _deliver(
        self, client: httpx.Client, target: WebhookTarget, item: OutboxItem
    ) -> tuple[Optional[str], str]:
        """(delivered|rejected, detail) when this alert is finished with; (None, error) to retry."""
        generic = generic_payload(item.incident, item.status, item.action, self.service, self.host)
        body = json.dumps(render(target, generic), default=str).encode()
        headers = {
            "content-type": "application/json",
            "user-agent": "zimage-serve-monitor",
            "x-zimage-incident": generic["incident_id"],
            "x-zimage-status": generic["status"],
        }
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(body, self.secret)
        url = "http://127.0.0.1:9/receiver-down" if self.clock() < self.blackhole_until else target.url
        try:
            response = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, exc.__class__.__name__
        if response.status_code < 300:
            self.delivered += 1
            return "delivered", ""
        if permanent(response.status_code):
            return "rejected", f"HTTP {response.status_code}"  # retrying will not change its mind
        return None, f"HTTP {response.status_code}"


def _key(item: OutboxItem) -> str:
    return f"{item.incident['id']}:{item.status}"


def _redact(url: str) -> str:
    """Webhook URLs often carry a secret in their path (Slack): log scheme and host only."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}{':' + str(parsed.port) if parsed.port else ''}/…"


class Ledger:
    """Seqs one courier has finished with, one a line, each fsync'd: read back at start, emptied when
    the journal holds them all. Only its courier thread writes it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, seq: int, key: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(f"{seq} {key}\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[tuple[int, str]]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:  # a line cut short by a crash is skipped
            seq, _, key = line.partition(" ")
            if seq.isdigit() and key:
                entries.append((int(seq), key))
        return entries

    def clear(self) -> None:
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "w") as fh:
                fh.flush()
                os.fsync(fh.fileno())
