"""Fault hooks for drills: they exist only when `fault_injection = true` and are driven through the
admin-token-protected /admin/fault endpoint. Each fault takes the same code path as the real thing
(an injected OOM is a torch.OutOfMemoryError raised where the pipeline would raise it)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger("app.runtime.faults")

FAULT_KINDS = ("oom", "slow", "leak", "cuda_fatal", "broken", "die_answering", "clear")


@dataclass
class FaultInjector:
    enabled: bool = False
    oom_pending: int = 0
    fatal_pending: int = 0
    broken_pending: int = 0  # generations that raise an error that is neither OOM nor CUDA's
    die_answering_pending: int = 0  # answers the app dies giving (app.web.whole_answer.DieAnswering)
    # ...from this monotonic time on: a moment after the admin's own answer has left. Killed in the
    # turn of the event loop that wrote it, that answer would go too (the server sends what a turn
    # wrote at its end), and the admin would see its fault call fail.
    die_answering_from: float = 0.0
    step_delay_s: float = 0.0
    # Another rank's step delay (a context-parallel group): that rank sleeps in its own step, running
    # (not stopped), while rank 0 waits for it in a collective: the hang a stuck GPU kernel or a
    # wedged NCCL call makes, which only the stalled heartbeat shows. Travels with each RankWork.
    rank_step_delays: dict = field(default_factory=dict)
    leaked: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(
        self, kind: str, count: int = 1, seconds: float = 0.0, megabytes: int = 0, rank: int = 0
    ) -> dict:
        if not self.enabled:
            raise PermissionError("fault injection is disabled (set fault_injection = true)")
        if rank and kind != "slow":
            raise ValueError(f"only 'slow' reaches another rank; {kind!r} acts on rank 0 (the app)")
        # A leak is filled before the lock is taken: the fill takes seconds, and the event loop takes
        # the lock for every answer (take_die_answering). Filled under it, the loop waited out the
        # whole fill, missed three liveness probes, and the drill's leak became a kill for a hang.
        blocks = _fill(megabytes) if kind == "leak" else []
        with self._lock:
            if rank:
                if seconds > 0:
                    self.rank_step_delays[rank] = seconds
                else:
                    self.rank_step_delays.pop(rank, None)
            elif kind == "oom":
                self.oom_pending += count
            elif kind == "cuda_fatal":
                self.fatal_pending += count
            elif kind == "broken":
                self.broken_pending += count
            elif kind == "die_answering":
                self.die_answering_pending += count
                self.die_answering_from = time.monotonic() + 0.2
            elif kind == "slow":
                self.step_delay_s = seconds
            elif kind == "leak":
                self.leaked.extend(blocks)
            elif kind == "clear":
                self.oom_pending = self.fatal_pending = self.broken_pending = 0
                self.die_answering_pending = 0
                self.step_delay_s = 0.0
                self.rank_step_delays.clear()
                self.leaked.clear()
            else:
                raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULT_KINDS)}")
        log.warning(
            "fault injected",
            extra={
                "event": "fault_injected",
                "fault": kind,
                "count": count,
                "seconds": seconds,
                "megabytes": megabytes,
                "rank": rank,
            },
        )
        return self.state()

    def state(self) -> dict:
        return {
            "enabled": self.enabled,
            "oom_pending": self.oom_pending,
            "fatal_pending": self.fatal_pending,
            "broken_pending": self.broken_pending,
            "die_answering_pending": self.die_answering_pending,
            "step_delay_s": self.step_delay_s,
            "rank_step_delays": {str(r): s for r, s in sorted(self.rank_step_delays.items())},
            "leaked_mb": sum(len(b) for b in self.leaked) // 2**20,
        }

    def before_generation(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.oom_pending > 0:
                self.oom_pending -= 1
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (injected fault: zimagectl chaos oom)"
                )
            if self.fatal_pending > 0:
                self.fatal_pending -= 1
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected fault)")
            if self.broken_pending > 0:
                self.broken_pending -= 1
                raise RuntimeError("the pipeline raised (injected fault: zimagectl chaos broken)")

    def take_die_answering(self) -> bool:
        """Whether the answer being given now is one the app dies giving (counts it down)."""
        if not self.enabled or self.die_answering_pending <= 0:
            return False  # the common case, on every answer: without the lock
        with self._lock:
            if self.die_answering_pending > 0 and time.monotonic() >= self.die_answering_from:
                self.die_answering_pending -= 1
                return True
            return False

    def shared_step_delays(self) -> tuple:
        """(rank, seconds) pairs for the other ranks, sent with the next batch's RankWork."""
        if not self.enabled:
            return ()
        with self._lock:
            return tuple(sorted(self.rank_step_delays.items()))

    def on_step(self) -> None:
        if self.enabled and self.step_delay_s > 0:
            time.sleep(self.step_delay_s)


def _fill(megabytes: int) -> list:
    """Resident memory: a non-zero fill writes every page, so it counts in RSS, not just reserved.
    32 MiB at a time with a GIL release between: one multi-GB fill would starve the event loop for
    seconds, and the monitor would rightly call that a hang."""
    blocks = []
    for _ in range(0, megabytes, 32):
        blocks.append(bytearray(b"\x01") * (32 * 2**20))
        time.sleep(0.001)
    return blocks
