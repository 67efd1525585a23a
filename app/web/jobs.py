"""Jobs people can follow: POST a generation, get its id at once, then watch it (state, queue
position, step i/n, ETA, events), cancel it, and fetch its result. The same service, queue and
limits as the synchronous POST /api/generate; a job is that request run in the background."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from app import errors
from app.web.service import GenerationService, new_request_id

TERMINAL = ("done", "failed", "cancelled")
KEEPALIVE_S = 10.0
POLL_S = 0.25  # queue positions are polled; steps and the end wake the stream at once


@dataclass
class JobRecord:
    id: str
    req: Any
    created_at: float = field(default_factory=time.time)
    job: Any = None  # the engine's Job
    seed: int = 0
    task: Optional[asyncio.Task] = None
    steps: list = field(default_factory=list)  # steps_done after each step, appended by the engine
    response: Any = None  # GenerateResponse
    error: Optional[errors.ServiceError] = None
    finished_at: Optional[float] = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a step or the end: wake the stream

    @property
    def state(self) -> str:
        if self.response is not None:
            return "done"
        if self.error is not None:
            return "cancelled" if isinstance(self.error, errors.Cancelled) else "failed"
        return "running" if self.job.started_at is not None else "queued"


class JobBook:
    def __init__(self, service: GenerationService, keep: int, replica: Optional[int] = None):
        self.service, self.keep = service, keep
        # In a pool, the id names the replica that holds the job: HAProxy routes /api/jobs/r<i>-…
        # to it (ops/balancer.py), so following a job works without a cookie.
        self.id_prefix = "" if replica is None else f"r{replica}-"
        self.records: "OrderedDict[str, JobRecord]" = OrderedDict()

    async def start(self, req, url_prefix: str = "/outputs/") -> JobRecord:
        """Queue `req`; raises what the synchronous route would (QueueFull → 503, Draining, ...)."""
        # Results as URLs: a remembered job must not hold megabytes of base64 for a thousand jobs.
        req = req.model_copy(update={"response_format": "url"})
        inputs = await self.service.decode_inputs_off_loop(req)
        record = JobRecord(id=self.id_prefix + new_request_id(), req=req)
        loop = asyncio.get_running_loop()

        def on_step(step: int) -> None:  # (the engine's thread)
            record.steps.append(step)
            loop.call_soon_threadsafe(record.changed.set)

        record.job, record.seed = self.service.submit(req, record.id, on_step=on_step, inputs=inputs)
        self.records[record.id] = record
        while len(self.records) > self.keep:
            oldest = next(iter(self.records.values()))
            if oldest.state not in TERMINAL:
                break  # a live job is never forgotten
            self.records.popitem(last=False)
        record.task = asyncio.create_task(self._run(record, url_prefix))
        return record

    async def _run(self, record: JobRecord, url_prefix: str) -> None:
        try:

            async def submitted():  # (start queued it already)
                return record.job, record.seed

            record.response = await self.service.complete(record.req, record.id, url_prefix, submitted)
        except errors.ServiceError as exc:
            record.error = exc
        except Exception as exc:  # never a task dying silently: the job says it failed
            record.error = errors.GenerationFailed(f"generation failed: {exc.__class__.__name__}")
        finally:
            record.finished_at = time.time()
            record.changed.set()

    def get(self, job_id: str) -> Optional[JobRecord]:
        return self.records.get(job_id)

    def cancel(self, record: JobRecord) -> str:
        if record.state in TERMINAL:
            return "finished"
        return self.service.engine.cancel(record.job)

    def protected_files(self) -> set[str]:
        """The images of jobs still remembered: their results may still be fetched."""
        return {
            image.filename
            for r in self.records.values()
            if r.response is not None
            for image in r.response.images
        }

    def counts(self) -> dict:
        states = [r.state for r in self.records.values()]
        return {"queued": states.count("queued"), "running": states.count("running")}

    def view(self, record: JobRecord) -> dict:
        state = record.state
        req = record.req
        total = record.job.params.forwards
        done = record.steps[-1] if record.steps else 0
        now = time.time()
        body: dict = {
            "job_id": record.id,
            "state": state,
            "queue_position": self.service.engine.position(record.job) if state == "queued" else None,
            "step": min(done, total),
            "steps": total,
            "images": req.num_images,
            "elapsed_s": round((record.finished_at or now) - record.created_at, 3),
            "eta_s": None if state in TERMINAL else self._eta(record, state, done, total),
            "seed": record.seed,
        }
        if record.response is not None:
            body["result"] = record.response.model_dump(exclude_none=True)
        if record.error is not None:
            body["error"] = {
                "error": record.error.code,
                "message": record.error.message,
                "hint": record.error.hint,
            }
        return body

    def _eta(self, record: JobRecord, state: str, done: int, total: int) -> Optional[float]:
        """From the measured step time: the steps left of this job, and for a queued one the steps
        of the jobs ahead of it and what is left of the running batch."""
        step_s = self.service.engine.status().heartbeat.get("step_seconds_ewma")
        if not step_s:
            return None
        left = total - done
        if state == "queued":
            left += self.service.engine.forwards_ahead(record.job) or 0
        return round(left * step_s, 2)

    async def events(self, record: JobRecord) -> AsyncIterator[str]:
        """Server-sent events: queued (with its position), position, running, step (every one, in
        order), then done, failed or cancelled; a comment line every KEEPALIVE_S keeps proxies open."""
        sent_steps, last_position, last_state = 0, None, None
        last_write = time.monotonic()
        while True:
            record.changed.clear()  # before reading: a step that lands meanwhile sets it again
            view = self.view(record)
            out = []
            if view["state"] != last_state and view["state"] in ("queued", "running"):
                out.append(_sse(view["state"], view))
                last_state = view["state"]
            if view["state"] == "queued" and view["queue_position"] != last_position:
                last_position = view["queue_position"]
                out.append(_sse("position", {"job_id": record.id, "queue_position": last_position}))
            steps = list(record.steps)
            for step in steps[sent_steps:]:
                out.append(_sse("step", {"job_id": record.id, "step": step, "steps": view["steps"]}))
            sent_steps = len(steps)
            if view["state"] in TERMINAL:
                out.append(_sse(view["state"], view))
            for chunk in out:
                yield chunk
            if out:
                last_write = time.monotonic()
            if view["state"] in TERMINAL:
                return
            if time.monotonic() - last_write > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_write = time.monotonic()
            try:
                await asyncio.wait_for(record.changed.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"
