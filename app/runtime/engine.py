"""The engine: owns the pipeline on one thread, runs one generation (or one merged batch) at a time.

Read top to bottom it is: load → warm up → loop { take job(s) → encode/denoise/decode through the
diffusers pipeline (app/runtime/stages.py) → hand results back }. A heartbeat is written on every stage and
denoising step so the monitor can tell a long generation that progresses from one that is stuck
(gunicorn's worker heartbeat, per step). A CUDA OOM fails only the request that hit it; an
unrecoverable CUDA error marks the engine unhealthy so the monitor replaces the process.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from app import errors
from app.config import AppSettings
from app.runtime.compilewatch import compile_watch
from app.runtime.faults import FaultInjector
from app.runtime.loader import LoadedPipeline, load_pipeline
from app.runtime.progress import Heartbeat
from app.runtime.stages import BatchRequest, PromptEmbeddingCache, run_batch, uses_guidance
from common.cuda_markers import FATAL_CUDA_MARKERS

log = logging.getLogger("app.runtime.engine")


def _resolve(future: Future, outcome) -> None:
    """Set a job's result or exception once; a waiter that gave up may have cancelled it already."""
    if future.done():
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except Exception:  # InvalidStateError from a concurrent cancel: nobody is waiting any more
        pass


class _Cancelled(Exception):
    """Raised from the step callback when every request of the running batch was abandoned."""


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    cfg_scale: float
    num_images: int
    seed: int

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call without changing their images."""
        return (self.width, self.height, self.num_inference_steps, self.cfg_scale)


@dataclass
class JobResult:
    images: list  # PIL images
    seed: int
    queue_wait_s: float
    generation_s: float
    batch_size: int
    peak_memory_bytes: Optional[int]
    stages: dict = field(default_factory=dict)  # encode_s, denoise_s, decode_s of the batch


@dataclass
class Job:
    params: GenerationParams
    request_id: str
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)
    started_at: Optional[float] = None
    priority: int = 1  # 0: health checks (the monitor's warm-up) go before user work
    seq: int = 0


class Engine:
    STATES = ("starting", "loading", "warming", "ready", "failed", "unhealthy", "stopped")

    def __init__(
        self,
        settings: AppSettings,
        faults: Optional[FaultInjector] = None,
        on_batch_done: Optional[Callable[[int, float, int], None]] = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.faults = faults or FaultInjector(enabled=False)
        self.on_batch_done = on_batch_done  # (images, seconds, steps) → metrics
        self.wall_clock = wall_clock
        self.state = "starting"
        self.state_reason = ""
        self.heartbeat = Heartbeat()
        self.loaded: Optional[LoadedPipeline] = None
        self.warmup_seconds: Optional[float] = None
        self.warmup_compile: dict = {}  # what the warm-up compiled: compiles, compile_s
        self.warmup_stages: dict = {}  # encode_s, denoise_s, decode_s of the first warm-up image
        self.warmup_parts: dict = {}  # seconds of each warm-up generation
        self.compiles_after_warmup = 0
        self.prompt_cache = PromptEmbeddingCache(settings.prompt_cache_size)
        # (priority, arrival order, job): FIFO within a priority; None is the stop sentinel.
        self._jobs: "queue.PriorityQueue[tuple[int, int, Optional[Job]]]" = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Load, warm up and serve on the engine's thread; a second call does nothing."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._jobs.put((-1, next(self._seq), None))
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped" if self.state not in ("failed", "unhealthy") else self.state

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def idle(self) -> bool:
        return self._waiting == 0 and self._running == 0

    def _run(self) -> None:
        try:
            self.state = "loading"
            self.loaded = load_pipeline(self.settings)
            if self.loaded.compiled:
                self.heartbeat.compile_watch = compile_watch()
            log.info(
                "model loaded",
                extra={
                    "event": "model_loaded",
                    "source": self.loaded.source,
                    "device": str(self.loaded.device),
                    "dtype": str(self.loaded.dtype),
                    "quantize": self.loaded.quantize,
                    "notes": self.loaded.notes,
                    "seconds": round(self.loaded.load_seconds, 2),
                    **self.loaded.phases,
                },
            )
            if self.settings.warmup:
                self.state = "warming"
                self._warm_up()
            self.heartbeat.warm = True  # stage times are known from here: the monitor's tight stall bound
            self.state = "ready"
            log.info(
                "engine ready",
                extra={
                    "event": "ready",
                    "warmup_s": self.warmup_seconds,
                    "warmup_stages": self.warmup_stages,
                    "warmup_parts": self.warmup_parts,
                    **self.warmup_compile,
                },
            )
        except Exception as exc:
            self.state, self.state_reason = "failed", f"{exc.__class__.__name__}: {exc}"
            log.exception("engine failed to start", extra={"event": "engine_failed"})
            return
        self._serve()

    def _warm_up(self) -> None:
        """Make one image (a model that cannot is not ready), and with torch.compile'd graphs run
        every kind of batch a request can bring, so that no request compiles (docs/PERFORMANCE.md):
        the compiled transformer blocks take any size and prompt length (dynamic shapes) but
        specialise on one image against several, and on a batch whose prompts differ in length
        (it carries an attention mask). After that, what is still new runs eagerly. AOT-compiled
        blocks (app/runtime/aot.py) were made for every batch size and mask before the warm-up."""
        device = self.loaded.device
        size = self.settings.warmup_pixels(device.type)
        params = GenerationParams(
            prompt="warm-up: a lighthouse at dusk",
            negative_prompt="",
            width=size,
            height=size,
            num_inference_steps=self.settings.warmup_steps,
            cfg_scale=0.0,
            num_images=1,
            seed=0,
        )
        watch = self.heartbeat.compile_watch
        compiled_before = watch.mark() if watch else None
        started = time.perf_counter()
        job = Job(params=params, request_id="warmup")
        self._generate([job])
        self.warmup_parts = {"one_image_s": round(time.perf_counter() - started, 2)}
        # A model that cannot make one image is not ready: the warm-up's own error fails the start
        # (and the supervisor's retries / the monitor take over) instead of being reported as ready.
        result = job.future.result(timeout=0)
        batches = {}
        # A request for 2-4 images of one prompt: torch.compile's blocks specialise on one image
        # against several. AOT packages take any batch size, so with them this is not needed.
        if self.loaded.compile_backend == "jit":
            batches["two_images_s"] = [dataclasses.replace(params, num_images=2, seed=1)]
        if self.settings.max_batch > 1:  # merged requests, prompts of different lengths, a full batch
            long_prompt = "warm-up: " + ", ".join(["a lighthouse on a cliff at dusk, waves below"] * 8)
            batches["merged_batch_s"] = [
                dataclasses.replace(params, prompt=long_prompt if i == 0 else f"warm-up batch {i}", seed=i)
                for i in range(self.settings.max_batch)
            ]
        for label, batch_params in batches.items():
            mark = time.perf_counter()
            jobs = [Job(params=p, request_id=f"warmup-{i}") for i, p in enumerate(batch_params)]
            self._generate(jobs, probe=True)
            self.warmup_parts[label] = round(time.perf_counter() - mark, 2)
            error = jobs[0].future.exception(timeout=0)
            if error is not None:  # e.g. no room for a batch on a small card: single images still work
                log.warning(
                    "batch warm-up failed; a batch of this size may fail the same way when it comes",
                    extra={
                        "event": "warmup_batch_failed",
                        "images": sum(p.num_images for p in batch_params),
                        "error": error.__class__.__name__,
                    },
                )
            if self.state == "unhealthy":  # a fatal CUDA error in a batch: this process cannot serve
                raise RuntimeError(f"warm-up: {self.state_reason}")
        self.prompt_cache.clear()
        self.warmup_seconds = round(time.perf_counter() - started, 3)
        if watch:
            count, seconds = watch.since(compiled_before)
            self.warmup_compile = {"compiles": count, "compile_s": round(seconds, 2)}
        self.warmup_stages = {k: round(v, 3) for k, v in result.stages.items()}
        if self.loaded.compiled and not self.settings.compile_in_requests:
            import torch.compiler

            # From here a shape the warm-up did not compile (a VAE decode at a new size, say) runs
            # eagerly instead of compiling for seconds to a minute inside somebody's request.
            torch.compiler.set_stance("eager_on_recompile")

    # ---- admission -------------------------------------------------------------------------
    def submit(
        self, params: GenerationParams, request_id: Optional[str] = None, priority: bool = False
    ) -> Job:
        """Queue a generation. Raises NotReady, EngineUnhealthy or QueueFull instead of waiting.
        A priority job (the monitor's post-restart check) skips the line and the queue limit: it is
        one small request, and it must not be starved by the traffic it is there to protect."""
        if self.state == "unhealthy":
            raise errors.EngineUnhealthy(
                f"the engine is unhealthy ({self.state_reason}); it is being replaced", retry_after_s=30
            )
        if self.state != "ready":
            raise errors.NotReady(f"the model is {self.state}; try again shortly", retry_after_s=5)
        job = Job(
            params=params,
            request_id=request_id or uuid.uuid4().hex[:16],
            priority=0 if priority else 1,
            seq=next(self._seq),
        )
        with self._lock:
            if (
                not priority
                and self._waiting >= self.settings.queue_size
                and (self._running or self._waiting)
            ):
                raise errors.QueueFull(
                    f"the queue is full ({self._waiting} waiting, {self._running} running)",
                    hint="retry after the time in Retry-After",
                    retry_after_s=self._retry_after(),
                )
            self._waiting += 1
        self._jobs.put((job.priority, job.seq, job))
        return job

    def _retry_after(self) -> int:
        per_job = (self.heartbeat.step_seconds_ewma or 1.0) * 9
        return max(1, int(per_job * (self._waiting + 1)))

    # ---- the serving loop ------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            _, _, job = self._jobs.get()
            if job is None:
                break
            batch = self._take_batch(job)
            live = [j for j in batch if not j.abandoned.is_set()]
            for j in batch:
                if j.abandoned.is_set():
                    _resolve(j.future, errors.GenerationTimeout("abandoned before it started"))
            if live:
                self._generate(live)
            with self._lock:
                self._running = 0

    def _take_batch(self, first: Job) -> list[Job]:
        """The first job plus queued jobs of the same shape, up to max_batch images in all."""
        with self._lock:
            self._waiting -= 1
            batch, images = [first], first.params.num_images
            if self.settings.max_batch > 1:
                keep = []
                while True:
                    try:
                        item = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    nxt = item[2]
                    if (
                        nxt is not None
                        and nxt.params.batch_key() == first.params.batch_key()
                        and images + nxt.params.num_images <= self.settings.max_batch
                    ):
                        batch.append(nxt)
                        images += nxt.params.num_images
                        self._waiting -= 1
                    else:
                        keep.append(item)
                for item in keep:  # (priority, seq) keys keep their order
                    self._jobs.put(item)
            self._running = len(batch)
        return batch

    def _generate(self, batch: list[Job], probe: bool = False) -> None:
        """Run `batch` and resolve its jobs. probe: a warm-up batch finding out what fits; running
        out of memory is then an answer, not an incident (see _handle_oom)."""
        pipe = self.loaded.pipe
        first = batch[0].params
        prompts, negatives, generators = [], [], []
        for job in batch:
            p = job.params
            for i in range(p.num_images):
                prompts.append(p.prompt)
                negatives.append(p.negative_prompt)
                # One CPU generator per image, seeded seed+i: an image depends on its request only,
                # never on what it was batched with, and a seed gives the same picture on CPU and GPU.
                generators.append(torch.Generator("cpu").manual_seed((p.seed + i) % 2**63))
        request = BatchRequest(
            prompts=prompts,
            negatives=negatives if uses_guidance(first.cfg_scale) else None,
            width=first.width,
            height=first.height,
            steps=first.num_inference_steps,
            cfg_scale=first.cfg_scale,
            generators=generators,
        )
        hb = self.heartbeat
        now = self.wall_clock()
        started = time.perf_counter()
        for job in batch:
            job.started_at = time.monotonic()
        hb.begin(
            (first.width, first.height, len(prompts)),
            tuple(j.request_id for j in batch),
            first.num_inference_steps,
            now,
        )
        last_step_perf = [started]
        cuda = self.loaded.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.loaded.device)

        watch = hb.compile_watch
        compiled_before = watch.mark() if watch else None
        last_compiles = [compiled_before[0] if watch else 0]

        step_cache = self.loaded.step_cache
        if step_cache:
            step_cache.begin(first.num_inference_steps)

        stage_mark = [started, last_compiles[0]]

        def on_stage(stage: Optional[str]) -> None:
            now_perf = time.perf_counter()
            compiles = watch.mark()[0] if watch else 0
            hb.enter_stage(
                stage, self.wall_clock(), now_perf - stage_mark[0], compiled=compiles != stage_mark[1]
            )
            stage_mark[:] = [now_perf, compiles]
            last_step_perf[0] = now_perf  # the first step is timed from the start of denoising

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            if step_cache:
                step_cache.end_step()
            self.faults.on_step()
            now_perf = time.perf_counter()
            step_s = now_perf - last_step_perf[0]
            last_step_perf[0] = now_perf
            compiles = watch.mark()[0] if watch else 0
            hb.record_step(step, step_s, self.wall_clock(), compiled=compiles != last_compiles[0])
            last_compiles[0] = compiles
            if all(j.abandoned.is_set() for j in batch):
                raise _Cancelled()
            return callback_kwargs

        try:
            self.faults.before_generation()
            with torch.inference_mode():
                images, stages = run_batch(
                    pipe, request, self.loaded.exec_device, self.prompt_cache, on_step_end, on_stage
                )
        except _Cancelled:
            self._fail(
                batch, errors.GenerationTimeout("the request timed out and was cancelled mid-generation")
            )
            return
        except torch.OutOfMemoryError as exc:
            self._handle_oom(batch, exc, probe)
            return
        except Exception as exc:
            self._handle_error(batch, exc)
            return
        finally:
            if step_cache:
                step_cache.end()
            if hb.stage is not None:
                on_stage(None)  # records the last stage's time
            hb.end()
            try:
                pipe.maybe_free_model_hooks()
            except Exception:  # hooks are best effort; never mask the real outcome
                pass
        seconds = time.perf_counter() - started
        if watch and self.state == "ready":
            self._note_compiles(batch, *watch.since(compiled_before))
        peak = torch.cuda.max_memory_allocated(self.loaded.device) if cuda else None
        hb.generations += 1
        if self.on_batch_done:
            self.on_batch_done(len(images), seconds, first.num_inference_steps)
        offset = 0
        for job in batch:
            n = job.params.num_images
            _resolve(
                job.future,
                JobResult(
                    images=images[offset : offset + n],
                    seed=job.params.seed,
                    queue_wait_s=job.started_at - job.enqueued_at,
                    generation_s=seconds,
                    batch_size=len(batch),
                    peak_memory_bytes=peak,
                    stages=stages,
                ),
            )
            offset += n

    def _note_compiles(self, batch: list[Job], count: int, seconds: float) -> None:
        """A request that had to compile waited seconds (a minute with an empty cache) for it: the
        warm-up is meant to have compiled every shape a request can bring. Said loudly, counted."""
        if count <= 0:
            return
        self.compiles_after_warmup += count
        p = batch[0].params
        log.warning(
            "a request had to compile (a shape the warm-up did not cover)",
            extra={
                "event": "compiled_in_request",
                "compiles": count,
                "compile_s": round(seconds, 2),
                "width": p.width,
                "height": p.height,
                "images": sum(j.params.num_images for j in batch),
                "request_ids": [j.request_id for j in batch],
            },
        )

    def _fail(self, batch: list[Job], exc: Exception) -> None:
        for job in batch:
            _resolve(job.future, exc)

    def _handle_oom(self, batch: list[Job], exc: BaseException, probe: bool = False) -> None:
        if probe:
            # Not torch's words: the monitor restarts on them, and a warm-up that meets them at
            # every start would restart the app in a loop on a card too small for the batch.
            self.free_cache()
            self._fail(batch, errors.OutOfMemory("the warm-up batch did not fit in GPU memory"))
            return
        p = batch[0].params
        # The log line keeps torch's own words: operators grep for them and the monitor counts them.
        log.error(
            "CUDA out of memory during generation; cache freed, request failed, still serving",
            extra={
                "event": "oom",
                "request_ids": [j.request_id for j in batch],
                "width": p.width,
                "height": p.height,
                "images": len(batch),
                "error": str(exc)[:300],
            },
        )
        self.free_cache()
        smaller = max(self.settings.min_size, (min(p.width, p.height) // 2) // 64 * 64)
        self._fail(
            batch,
            errors.OutOfMemory(
                "the GPU ran out of memory for this request",
                hint=f"try a smaller size (e.g. {smaller}x{smaller}) or fewer images",
                retry_after_s=5,
            ),
        )

    def _handle_error(self, batch: list[Job], exc: Exception) -> None:
        text = f"{exc.__class__.__name__}: {exc}"
        if any(marker in text for marker in FATAL_CUDA_MARKERS):
            self.state, self.state_reason = "unhealthy", text[:200]
            log.critical(
                "unrecoverable CUDA error; engine unhealthy, process must be replaced",
                extra={"event": "cuda_fatal", "error": text[:500]},
            )
            self._fail(
                batch, errors.EngineUnhealthy("the GPU failed; the service is restarting", retry_after_s=30)
            )
            return
        log.exception(
            "generation failed",
            extra={"event": "generation_failed", "request_ids": [j.request_id for j in batch]},
        )
        self._fail(batch, errors.GenerationFailed(f"generation failed: {exc.__class__.__name__}"))

    # ---- admin -----------------------------------------------------------------------------
    def free_cache(self) -> dict:
        """Return unused cached GPU memory to the driver (safe while a generation runs)."""
        self.prompt_cache.clear()
        gc.collect()
        if not torch.cuda.is_available() or self.loaded is None or self.loaded.device.type != "cuda":
            return {"device": "cpu", "freed_bytes": 0}
        before = torch.cuda.memory_reserved(self.loaded.device)
        torch.cuda.empty_cache()
        after = torch.cuda.memory_reserved(self.loaded.device)
        log.info("freed GPU cache", extra={"event": "free_cache", "freed_bytes": before - after})
        return {
            "device": str(self.loaded.device),
            "reserved_before": before,
            "reserved_after": after,
            "freed_bytes": before - after,
        }

    def memory(self) -> dict:
        if self.loaded is None or self.loaded.device.type != "cuda":
            return {}
        d = self.loaded.device
        free, total = torch.cuda.mem_get_info(d)
        return {
            "allocated_bytes": torch.cuda.memory_allocated(d),
            "reserved_bytes": torch.cuda.memory_reserved(d),
            "device_free_bytes": free,
            "device_total_bytes": total,
        }
