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

FAULT_KINDS = ("oom", "slow", "leak", "cuda_fatal", "broken", "clear")


@dataclass
class FaultInjector:
    enabled: bool = False
    oom_pending: int = 0
    fatal_pending: int = 0
    broken_pending: int = 0  # generations that raise an error that is neither OOM nor CUDA's
    step_delay_s: float = 0.0
    leaked: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, kind: str, count: int = 1, seconds: float = 0.0, megabytes: int = 0) -> dict:
        if not self.enabled:
            raise PermissionError("fault injection is disabled (set fault_injection = true)")
        with self._lock:
            if kind == "oom":
                self.oom_pending += count
            elif kind == "cuda_fatal":
                self.fatal_pending += count
            elif kind == "broken":
                self.broken_pending += count
            elif kind == "slow":
                self.step_delay_s = seconds
            elif kind == "leak":
                # Non-zero fill: every page is written, so the memory is resident (RSS), not just
                # reserved. 32 MiB at a time with a GIL release between: one multi-GB fill would
                # starve the event loop for seconds, and the monitor would rightly call that a hang.
                for _ in range(0, megabytes, 32):
                    self.leaked.append(bytearray(b"\x01") * (32 * 2**20))
                    time.sleep(0.001)
            elif kind == "clear":
                self.oom_pending = self.fatal_pending = self.broken_pending = 0
                self.step_delay_s = 0.0
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
            },
        )
        return self.state()

    def state(self) -> dict:
        return {
            "enabled": self.enabled,
            "oom_pending": self.oom_pending,
            "fatal_pending": self.fatal_pending,
            "broken_pending": self.broken_pending,
            "step_delay_s": self.step_delay_s,
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

    def on_step(self) -> None:
        if self.enabled and self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
