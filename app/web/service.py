"""The one generation service behind both the JSON API and the Gradio UI: admission, waiting with a
deadline, saving, and the response. Validation lives in the request model (app.web.schemas)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool
from starlette.types import Receive

from app import errors
from app.config import AppSettings
from app.runtime import Engine, GenerationParams, LoraLibrary, skipped_steps
from app.web.history import History
from app.web.images import decode_image, fit
from app.web.metrics import AppMetrics
from app.web.outputs import OutputStore
from app.web.schemas import GenerateResponse, ImageOut, Limits, Timings, build_request_model

log = logging.getLogger("app.web.service")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


async def _until_client_leaves(receive: Receive) -> None:
    """Returns once the server says that the client closed its connection. Past a request's body a
    server sends nothing else; anything else (or an error) and we cannot tell, so this waits for
    good and the image decides."""
    try:
        message = await receive()
    except Exception:
        log.debug("receive failed while waiting for an image", exc_info=True)
        message = {}
    if message.get("type") != "http.disconnect":
        await asyncio.Event().wait()


def _retrieved(future: asyncio.Future) -> None:
    # An abandoned job's future still ends (cancelled, or the engine's error): read here, it is
    # not reported as "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class GenerationService:
    def __init__(
        self,
        settings: AppSettings,
        engine: Engine,
        store: OutputStore,
        metrics: AppMetrics,
        history: Optional[History] = None,
    ):
        self.settings = settings
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.limits = Limits.from_settings(settings)
        self.request_model = build_request_model(self.limits)
        # Wall-clock time readiness went off for a restart (None: not draining). Shown on /healthz so
        # the monitor can tell a drain someone is finishing from one whose driver died halfway.
        self.draining_since: Optional[float] = None
        self.shutting_down = False  # SIGTERM received: the drain ends in the process's exit
        self.in_flight = 0  # requests inside generate(), waiting or running or saving
        self.history = history
        self.lora_library = LoraLibrary(settings.lora_dir) if settings.lora_dir is not None else None

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def set_draining(self, enable: bool) -> bool:
        """Readiness off (or back on). A process shutting down stays drained: lifting the drain
        would put a process about to exit back into a balancer's pool. Returns the state now."""
        if enable and self.draining_since is None:
            self.draining_since = time.time()
        elif not enable and not self.shutting_down:
            self.draining_since = None
        return self.draining

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self.set_draining(True)

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.draining

    @property
    def model_label(self) -> str:
        return "demo (tiny random weights)" if self.settings.is_demo_model else str(self.settings.model_dir)

    def lossy_options(self, num_steps: int) -> list[str]:
        """The opt-ins that change an image of num_steps against the default at the same seed (told
        to the user, and written into each PNG, so an image can be reproduced)."""
        options = ["FP8 weights"] if self.settings.quantize == "fp8" else []
        reused = sorted(skipped_steps(num_steps, self.settings.step_cache_skips))
        if reused:
            options.append(
                f"step cache (steps {', '.join(str(s + 1) for s in reused)} of {num_steps} reused)"
            )
        return options

    def validate(self, data: dict[str, Any]):
        """Raise pydantic.ValidationError with readable messages; return the typed request."""
        return self.request_model.model_validate(data)

    def idle(self) -> bool:
        return self.in_flight == 0 and self.engine.idle()

    @staticmethod
    def decode_inputs(req) -> tuple:
        """The request's input images, decoded, checked and fitted to its size: (init, mask, labels
        for the PNG). Seconds of CPU for a 16 MP upload: callers on the event loop use
        decode_inputs_off_loop."""
        init = mask = None
        labels: dict = {}
        if req.init_image is not None:
            init, labels["init_image_sha256"] = decode_image(req.init_image, "init_image")
            labels["strength"] = req.strength
            if req.mask_image is not None:
                mask, labels["mask_image_sha256"] = decode_image(req.mask_image, "mask_image", mode="L")
                if mask.size != init.size:
                    raise errors.InvalidImage(
                        f"mask_image is {mask.size[0]}×{mask.size[1]} but init_image is "
                        f"{init.size[0]}×{init.size[1]}; they must be the same size"
                    )
                mask = fit(mask, req.width, req.height)
            init = fit(init, req.width, req.height)
        return init, mask, labels

    async def decode_inputs_off_loop(self, req) -> Optional[tuple]:
        """decode_inputs on a worker thread (None without input images): the event loop keeps
        serving probes, progress streams and other requests meanwhile."""
        if req.init_image is None:
            return None
        return await run_in_threadpool(self.decode_inputs, req)

    def check_loras(self, req) -> tuple:
        """((name, scale), …) of the LoRAs `req` names, each a file there now: an unknown name is a
        422 at once, not after the wait in the queue (the engine checks the file again when it runs)."""
        if not req.loras:
            return ()
        if self.lora_library is None:
            raise errors.UnknownLora("this server serves no LoRAs", hint="the operator sets app.lora_dir")
        for lora in req.loras:
            self.lora_library.find(lora.name)
        return tuple((lora.name, float(lora.scale)) for lora in req.loras)

    def submit(self, req, request_id: str, priority: bool = False, on_step=None, inputs=None):
        """Queue the generation of `req`: the engine's job and the seed it will use. Raises Draining,
        QueueFull, NotReady or EngineUnhealthy instead of waiting. `inputs`: decode_inputs' result
        when the caller decoded them already (off the event loop)."""
        if self.draining:
            raise errors.Draining("the server is draining for a restart; retry shortly", retry_after_s=10)
        seed = req.seed if req.seed >= 0 else secrets.randbelow(2**32)
        init, mask, labels = inputs if inputs is not None else self.decode_inputs(req)
        loras = self.check_loras(req)
        params = GenerationParams(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=req.width,
            height=req.height,
            num_inference_steps=req.num_inference_steps,
            cfg_scale=float(req.cfg_scale),
            num_images=req.num_images,
            seed=seed,
            init_image=init,
            mask_image=mask,
            strength=req.strength if init is not None else 1.0,
            loras=loras,
        )
        job = self.engine.submit(params, request_id, priority=priority)
        job.on_step = on_step
        job.labels = {"mode": params.mode, **labels} if init is not None else {}
        return job, seed

    async def generate(
        self,
        req,
        request_id: Optional[str] = None,
        url_prefix: str = "/outputs/",
        priority: bool = False,
        receive: Optional[Receive] = None,
    ) -> GenerateResponse:
        """Synchronous: queue, wait, save, answer. `receive`: the request's ASGI receive, once its
        body is read; a client that closes its connection meanwhile gets its job dropped (ClientGone)."""
        request_id = request_id or new_request_id()

        async def submit():
            inputs = await self.decode_inputs_off_loop(req)
            return self.submit(req, request_id, priority, inputs=inputs)

        return await self.complete(req, request_id, url_prefix, submit, receive)

    async def complete(
        self, req, request_id: str, url_prefix: str, submit, receive: Optional[Receive] = None
    ) -> GenerateResponse:
        """await submit() → (job, seed), then wait, save and answer; counted in the metrics either way."""
        started = time.perf_counter()
        status = "error"
        self.in_flight += 1
        try:
            job, seed = await submit()
            result = await self._wait(job, receive)
            response = await self._finish(req, job, result, seed, request_id, started, url_prefix)
            status = "ok"
            return response
        except errors.ServiceError as exc:
            status = exc.code
            if isinstance(exc, errors.OutOfMemory):
                self.metrics.oom.inc()
            raise
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(status=status).inc()
            self.metrics.request_seconds.observe(time.perf_counter() - started)

    async def _wait(self, job, receive: Optional[Receive]):
        """The job's result. Whoever stops waiting first flags the job abandoned, so that the engine
        drops it (a queued job never runs, a running one stops at its next step): past
        request_timeout_s (GenerationTimeout), when the client closed its connection (ClientGone: a
        client that gave up, a closed browser tab, a balancer's timeout; before, its images were made
        for nobody while the others waited behind them), or when this task is cancelled."""
        timeout = self.settings.request_timeout_s
        # Never cancelled here (asyncio.wait leaves what it waits on be): the engine owns its future.
        image = asyncio.wrap_future(job.future)
        image.add_done_callback(_retrieved)
        waits = {image}
        if receive is not None:
            waits.add(asyncio.ensure_future(_until_client_leaves(receive)))
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.abandoned.set()
            raise
        finally:
            for waiting in waits - {image}:
                waiting.cancel()
        if image in done:
            return image.result()
        job.abandoned.set()
        if done:
            event = {"event": "client_gone", "request_id": job.request_id, "steps_done": job.steps_done}
            log.info("the client closed its connection: its job is dropped", extra=event)
            raise errors.ClientGone("the client closed its connection before its images were ready")
        raise errors.GenerationTimeout(
            f"generation did not finish within {timeout:.0f} s",
            hint="try fewer steps, a smaller size, or retry when the queue is shorter",
            retry_after_s=5,
        )

    async def _finish(
        self, req, job, result, seed: int, request_id: str, started: float, url_prefix: str
    ) -> GenerateResponse:
        self.metrics.queue_wait_seconds.observe(result.queue_wait_s)
        metadata = {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "width": req.width,
            "height": req.height,
            "num_inference_steps": req.num_inference_steps,
            "cfg_scale": req.cfg_scale,
            "seed": seed,
            "model": self.model_label,
            "request_id": request_id,
            **job.labels,  # image-to-image: the mode, strength and the inputs' hashes
        }
        if req.loras:
            metadata["loras"] = [{"name": lora.name, "scale": lora.scale} for lora in req.loras]
        lossy = self.lossy_options(req.num_inference_steps)
        if lossy:
            metadata["lossy_options"] = lossy
        save_started = time.perf_counter()
        saved = await run_in_threadpool(self.store.save, result.images, request_id, metadata)
        save_s = time.perf_counter() - save_started
        images = []
        for name, data in saved:
            image = ImageOut(filename=name, width=req.width, height=req.height)
            if req.response_format == "base64":
                image.b64_png = self.store.to_base64(data)
            else:
                image.url = url_prefix + name
            images.append(image)
        total = time.perf_counter() - started
        log.info(
            "generated",
            extra={
                "event": "generated",
                "request_id": request_id,
                "seed": seed,
                "width": req.width,
                "height": req.height,
                "num_inference_steps": req.num_inference_steps,
                "images": req.num_images,
                "batch": result.batch_size,
                "queue_wait_s": round(result.queue_wait_s, 3),
                "generation_s": round(result.generation_s, 3),
                "total_s": round(total, 3),
            },
        )
        response = GenerateResponse(
            request_id=request_id,
            seed=seed,
            images=images,
            width=req.width,
            height=req.height,
            num_inference_steps=req.num_inference_steps,
            cfg_scale=req.cfg_scale,
            timings=Timings(
                queue_wait_s=round(result.queue_wait_s, 4),
                generation_s=round(result.generation_s, 4),
                save_s=round(save_s, 4),
                total_s=round(total, 4),
                **{k: round(v, 4) for k, v in result.stages.items()},
            ),
            peak_memory_bytes=result.peak_memory_bytes,
            model=self.model_label,
        )
        if self.history is not None:
            params = {k: v for k, v in metadata.items() if k != "request_id"}
            timings = response.timings.model_dump(exclude_none=True)
            await run_in_threadpool(
                self.history.add, request_id, time.time(), params, seed, timings, [n for n, _ in saved]
            )
        return response
