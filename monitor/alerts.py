"""Alert delivery from the journal's outbox: one courier thread per webhook target, each taking that
target's oldest undelivered alert, retrying it with capped exponential backoff until the receiver
takes it (then the next, in order) or it is older than alert_outbox_max_age_s. A receiver that
refuses a body for good (a 4xx other than 408/429) is not asked again for it.

The courier never changes the outbox itself: it tells the loop (`report`), which folds the outcome
into the state through core.step and persists it, so a delivery survives the monitor's restart
exactly like a decision. Delivery runs on its own threads: an unreachable receiver delays alerts,
never the healing."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Optional

import httpx

from monitor.alert_payloads import SIGNATURE_HEADER, generic_payload, render, sign
from monitor.config import WebhookTarget
from monitor.core import Delivered, OutboxItem

log = logging.getLogger("monitor.alerts")
PERMANENT = lambda status: 400 <= status < 500 and status not in (408, 429)  # noqa: E731


class Courier:
    def __init__(self, targets: list[WebhookTarget], outbox: Callable[[], tuple[OutboxItem, ...]],
                 report: Callable[[Delivered], None], secret: Optional[str], service: str, host: str,
                 timeout_s: float = 5.0, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                 max_age_s: float = 3600.0, clock: Callable[[], float] = time.time):
        self.targets, self.outbox, self.report = targets, outbox, report
        self.secret, self.service, self.host = secret, service, host
        self.timeout_s, self.backoff_s, self.backoff_max_s, self.max_age_s = timeout_s, backoff_s, backoff_max_s, max_age_s
        self.clock = clock
        # Drill hook (zimagectl chaos receiver-down): until this epoch time, deliveries go to a closed
        # local port, so the real failure path (refused, retried, delivered later) runs.
        self.blackhole_until = 0.0
        self.delivered = 0
        self.failed_attempts = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"courier-{i}", daemon=True)
                         for i in range(len(targets))]

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
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if self.clock() - item.queued_at > self.max_age_s:
                    done.add(item.seq)
                    self.report(Delivered(item.seq, target_index, "expired",
                                          f"not delivered within {self.max_age_s:.0f} s"))
                    continue
                outcome, detail = self._deliver(client, target, item)
                if outcome is not None:
                    done.add(item.seq)
                    attempt = 0
                    self.report(Delivered(item.seq, target_index, outcome, detail))
                    continue
                self.failed_attempts += 1
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** attempt)
                attempt += 1
                log.warning("alert delivery failed; retrying", extra={
                    "event": "alert_retry", "target": _redact(target.url), "incident_id": item.incident["id"],
                    "status": item.status, "error": detail, "retry_in_s": round(delay, 1)})
                self._stop.wait(delay)

    def _deliver(self, client: httpx.Client, target: WebhookTarget, item: OutboxItem) -> tuple[Optional[str], str]:
        """(delivered|rejected, detail) when this alert is finished with; (None, error) to retry."""
        generic = generic_payload(item.incident, item.status, item.action, self.service, self.host)
        body = json.dumps(render(target, generic), default=str).encode()
        headers = {"content-type": "application/json", "user-agent": "zimage-serve-monitor",
                   "x-zimage-incident": generic["incident_id"], "x-zimage-status": generic["status"]}
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
        if PERMANENT(response.status_code):
            return "rejected", f"HTTP {response.status_code}"  # retrying will not change its mind
        return None, f"HTTP {response.status_code}"


def _redact(url: str) -> str:
    """Webhook URLs often carry a secret in their path (Slack): log scheme and host only."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}{':' + str(parsed.port) if parsed.port else ''}/…"
