"""The monitor's own watchdog: who heals the healer when it wedges?

supervisord restarts a monitor that exits, not one that hangs: an NVML call into a wedged driver, a
read of /proc of a process stuck in the kernel, an fsync on a hung disk. Then nothing heals the app
and nothing says so. Nor one whose every turn raises (a bug on a sample it never met, a state it
cannot step from): it turns on, logging "tick failed", and heals nothing.

A daemon thread checks that the loop makes progress (`beat()`: each turn of the loop, and each poll
of an action's waits; a turn that raised tells `failing(error)` instead). Silent past loop_stall_s,
it writes every thread's stack to the log (where it hung), leaves a marker for the next monitor
(which pages `monitor_stalled`, with where it hung or what it raised) and exits with EXIT_STALLED:
supervisord starts a new monitor, which rolls any action in progress forward from the journal.

The stall path touches no lock of the stuck thread: no `logging` (the stuck thread may hold its
handler's lock), only raw writes to stderr and the marker, with a timer that ends the process even
if those writes block too."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from common.jsonfile import write_atomic

EXIT_STALLED = 70  # EX_SOFTWARE; supervisord's log says "exit status 70; not expected"
MARKER_NAME = "monitor-stalled.json"


def where_stuck(thread_id: Optional[int], frames: int = 3) -> str:
    """The innermost frames of a thread, as "file:line in function" (the alert's one-line where)."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    if frame is None:
        return "unknown"
    stack = traceback.extract_stack(frame)[-frames:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(stack))


class LoopWatchdog:
    def __init__(
        self,
        bound_s: float,
        marker: Path,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_stall: Optional[Callable[[float], None]] = None,
        check_every_s: float = 1.0,
    ):
        self.bound_s = bound_s
        self.marker = marker
        self.clock, self.wall = clock, wall
        self.on_stall = on_stall or self._exit_stalled
        self.check_every_s = check_every_s
        self.watched = threading.get_ident()  # the thread that beats: the one to show when it stops
        self._last = clock()
        self._error: Optional[str] = None  # what the loop's turns raise since its last progress
        self._stop = threading.Event()

    def beat(self) -> None:
        self._last = self.clock()
        self._error = None

    def failing(self, error: str) -> None:
        """A turn of the loop raised `error`: no beat, and the stall (if it comes) is told as this."""
        self._error = error

    def silent_for(self) -> float:
        return self.clock() - self._last

    def check(self) -> bool:
        """True (and on_stall called) once the loop has been silent longer than the bound."""
        silent = self.silent_for()
        if silent <= self.bound_s:
            return False
        self.on_stall(silent)
        return True

    def start(self) -> "LoopWatchdog":
        def run() -> None:
            while not self._stop.wait(self.check_every_s):
                if self.check():
                    return

        threading.Thread(target=run, name="loop-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _exit_stalled(self, silent: float) -> None:
        # Exit even if a write below blocks (the disk the process hangs on may be the log's).
        threading.Timer(10.0, os._exit, (EXIT_STALLED,)).start()
        error = self._error
        record = {
            "at": self.wall(),
            "silent_s": round(silent, 1),
            "bound_s": self.bound_s,
            "pid": os.getpid(),
            "where": where_stuck(self.watched) if error is None else "every turn of its loop failing",
        }
        if error is not None:
            record["error"] = error
        line = {"level": "critical", "service": "monitor", "event": "monitor_stalled", **record}
        os.write(
            2, (json.dumps({"msg": "monitor loop stalled: exiting for a new one", **line}) + "\n").encode()
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            write_atomic(self.marker, record)
        except OSError:
            pass
        os._exit(EXIT_STALLED)
