"""The one poll-until-deadline loop: operator commands, tests, the bench and the monitor's waits
all go through it, so "how long, how often, what counts as done" reads the same everywhere."""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def poll_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    *,
    ignore: tuple[type[BaseException], ...] = (),
    progress: Optional[Callable[[], None]] = None,
    progress_every: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Optional[T]:
    """Call predicate() every `interval` seconds until it returns something truthy, which is
    returned, or until `timeout` has passed: None. An exception of a type in `ignore` (a probe that
    cannot connect yet) counts as "not yet"; any other propagates. `progress` is called every
    `progress_every` seconds while waiting; `sleep` lets a caller keep working between polls (the
    monitor handles its events there)."""
    deadline = clock() + timeout
    next_progress = clock()
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        now = clock()
        if now >= deadline:
            return None
        if progress and now >= next_progress:
            progress()
            next_progress = now + progress_every
        sleep(min(interval, max(0.0, deadline - now)))
