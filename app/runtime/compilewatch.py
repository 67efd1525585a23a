"""Knows when torch.compile is compiling, how often it did and for how long.

Why the engine needs this: a compile inside a request looks like a stuck generation (no denoising
step for tens of seconds with an empty cache), and a compiled first step is not a step time. The
engine uses it to keep compile time out of the step statistics the monitor's stall bound is built
from (a 40 s compiled warm-up step used to make the bound 400 s), to tell the monitor through the
heartbeat that a compile is under way, and to warn when a request had to compile at all (the
warm-up is meant to leave nothing to compile; docs/PERFORMANCE.md).

Dynamo's compilation callbacks are process-wide; one watch serves the process.
"""

from __future__ import annotations

import threading
import time
from typing import Optional


class CompileWatch:
    def __init__(self, clock=time.time):
        self.clock = clock
        self.count = 0  # finished compilations (one per dynamo frame compile, nested work included)
        self.seconds = 0.0
        self.active_since: Optional[float] = None  # wall-clock start of the compile under way, if any
        self._lock = threading.Lock()

    def on_start(self, _args=None) -> None:
        self.active_since = self.clock()

    def on_end(self, _args=None) -> None:
        with self._lock:
            if self.active_since is not None:
                self.seconds += max(0.0, self.clock() - self.active_since)
            self.count += 1
            self.active_since = None

    def mark(self) -> tuple[int, float]:
        """(count, seconds) now: give it to since() later to see what compiled in between."""
        with self._lock:
            return self.count, self.seconds

    def since(self, mark: tuple[int, float]) -> tuple[int, float]:
        """Compilations and their seconds since `mark`."""
        count, seconds = self.mark()
        return count - mark[0], seconds - mark[1]


_WATCH: Optional[CompileWatch] = None
_INSTALL_LOCK = threading.Lock()


def compile_watch() -> Optional[CompileWatch]:
    """The process's watch, registered with dynamo on first use; None where this torch has no
    compilation callbacks (then nothing is excluded or reported, and serving is unchanged)."""
    global _WATCH
    with _INSTALL_LOCK:
        if _WATCH is None:
            try:
                from torch._dynamo.callback import callback_handler
            except ImportError:
                return None
            watch = CompileWatch()
            callback_handler.register_start_callback(watch.on_start)
            callback_handler.register_end_callback(watch.on_end)
            _WATCH = watch
        return _WATCH
