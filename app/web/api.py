"""HTTP surface: /api/generate, /api/info, /healthz, /readyz, /metrics, /outputs/*, /admin/*.

Every failure is JSON {error, message, hint?, request_id?} with a 4xx/5xx status; validation errors
are 422 with one readable sentence per problem, never a stack trace.
"""

import asyncio
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__, errors
from app.config import AppSettings
from app.runtime import Engine, FaultInjector
from app.web.auth import TokenGate, bearer_token, session_value, tokens_match
from app.web.bodylimit import BodyLimit, BodyTooLarge
from app.web.history import History
from app.web.job_routes import Retention, add_job_routes
from app.web.jobs import JobBook
from app.web.lora_routes import add_lora_routes
from app.web.metrics import AppMetrics, live_values
from app.web.outputs import OutputStore
from app.web.protocol import logged_status
from app.web.schemas import ErrorResponse, GenerateResponse
from app.web.service import GenerationService, new_request_id
from app.web.sysinfo import live_info, model_info
from app.web.upload_routes import UPLOAD_ROUTES, add_upload_routes
from app.web.validation import describe_validation_errors
from app.web.whole_answer import DieAnswering, HeadWithBody
from common.gpu import GpuReader, open_gpu_reader
from common.jsonlog import add_secret
from common.replicas import replica_count, replica_index
from common.tokenfile import ensure_token

log = logging.getLogger("app.web.api")
access_log = logging.getLogger("app.access")

# Routes that take image uploads: they get max_upload_mb instead of max_body_bytes.
UPLOAD_PATHS = frozenset({"/gradio_api/upload", *UPLOAD_ROUTES})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_QUIET_PATHS = ("/healthz", "/readyz", "/metrics")


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: Optional[str] = None,
    hint: Optional[str] = None,
    retry_after_s: Optional[int] = None,
) -> JSONResponse:
    body = ErrorResponse(error=code, message=message, request_id=request_id, hint=hint).model_dump(
        exclude_none=True
    )
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


class DrainRequest(BaseModel):
    enable: bool = True


class FaultRequest(BaseModel):
    kind: str = Field(..., max_length=32)
    count: int = Field(1, ge=1, le=100)
    seconds: float = Field(0.0, ge=0.0, le=600.0)
    megabytes: int = Field(0, ge=0, le=16384)
    rank: int = Field(0, ge=0, le=7)  # slow: another rank of a context-parallel group


