"""Webhook delivery on background threads: bounded queue, timeout per POST, bounded retries with
backoff. Enqueueing never blocks: an unreachable receiver can delay alerts, never the healing."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import httpx

from monitor.alert_payloads import SIGNATURE_HEADER, generic_payload, render, sign
from monitor.config import WebhookTarget

log = logging.getLogger("monitor.alerts")


@dataclass
class AlertCounters:
    queued: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


class AlertDispatcher:
    def __init__(self, targets: list[WebhookTarget], secret: Optional[str], service: str, host: str,
                 timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 1.0, queue_size: int = 1000,
                 on_result: Optional[Callable[[str, str], None]] = None):
        self.targets = targets
        self.secret = secret
        self.service, self.host = service, host
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.on_result = on_result  # (target url, "delivered"|"failed"|"dropped") → metrics
        self.counters = AlertCounters()
        # Drill hook (zimagectl chaos receiver-down): until this epoch time, deliveries go to a closed
        # local port, so the real failure path (refused, retries, counted failure) runs.
        self.blackhole_until = 0.0
        self._queues = [queue.Queue(maxsize=queue_size) for _ in targets]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(t, q), name=f"alerts-{i}", daemon=True)
                         for i, (t, q) in enumerate(zip(targets, self._queues))]
        for thread in self._threads:
            thread.start()

    def send(self, incident: dict, status: str, action: Optional[str] = None) -> None:
        """Queue one alert for every target; drop (and count) when a target's queue is full."""
        generic = generic_payload(incident, status, action, self.service, self.host)
        log.warning("alert %s: %s", status, incident["reason"],
                    extra={"event": "alert", "status": status, "incident_id": incident["id"],
                           "kind": incident["kind"], "severity": incident["severity"], "action": action})
        for target, q in zip(self.targets, self._queues):
            try:
                q.put_nowait(generic)
                self.counters.queued += 1
            except queue.Full:
                self.counters.dropped += 1
                self._report(target.url, "dropped")

    def _worker(self, target: WebhookTarget, q: "queue.Queue[dict]") -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                try:
                    generic = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._deliver(client, target, generic)
                self.counters.queued -= 1

    def _deliver(self, client: httpx.Client, target: WebhookTarget, generic: dict) -> None:
        body = json.dumps(render(target.format, generic), default=str).encode()
        headers = {"content-type": "application/json", "user-agent": "zimage-serve-monitor",
                   "x-zimage-incident": generic["incident_id"], "x-zimage-status": generic["status"]}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(body, self.secret)
        for attempt in range(self.retries + 1):
            url = "http://127.0.0.1:9/receiver-down" if time.time() < self.blackhole_until else target.url
            try:
                response = client.post(url, content=body, headers=headers)
                if response.status_code < 300:
                    self.counters.delivered += 1
                    self._report(target.url, "delivered")
                    return
                error = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    break  # the receiver rejects this body; retrying will not change its mind
            except httpx.HTTPError as exc:
                error = exc.__class__.__name__
            if attempt < self.retries and not self._stop.is_set():
                time.sleep(self.backoff_s * 2 ** attempt)
        self.counters.failed += 1
        self._report(target.url, "failed")
        log.error("alert delivery failed", extra={"event": "alert_failed", "target": _redact(target.url),
                                                  "incident_id": generic["incident_id"], "error": error})

    def _report(self, url: str, outcome: str) -> None:
        if self.on_result:
            self.on_result(_redact(url), outcome)

    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues)

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.counters.queued > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.counters.queued <= 0

    def stop(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        self._stop.set()


def _redact(url: str) -> str:
    """Webhook URLs often carry a secret in their path (Slack): log scheme and host only."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}{':' + str(parsed.port) if parsed.port else ''}/…"
