"""The engine's self-check: after generations fail for no reason of their own, can it still make the
image it made at start?

A fatal CUDA error says by itself that the process is lost (failures.is_fatal); other breakage does
not. A compiled or CUDA-graph state left half made by an exception, a weight spoiled by a merge, a
library in a bad state: every request then fails with a 500 while /healthz and /readyz say ready,
so the balancer keeps sending work there and the monitor sees nothing to heal. A request can also
fail on its own (an input no check foresaw), and a restart would not help that. The engine tells
the two apart by asking a question whose answer it knows, the warm-up's first image: if that fails
too, the engine is broken, says so (state unhealthy, /healthz 503), and the monitor replaces the
process (monitor/detectors.detect_engine_unhealthy). If it passes, the failures were the requests'.

The check runs before the failed request is answered, so a broken engine never answers 500: its
requests get 503 + Retry-After, which HAProxy retries on another replica. `FailureStreak` is the
decision, free of the engine so it is tested alone; `judge` is the I/O.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from app import errors
from app.config import CUDA_GRAPH_MODES
from app.runtime.jobs import Job
from app.runtime.warmup import first_image_params

if TYPE_CHECKING:
    from app.config import AppSettings
    from app.runtime.engine import Engine

log = logging.getLogger(__name__)

# What a batch came to (Engine.generate_batch's answer). Only "failed" is unexplained: an OOM, a
# refused request and a cancel have reasons of their own, and a fatal error already marks the engine.
OK, FAILED, OOM, OTHER = "ok", "failed", "oom", "other"


@dataclass
class FailureStreak:
    """Batches that failed in a row with an unexplained error. threshold 0: never self-check."""

    threshold: int
    oom_counts: bool = False  # an OOM is a failure too (under CUDA graphs: see streak_for)
    in_a_row: int = 0
    checks: dict = field(default_factory=lambda: {"passed": 0, "failed": 0})  # since start (metrics)

    def record(self, outcome: str) -> bool:
        """Count one batch's outcome; True when it makes a self-check due. A success ends the streak;
        other outcomes neither add to it nor end it (a cancel proves nothing either way)."""
        if outcome == OK:
            self.in_a_row = 0
        elif outcome == FAILED or (outcome == OOM and self.oom_counts):
            self.in_a_row += 1
            return self.threshold > 0 and self.in_a_row >= self.threshold
        return False


def streak_for(settings: "AppSettings") -> FailureStreak:
    """Under CUDA graphs (compile_mode "reduce-overhead" or "max-autotune") one failure is enough, an
    OOM included: an exception in a new shape's first call can leave torch's CUDA-graph trees half
    recorded, and then every later generation fails (on an H200, after an OOM there, each one raised
    an AssertionError at once; ops/lab/graph_fault_check.py). Checking at once makes the engine
    unhealthy before a second request meets the broken trees."""
    if settings.self_check_after_failures and settings.compile_mode in CUDA_GRAPH_MODES:
        return FailureStreak(threshold=1, oom_counts=True)
    return FailureStreak(settings.self_check_after_failures)


def judge(engine: "Engine", outcome: str) -> Optional[errors.ServiceError]:
    """On the engine's thread, as a served batch ends and before its requests are answered: count its
    outcome and, when the streak says so, run the self-check. Returns what an unexplained failure's
    requests are told instead of their own 500 when the check failed: the engine is broken, so the
    answer is a 503 that a balancer retries on another replica, never a 500 from a broken engine."""
    streak = engine.failure_streak
    if not streak.record(outcome):
        return None
    failed = streak.in_a_row
    started = time.perf_counter()
    job = Job(params=first_image_params(engine.settings, engine.loaded.device.type), request_id="self-check")
    check_outcome = engine.generate_batch([job])
    seconds = round(time.perf_counter() - started, 2)
    error: Optional[BaseException] = job.future.exception(timeout=0)
    passed = check_outcome == OK and error is None
    streak.checks["passed" if passed else "failed"] += 1
    if passed:
        streak.in_a_row = 0  # a passed check answers for the failures so far; the next ones count anew
        log.warning(
            "generations failed but the self-check passed: the failures were the requests' own",
            extra={"event": "self_check_passed", "failed_in_a_row": failed, "seconds": seconds},
        )
        return None
    if engine.state != "unhealthy":  # (a fatal error in the check has said so already, with its reason)
        why = error.message if isinstance(error, errors.ServiceError) else repr(error)
        engine.state = "unhealthy"
        engine.state_reason = (
            f"{failed} generation(s) failed in a row and the self-check (the warm-up image) failed too: {why}"
        )[:200]
        log.critical(
            "self-check failed: the engine cannot make its warm-up image; unhealthy, the process must "
            "be replaced",
            extra={"event": "self_check_failed", "failed_in_a_row": failed, "seconds": seconds, "error": why},
        )
    if outcome != FAILED:  # an OOM keeps its own answer (507, or 503 in a pool) and its hint
        return None
    return engine.unhealthy_error()
