"""The jobs, history and retention routes (under the same token as the rest of the API):

POST   /api/jobs              202 {job_id, queue_position, state}      (503 + Retry-After when full)
GET    /api/jobs/{id}         state, queue position, step i/n, elapsed, ETA, result or error
GET    /api/jobs/{id}/events  Server-Sent Events until the job ends
DELETE /api/jobs/{id}         cancel: queued → leaves the line now; running → stops at the next step
GET    /api/history           newest first: ?limit=1..100&before=<created_at>
"""

import asyncio
import logging
import time
from typing import Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.web.history import History
from app.web.jobs import JobBook
from app.web.retention import enforce_outputs

log = logging.getLogger(__name__)


def accepted(book: JobBook, record) -> JSONResponse:
    """202 for a queued job (POST /api/jobs and its multipart twin): where to follow it."""
    view = book.view(record)
    return JSONResponse(
        {"job_id": record.id, "state": view["state"], "queue_position": view["queue_position"]},
        status_code=202,
        headers={"Location": f"/api/jobs/{record.id}"},
    )


def add_job_routes(app: FastAPI, book: JobBook, history: History, request_model) -> None:
    def record_or_404(job_id: str):
        record = book.get(job_id)
        if record is None:
            raise StarletteHTTPException(404, "no such job (finished jobs are kept for a while, not forever)")
        return record

    @app.post("/api/jobs", status_code=202, tags=["jobs"])
    async def create_job(body: request_model):  # type: ignore[valid-type]
        """Queue a generation and return at once; follow it with GET /api/jobs/{id}[/events]."""
        return accepted(book, await book.start(body))

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str):
        return book.view(record_or_404(job_id))

    @app.get("/api/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str):
        record = record_or_404(job_id)
        return StreamingResponse(
            book.events(record),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.delete("/api/jobs/{job_id}", tags=["jobs"])
    async def cancel_job(job_id: str):
        record = record_or_404(job_id)
        where = book.cancel(record)
        if where != "finished" and record.task is not None:
            # A queued job is resolved at once, a running one at the next denoising step: answer
            # once its task has recorded that (the engine is free then).
            await asyncio.wait({record.task}, timeout=30)
        return {"job_id": record.id, "was": where, **book.view(record)}

    @app.get("/api/history", tags=["jobs"])
    async def get_history(
        request: Request,
        limit: int = Query(20, ge=1, le=100),
        before: Optional[float] = Query(None),
    ):
        rows = await run_in_threadpool(history.page, limit, before)
        for row in rows:
            row["image_urls"] = [f"/outputs/{name}" for name in row["images"]]
        return {"items": rows, "next_before": rows[-1]["created_at"] if len(rows) == limit else None}


class Retention:
    """outputs_max_gb / outputs_max_age_days, enforced at start and every retention_interval_s."""

    def __init__(self, settings, service, book: JobBook, history: History, metrics):
        self.settings, self.service, self.book, self.history, self.metrics = (
            settings,
            service,
            book,
            history,
            metrics,
        )

    def run_once(self) -> int:
        s = self.settings
        max_bytes = None if s.outputs_max_gb is None else s.outputs_max_gb * 2**30
        max_age = None if s.outputs_max_age_days is None else s.outputs_max_age_days * 86400
        now = time.time()
        protected = self.book.protected_files()
        deleted = enforce_outputs(s.outputs_dir, max_bytes, max_age, protected, now, s.request_timeout_s)
        if deleted:
            self.history.forget_images({name for name, _ in deleted})
            self.metrics.outputs_deleted.inc(len(deleted))
            log.info(
                "retention removed old outputs",
                extra={"event": "retention", "files": len(deleted), "bytes": sum(n for _, n in deleted)},
            )
        files = list(s.outputs_dir.glob("*.png")) if s.outputs_dir.is_dir() else []
        self.metrics.outputs_files.set(len(files))
        self.metrics.outputs_bytes.set(sum(f.stat().st_size for f in files if f.exists()))
        return len(deleted)

    async def loop(self) -> None:
        while True:
            try:
                await run_in_threadpool(self.run_once)
            except Exception:  # retention must never take the server down
                log.exception("retention failed", extra={"event": "retention_failed"})
            await asyncio.sleep(self.settings.retention_interval_s)
