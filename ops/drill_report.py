"""The drill's rows and its report (docs/RELIABILITY.md): what each column means lives here, next
to the table it explains."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Row:
    fault: str
    expected: str
    detected: str = "no"
    detection_s: Optional[float] = None
    recovered_s: Optional[float] = None
    load: dict = field(default_factory=dict)
    alerts: str = "0/0"
    signed: bool = True
    false_restarts: int = 0
    notes: str = ""

    def cells(self) -> list[str]:
        def num(v):
            return "–" if v is None else f"{v:.1f}"

        ld = self.load
        return [
            self.fault,
            self.expected,
            self.detected,
            num(self.detection_s),
            num(self.recovered_s),
            str(ld.get("sent", 0)),
            str(ld.get("ok", 0)),
            str(ld.get("rejected", 0)),
            str(ld.get("refused", 0) + ld.get("reset", 0)),
            str(ld.get("lost", 0) + ld.get("unclear", 0) + ld.get("server_errors", 0)),
            self.alerts,
            str(self.false_restarts),
            self.notes,
        ]


HEADER = [
    "fault",
    "expected",
    "detected",
    "detect s",
    "ready+warm s",
    "sent",
    "ok",
    "rejected (clear)",
    "conn refused/reset",
    "lost",
    "alerts fired/resolved",
    "false restarts",
    "notes",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


REPLICAS_MARK = "\n## Two replicas behind HAProxy"


def write_report(rows: list[Row], seconds: float, path: Path, replicas: int = 1) -> None:
    """The single-app drill is the page; the replicas drill is its last section. Each run replaces
    its own part and keeps the other's."""
    old = path.read_text() if path.exists() else ""
    main, _, section = old.partition(REPLICAS_MARK)
    if replicas > 1:
        path.write_text(main.rstrip("\n") + "\n" + REPLICAS_MARK + _replicas_section(rows, seconds))
        return
    path.write_text(_single_page(rows, seconds) + (REPLICAS_MARK + section if section else ""))


def _replicas_section(rows: list[Row], seconds: float) -> str:
    return f"""

Last run: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {os.uname().nodename} (CPU, tiny demo \
model, 2 replicas), {seconds:.0f} s in all. Reproduce: `.venv/bin/zimagectl drill --replicas 2`.

The same faults, injected into replica 0 while 4 clients send requests through HAProxy (queue size
2 per replica). The promise: **no client-visible error** — "conn refused/reset" and "lost" are 0,
and the only refusals are 503 + Retry-After when both replicas' queues are full ("rejected").
Detection and recovery are replica 0's monitor's; replica 1 served throughout (the rolling rule
never takes down a replica while another is out). `tests/integration/test_replicas.py` asserts the
same for a kill, a hang, an OOM and a rolling restart, with HAProxy's view sampled every 100 ms.

What earlier runs found (each fixed in ops/balancer.py, which says why each line is there). The
first run, with queues of 2, had 4 resets and 5 empty or bodiless 503s in the crash row and 2
resets in the OOM row: a killed replica refuses connections at once, but the checks need up to a
second to see it and leastconn preferred it meanwhile, so all three retries went to it (`SCDN`);
and a request on a reused server connection that a restarting replica closed was not retried. Now
the first refused connection takes a replica out (`observe layer4 error-limit 1 on-error
mark-down`), every request gets a fresh server connection (`http-reuse never`), and HAProxy's own
502/503/504 carry a JSON reason and Retry-After. Later, under CPU contention, the replica tests
found two more: a request over HAProxy's 16 KiB buffer (any image-to-image request) was never
retried, and a killed replica's reset counts as a junk response to HAProxy 2.6, not an empty one;
both ended as a silently closed client connection. Now `tune.bufsize` holds any JSON body the app
accepts and `retry-on` includes `junk-response`. Last, CI once saw a head without its body: a
replica killed between writing an answer's head and its body. HAProxy had passed the head on and
could not retry. Now an answer leaves in one write or not at all (app/web/whole_answer.py), and the
"killed answering" row kills replica 0 at exactly that moment. Its first runs found one more: an
idle replica told to drain exited before HAProxy's checks had taken it out, so retries met its
closed port and a kept-alive client was closed on without an answer; now a replica in a pool stays
reachable, answering 503, for POOL_LEAVE_S (common/replicas.py) after its drain begins.

{table(rows)}
"""


def _single_page(rows: list[Row], seconds: float) -> str:
    return f"""# Reliability drill

Last run: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {os.uname().nodename} (CPU, tiny demo \
model), {seconds:.0f} s in all. Reproduce: `.venv/bin/zimagectl drill` (or `.venv/bin/python -m pytest \
-m drill`).

Each fault is injected into a real supervisord stack while 4 clients send generate requests back to
back (queue size 2, so some are refused with 503 + Retry-After by design). "conn refused/reset":
the app was down (restart window) or killed mid-request, and the client knew at once. "lost": no
answer within the client's deadline, a 500, or an error without a reason; it must be 0.
Alerts are counted at a real local webhook receiver; every one was checked against its
HMAC-SHA256 signature.

{table(rows)}

"broken engine" makes every generation raise, as CUDA graphs do after an OOM in a new shape's first
call (found on the H200, docs/PERFORMANCE.md): after one unexplained failure the engine makes its
warm-up image again, that fails too, so it calls itself unhealthy; the failed request and those
queued behind it get 503 + Retry-After, and the monitor's `engine_unhealthy` rule replaces it.

The last three rows are the monitor's own crash-safety: "receiver-down" keeps the webhook receiver
unreachable for 12 s through a hang (the alerts wait in the journal's outbox and arrive afterwards,
once each); "monitor killed mid-restart" SIGKILLs the monitor while its kill-restart of a hung app
is under way (the next monitor finds the action in its journal and finishes it: one incident, one
firing, one resolved; its ready+warm time holds the backoff after the restarts before it, while its
firing alert goes out when the hang is called, saying when the restart is allowed); "stale line"
appends an OOM line carrying an earlier process's pid (logged as history, no restart). A hang is
now called after the process has been stopped for `hang_stopped_s` (5 s), so a short pause is never
killed: hence its detection time.
`tests/integration/test_crash_safe.py` kills the monitor at every point of both kinds of restart,
keeps a receiver down for 120 s, and times a stall (those tests, not this table, are the proof).
"""
