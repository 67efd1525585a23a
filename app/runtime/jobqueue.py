"""The engine's waiting line: admission with a bound, FIFO within a priority, same-shape batches,
queue positions, and cancellation of a job that has not started (it leaves the line at once).

Jobs are kept in a heap keyed (priority, arrival); a cancelled job stays in the heap as a dead
entry and is skipped when it comes up (removing from the middle of a heap costs more than it
saves), but it no longer counts as waiting nor holds a position."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

from app import errors
from app.runtime.jobs import Job, resolve


class JobQueue:
    def __init__(self, queue_size: int, max_batch: int, retry_after: Callable[[int], int]):
        self.queue_size, self.max_batch, self.retry_after = queue_size, max_batch, retry_after
        self._heap: "queue.PriorityQueue[tuple[int, int, Optional[Job]]]" = queue.PriorityQueue()
        self._waiting: dict[int, Job] = {}  # seq → job, for positions and cancels
        self._running: list[Job] = []
        self.lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def put(self, job: Job) -> None:
        """Raises QueueFull beyond queue_size waiting jobs; a priority job (the monitor's check)
        skips the bound: it is one small request, and must not be starved by the traffic it protects."""
        with self.lock:
            busy = self._running or self._waiting
            if job.priority > 0 and len(self._waiting) >= self.queue_size and busy:
                raise errors.QueueFull(
                    f"the queue is full ({len(self._waiting)} waiting, {len(self._running)} running)",
                    hint="retry after the time in Retry-After",
                    retry_after_s=self.retry_after(len(self._waiting)),
                )
            self._waiting[job.seq] = job
        self._heap.put((job.priority, job.seq, job))

    def stop(self) -> None:
        self._heap.put((-1, -1, None))

    def next_batch(self) -> Optional[list[Job]]:
        """Blocks for the next live job; returns it with queued jobs of the same shape, up to
        max_batch images in all (None: stop)."""
        while True:
            _, _, first = self._heap.get()
            if first is None:
                return None
            with self.lock:
                if self._waiting.pop(first.seq, None) is None:
                    continue  # cancelled while it waited: already resolved
                batch, images = [first], first.params.num_images
                keep = []
                while self.max_batch > 1:
                    try:
                        item = self._heap.get_nowait()
                    except queue.Empty:
                        break
                    nxt = item[2]
                    if nxt is not None and nxt.seq not in self._waiting:
                        continue  # a dead entry
                    if (
                        nxt is not None
                        and nxt.params.batch_key() == first.params.batch_key()
                        and images + nxt.params.num_images <= self.max_batch
                    ):
                        batch.append(nxt)
                        images += nxt.params.num_images
                        del self._waiting[nxt.seq]
                    else:
                        keep.append(item)
                for item in keep:  # (priority, seq) keys keep their order
                    self._heap.put(item)
                self._running = batch
            return batch

    def done(self) -> None:
        with self.lock:
            self._running = []

    def position(self, job: Job) -> Optional[int]:
        """How many live jobs go before `job` (0: it is next); None once it left the line."""
        with self.lock:
            if job.seq not in self._waiting:
                return None
            key = (job.priority, job.seq)
            return sum(1 for j in self._waiting.values() if (j.priority, j.seq) < key)

    def forwards_ahead(self, job: Job) -> Optional[int]:
        """The denoising forwards still to run before `job` starts: every live job ahead of it, and
        what is left of the batch running now (its jobs step together); None once it left the line.
        Jobs ahead that will merge into one batch are counted apart: an ETA errs long, not short."""
        with self.lock:
            if job.seq not in self._waiting:
                return None
            key = (job.priority, job.seq)
            ahead = sum(j.params.forwards for j in self._waiting.values() if (j.priority, j.seq) < key)
            running = max((j.params.forwards - j.steps_done for j in self._running), default=0)
            return ahead + max(running, 0)

    def cancel(self, job: Job) -> str:
        """ "queued": it left the line now; "running": it stops at the next denoising step (or, in a
        batch with others, is dropped from the results); "finished": too late."""
        with self.lock:
            job.cancelled.set()
            job.abandoned.set()
            if self._waiting.pop(job.seq, None) is not None:
                resolve(job.future, errors.Cancelled("cancelled while queued"))
                return "queued"
            if job in self._running:
                return "running"
        return "finished"
