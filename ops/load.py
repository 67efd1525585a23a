"""A bounded load generator over real HTTP: N worker threads, each sending generate requests back to
back until stopped or out of requests. Every request ends in exactly one bucket, so nothing is lost
without being counted."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

SMALL_BODY = {"prompt": "load test: a red fox in snow", "width": 128, "height": 128, "num_inference_steps": 2}


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    rejected: int = 0  # a clear HTTP answer: 503 + Retry-After, 504, 507, ... with a JSON reason
    refused: int = 0  # connection refused: the app is down (restart window); the client knows at once
    reset: int = 0  # connection dropped mid-request (the process was killed)
    lost: int = 0  # no answer at all within the client deadline
    server_errors: int = 0  # HTTP 500: a bug
    unclear: int = 0  # an error status without a JSON reason, or a 503 without Retry-After
    statuses: dict = field(default_factory=dict)
    latencies: list = field(default_factory=list)
    # what the first few refused/reset/lost requests raised, with the wall time: to match against
    # HAProxy's log (termination state) and the apps' logs
    failures: list = field(default_factory=list)

    def percentile(self, q: float) -> Optional[float]:
        if not self.latencies:
            return None
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(round(q / 100 * (len(data) - 1))))]

    def summary(self) -> dict:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "rejected": self.rejected,
            "refused": self.refused,
            "reset": self.reset,
            "lost": self.lost,
            "server_errors": self.server_errors,
            "unclear": self.unclear,
            "statuses": dict(sorted(self.statuses.items())),
            "p50_s": self.percentile(50),
            "p95_s": self.percentile(95),
            "p99_s": self.percentile(99),
            "mean_s": statistics.fmean(self.latencies) if self.latencies else None,
            "failures": list(self.failures),
        }


class LoadGenerator:
    def __init__(
        self,
        url: str,
        concurrency: int = 4,
        body: Optional[dict] = None,
        deadline_s: float = 60.0,
        max_requests: int = 100_000,
        headers: Optional[dict] = None,
        pause_s: float = 0.0,
    ):
        self.url = url.rstrip("/") + "/api/generate"
        self.concurrency = concurrency
        self.body = body or SMALL_BODY
        self.deadline_s = deadline_s
        self.max_requests = max_requests
        self.headers = headers or {}
        self.pause_s = pause_s
        self.stats = LoadStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]

    def start(self) -> "LoadGenerator":
        for t in self._threads:
            t.start()
        return self

    def stop(self, join_timeout: Optional[float] = None) -> LoadStats:
        """Stop sending; wait for the requests in flight (each is bounded by deadline_s)."""
        self._stop.set()
        for t in self._threads:
            t.join(join_timeout if join_timeout is not None else self.deadline_s + 5)
        return self.stats

    def run_for(self, seconds: float) -> LoadStats:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self.stats.sent >= self.max_requests:
                return False
            self.stats.sent += 1
            return True

    def _worker(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(self.deadline_s, connect=5.0)) as client:
            while self._take():
                outcome, status, seconds, error = self._one(client)
                with self._lock:
                    if error is not None and len(self.stats.failures) < 10:
                        self.stats.failures.append(f"{time.strftime('%H:%M:%S')} {outcome}: {error!r}")
                    setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
                    if status is not None:
                        self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
                    if outcome == "ok":
                        self.stats.latencies.append(seconds)
                if outcome in ("refused", "reset"):
                    time.sleep(max(self.pause_s, 0.25))  # the app is restarting: do not spin on it
                elif outcome == "rejected" or self.pause_s:
                    time.sleep(max(self.pause_s, 0.05))  # a server that says "busy" gets a breath

    def _one(self, client: httpx.Client) -> tuple[str, Optional[int], float, Optional[Exception]]:
        started = time.perf_counter()
        try:
            r = client.post(self.url, json=self.body, headers=self.headers)
        except httpx.ConnectError as exc:
            return "refused", None, time.perf_counter() - started, exc
        except httpx.TimeoutException as exc:
            outcome = "refused" if isinstance(exc, httpx.ConnectTimeout) else "lost"
            return outcome, None, time.perf_counter() - started, exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            return "reset", None, time.perf_counter() - started, exc
        seconds = time.perf_counter() - started
        if r.status_code == 200:
            return "ok", 200, seconds, None
        if r.status_code >= 500 and r.status_code not in (503, 504, 507):
            return "server_errors", r.status_code, seconds, None
        try:
            clear = bool(r.json().get("message"))
        except ValueError:
            clear = False
        if r.status_code == 503 and "retry-after" not in r.headers:
            clear = False
        return ("rejected" if clear else "unclear"), r.status_code, seconds, None