def create_app(
    settings: AppSettings,
    gpu_reader: Optional[GpuReader] = None,
    with_ui: bool = True,
    start_engine: bool = False,
) -> FastAPI:
    metrics = AppMetrics()
    pooled = replica_count(settings.replicas) > 1
    faults = FaultInjector(enabled=settings.fault_injection)
    world = settings.parallel_degree if settings.parallel == "context" else 1  # ranks a fault can reach
    engine = Engine(settings, faults=faults, on_batch_done=metrics.on_batch_done)
    store = OutputStore(settings.outputs_dir, settings.min_free_disk_mb * 2**20, settings.png_compress_level)
    history = History(settings.history_file)
    service = GenerationService(settings, engine, store, metrics, history)
    book = JobBook(service, settings.jobs_kept, replica_index(os.environ))
    retention = Retention(settings, service, book, history, metrics)
    gpu = gpu_reader or open_gpu_reader()
    admin_token = settings.admin_token or ensure_token(settings.admin_token_file)
    add_secret(admin_token)
    add_secret(settings.api_token)
    if settings.api_token:
        add_secret(session_value(settings.api_token))

    metrics.add_live(lambda: live_values(service))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        store.check_writable()
        engine.start()
        rebuilt = await run_in_threadpool(history.rebuild_from, settings.outputs_dir)
        if rebuilt:
            log.info(
                "history rebuilt from the PNGs", extra={"event": "history_rebuilt", "generations": rebuilt}
            )
        # One process sweeps a shared outputs/: the single app, or replica 0 of a pool.
        sweeps = replica_index(os.environ) in (None, 0)
        retention_task = asyncio.create_task(retention.loop()) if sweeps else None
        yield
        if retention_task is not None:
            retention_task.cancel()
        engine.stop()
        gpu.close()
        history.close()

    app = FastAPI(
        title="zimage-serve",
        version=__version__,
        lifespan=lifespan,
        description="Z-Image-Turbo text-to-image service. POST /api/generate to make images.",
    )
    app.state.service = service
    app.state.settings = settings
    app.state.gpu_reader = gpu
    app.state.pooled = pooled  # one of several replicas behind HAProxy (app.web.server's drain)

    # ---- middleware: request id, body limit, access log --------------------------------------
    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = request.headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else new_request_id()
        request.state.request_id = rid
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except BodyTooLarge:
            raise  # app.web.bodylimit answers 413 itself; not an internal error
        except Exception:
            log.exception("unhandled error", extra={"event": "unhandled", "request_id": rid})
            response = error_response(500, "internal_error", "internal error; see the server log", rid)
        response.headers["X-Request-ID"] = rid
        path = request.url.path
        level = (
            logging.DEBUG
            if path in _QUIET_PATHS or not (path.startswith("/api") or path.startswith("/admin"))
            else logging.INFO
        )
        access_log.log(
            level,
            "request",
            extra={
                "event": "http",
                "request_id": rid,
                "method": request.method,
                "path": path,
                "status": logged_status(request.scope, response.status_code),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return response

    # ---- errors --------------------------------------------------------------------------------
    @app.exception_handler(errors.ServiceError)
    async def service_error(request: Request, exc: errors.ServiceError):
        status = exc.status
        if pooled and isinstance(exc, errors.OutOfMemory):
            # In a pool of replicas an OOM says "not here, not now": 503 + Retry-After is what the
            # balancer retries on another replica (HAProxy's retry-on has no 507). Only when every
            # replica runs out does the client see it, with the same reason and hint.
            status = 503
        return error_response(
            status,
            exc.code,
            exc.message,
            getattr(request.state, "request_id", None),
            exc.hint,
            exc.retry_after_s,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = describe_validation_errors(exc.errors())
        return error_response(
            422,
            "invalid_request",
            "; ".join(problems),
            request.state.request_id,
            hint="see GET /api/info for the limits",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}.get(
            exc.status_code, "http_error"
        )
        headers = getattr(exc, "headers", None) or {}
        resp = error_response(
            exc.status_code, code, str(exc.detail), getattr(request.state, "request_id", None)
        )
        resp.headers.update(headers)
        return resp

    # ---- auth: api_token is checked by app.web.auth.TokenGate in front of every route; the admin
    # routes (the monitor's levers) check the admin token here ---------------------------------
    def require_admin_token(request: Request) -> None:
        if not tokens_match(bearer_token(request.headers.get("authorization", "")), admin_token):
            raise StarletteHTTPException(
                401, "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"}
            )

    # ---- probes --------------------------------------------------------------------------------
    @app.get("/healthz", tags=["probes"])
    async def healthz():
        """Liveness: the event loop answers; 503 when the engine failed or is unhealthy."""
        status = engine.status()
        body = {
            "status": "ok" if status.alive else status.state,
            "state": status.state,
            "reason": status.reason,
            "ready": service.ready,
            "draining": service.draining,
            "draining_since": service.draining_since,
            "queue_waiting": status.waiting,
            "in_flight": service.in_flight,
            "jobs": book.counts(),
            "time": time.time(),
            "heartbeat": status.heartbeat,
        }
        return JSONResponse(body, status_code=200 if status.alive else 503)

    @app.get("/readyz", tags=["probes"])
    async def readyz():
        """Readiness: 200 only when the model is loaded and warmed and the server is not draining."""
        ready = service.ready
        status = engine.status()
        body = {
            "ready": ready,
            "state": status.state,
            "draining": service.draining,
            "warmup_seconds": status.warmup_seconds,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["probes"])
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- API -----------------------------------------------------------------------------------
    RequestModel = service.request_model

    @app.post(
        "/api/generate",
        response_model=GenerateResponse,
        response_model_exclude_none=True,
        tags=["api"],
        responses={
            422: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
            504: {"model": ErrorResponse},
            507: {"model": ErrorResponse},
        },
    )
    async def generate(body: RequestModel, request: Request):  # type: ignore[valid-type]
        """Generate 1–4 images. Defaults: 1024×1024, 8 steps (Turbo's distilled 8 forwards), cfg 0."""
        # The monitor's warm-up check carries the admin token and goes ahead of user traffic.
        priority_token = request.headers.get("x-admin-token", "")
        priority = bool(priority_token) and tokens_match(priority_token, admin_token)
        return await service.generate(
            body, request.state.request_id, priority=priority, receive=request.receive
        )

    add_job_routes(app, book, history, RequestModel)
    add_upload_routes(app, service, book)
    add_lora_routes(app, service)

    @app.get("/api/info", tags=["api"])
    async def info():
        data = model_info(service)
        data["live"] = live_info(service, gpu)
        return data

    @app.get("/outputs/{name}", tags=["api"])
    async def output_file(name: str):
        path = store.path_for(name)
        if path is None:
            raise StarletteHTTPException(404, "no such image")
        return FileResponse(path, media_type="image/png")

    # ---- admin (the monitor's levers) ------------------------------------------------------------
    @app.post("/admin/free-cache", tags=["admin"], dependencies=[Depends(require_admin_token)])
    async def admin_free_cache():
        return engine.free_cache()

    @app.post("/admin/drain", tags=["admin"], dependencies=[Depends(require_admin_token)])
    async def admin_drain(body: DrainRequest):
        if not body.enable and service.shutting_down:
            return error_response(
                409, "shutting_down", "the process is exiting (SIGTERM): its drain cannot be lifted"
            )
        service.set_draining(body.enable)
        log.warning(
            "drain %s by admin",
            "on" if body.enable else "off",
            extra={"event": "drain", "enable": body.enable},
        )
        return {"draining": service.draining, "in_flight": service.in_flight, "idle": service.idle()}

    @app.post("/admin/fault", tags=["admin"], dependencies=[Depends(require_admin_token)])
    def admin_fault(body: FaultRequest):  # sync: a leak touches GBs, off the event loop (threadpool)
        if not faults.enabled:
            raise StarletteHTTPException(404, "fault injection is disabled (app.fault_injection = false)")
        try:
            if body.rank >= world:
                raise ValueError(f"rank {body.rank} does not exist: this app has {world} rank(s)")
            return faults.inject(
                body.kind, count=body.count, seconds=body.seconds, megabytes=body.megabytes, rank=body.rank
            )
        except ValueError as exc:
            return error_response(422, "invalid_request", str(exc))

    if start_engine:
        # The model starts loading now, while the UI is built and the server starts (seconds of a
        # cold start), not when the server's lifespan begins; lifespan's start is then a no-op.
        engine.start()
    if with_ui:
        # Gradio's copies of images and uploads go under run/, not /tmp/gradio (some of gradio reads
        # this at import, so it is set before app.web.ui imports gradio).
        os.environ["GRADIO_TEMP_DIR"] = str(settings.gradio_cache_dir)
        from app.web.ui import mount_ui

        app = mount_ui(app, service, gpu, book)
    # Added last = outermost: the body limit counts every byte (the login form's too), then the
    # gate refuses without reading a body.
    if settings.api_token:
        app.add_middleware(
            TokenGate, api_token=settings.api_token, secure_cookie=settings.session_cookie_secure
        )
    app.add_middleware(
        BodyLimit,
        limit_for=lambda path: (
            settings.max_upload_mb * 2**20 if path in UPLOAD_PATHS else settings.max_body_bytes
        ),
    )
    # Outermost: every answer's head waits for its body (a killed replica's answer is then whole or
    # absent, never cut: app.web.whole_answer).
    app.add_middleware(HeadWithBody)
    if faults.enabled:
        app.add_middleware(DieAnswering, should_die=faults.take_die_answering)
    return app
