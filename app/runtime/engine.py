"""The engine: owns the pipeline on one thread, runs one generation (or one merged batch) at a time.

Read top to bottom it is: load → warm up → loop { take job(s) → encode/denoise/decode through the
diffusers pipeline (app/runtime/stages.py) → hand results back }. A heartbeat is written on every stage and
denoising step so the monitor can tell a long generation that progresses from one that is stuck
(gunicorn's worker heartbeat, per step). A CUDA OOM fails only the request that hit it; an
unrecoverable CUDA error marks the engine unhealthy so the monitor replaces the process.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from typing import Callable, Optional

import torch

from app import errors
from app.config import AppSettings
from app.runtime import failures, memory, selfcheck
from app.runtime.compilewatch import compile_watch
from app.runtime.faults import FaultInjector
from app.runtime.jobqueue import JobQueue
from app.runtime.jobs import EngineStatus, GenerationParams, Job, JobResult, ModelFacts, resolve
from app.runtime.loader import LoadedPipeline, load_pipeline
from app.runtime.lora_merge import LoraSet, lora_set_for
from app.runtime.parallel import RankLink, RankWork
from app.runtime.progress import Heartbeat
from app.runtime.stages import PromptEmbeddingCache, batch_request, run_batch
from app.runtime.warmup import WarmupReport, warm_up

__all__ = ["Engine", "GenerationParams", "JobResult"]

log = logging.getLogger(__name__)


class _Cancelled(Exception):
    """Raised from the step callback when every request of the running batch was abandoned."""


def _why_stopped(job: Job) -> errors.ServiceError:
    if job.cancelled.is_set():
        return errors.Cancelled("cancelled while running")
    return errors.GenerationTimeout("the request timed out and was cancelled mid-generation")


class Engine:
    """States: starting → loading → warming → ready; failed (could not start), unhealthy (a fatal
    CUDA error: the process must be replaced), stopped."""

    def __init__(
        self,
        settings: AppSettings,
        faults: Optional[FaultInjector] = None,
        on_batch_done: Optional[Callable[[int, float, int], None]] = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.faults = faults or FaultInjector(enabled=False)
        self.on_batch_done = on_batch_done  # (images, seconds, num_inference_steps) → metrics
        self.wall_clock = wall_clock
        self.state = "starting"
        self.state_reason = ""
        self.heartbeat = Heartbeat()
        self.loaded: Optional[LoadedPipeline] = None
        self.warmup = WarmupReport()
        self.compiles_after_warmup = 0
        self.prompt_cache = PromptEmbeddingCache(settings.prompt_cache_size)
        self.queue = JobQueue(settings.queue_size, settings.max_batch, self._retry_after)
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # Context parallelism (app/runtime/parallel.py): this is rank 0, and every pipeline call
        # is shared with the other ranks first.
        self.link: Optional[RankLink] = RankLink(0) if settings.parallel == "context" else None
        self.loras: Optional[LoraSet] = None  # when app.lora_dir is set: made once the model is loaded
        self.failure_streak = selfcheck.streak_for(settings)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Load, warm up and serve on the engine's thread; a second call does nothing."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.queue.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped" if self.state not in ("failed", "unhealthy") else self.state

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def waiting(self) -> int:
        return self.queue.waiting

    @property
    def running(self) -> int:
        return self.queue.running

    def idle(self) -> bool:
        return self.queue.waiting == 0 and self.queue.running == 0

    def cancel(self, job: Job) -> str:
        """A queued job leaves the line at once; a running one stops at the next denoising step
        (alone) or is left out of its batch's results (with others). Returns where it was."""
        return self.queue.cancel(job)

    def position(self, job: Job) -> Optional[int]:
        return self.queue.position(job)

    def forwards_ahead(self, job: Job) -> Optional[int]:
        return self.queue.forwards_ahead(job)

    def _run(self) -> None:
        try:
            self.state = "loading"
            self.loaded = load_pipeline(self.settings)
            self.loras = lora_set_for(self.loaded.pipe, self.settings)
            if self.loaded.compiled:
                self.heartbeat.compile_watch = compile_watch()
            log.info("model loaded", extra={"event": "model_loaded", **self.loaded.log_fields()})
            if self.settings.warmup:
                self.state = "warming"
                self.warmup = warm_up(self)
            self.heartbeat.warm = True  # stage times are known from here: the monitor's tight stall bound
            self.state = "ready"
            log.info(
                "engine ready",
                extra={
                    "event": "ready",
                    "warmup_s": self.warmup.seconds,
                    "warmup_stages": self.warmup.stages,
                    "warmup_parts": self.warmup.parts,
                    **self.warmup.compile,
                },
            )
        except Exception as exc:
            self.state, self.state_reason = "failed", f"{exc.__class__.__name__}: {exc}"
            log.exception("engine failed to start", extra={"event": "engine_failed"})
            return
        self._serve()

    # ---- admission -------------------------------------------------------------------------
    def submit(
        self, params: GenerationParams, request_id: Optional[str] = None, priority: bool = False
    ) -> Job:
        """Queue a generation. Raises NotReady, EngineUnhealthy or QueueFull instead of waiting.
        A priority job (the monitor's post-restart check) skips the line and the queue limit: it is
        one small request, and it must not be starved by the traffic it is there to protect."""
        if self.state == "unhealthy":
            raise self.unhealthy_error()
        if self.state != "ready":
            raise errors.NotReady(f"the model is {self.state}; try again shortly", retry_after_s=5)
        job = Job(
            params=params,
            request_id=request_id or uuid.uuid4().hex[:16],
            priority=0 if priority else 1,
            seq=next(self._seq),
        )
        self.queue.put(job)
        return job

    def unhealthy_error(self) -> errors.EngineUnhealthy:
        """What a request is told by an engine that is being replaced: 503 + Retry-After, which a
        balancer retries on another replica."""
        return errors.EngineUnhealthy(
            f"the engine is unhealthy ({self.state_reason}); it is being replaced", retry_after_s=30
        )

    def _retry_after(self, waiting: int) -> int:
        per_job = (self.heartbeat.step_seconds_ewma or 1.0) * 8
        return max(1, int(per_job * (waiting + 1)))

    # ---- the serving loop ------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            batch = self.queue.next_batch()
            if batch is None:
                break
            live = [j for j in batch if not j.abandoned.is_set()]
            for j in batch:
                if j.abandoned.is_set():
                    resolve(j.future, errors.GenerationTimeout("abandoned before it started"))
            if live and self.state == "unhealthy":  # being replaced: a 503 the balancer retries elsewhere
                for j in live:  # (running it would fail again, or wait on a rank that is gone)
                    resolve(j.future, self.unhealthy_error())
            elif live:
                try:
                    self.generate_batch(live, served=True)
                except Exception as exc:  # past generate_batch's own handling: a bug, not a request's
                    self._thread_failed(exc, live)
            self.queue.done()
        if self.link is not None and self.state == "ready":
            self.link.share(None)  # the other ranks exit (0) once the drain is over

    def _thread_failed(self, exc: Exception, batch: list[Job]) -> None:
        """The serving loop must outlive any error: a dead engine thread with state "ready" would
        answer probes while every request waited for its timeout, a hang nobody sees. Unhealthy
        instead: /healthz 503 (the monitor's engine_unhealthy replaces the app), and this batch and
        the queued ones get 503 + Retry-After, which a balancer retries elsewhere."""
        self.state, self.state_reason = "unhealthy", f"engine error: {exc.__class__.__name__}: {exc}"[:200]
        log.exception("engine loop error", extra={"event": "engine_loop_error"})
        for job in batch:
            resolve(job.future, self.unhealthy_error())

    def generate_batch(self, batch: list[Job], probe: bool = False, served: bool = False) -> str:
        """Run `batch`, resolve its jobs and say what it came to (selfcheck.OK, FAILED, OOM or OTHER).
        probe: a warm-up batch finding out what fits; running out of memory is then an answer, not an
        incident (see failures.out_of_memory). served: users' requests, judged by the self-check
        before they are answered (app/runtime/selfcheck.py)."""
        pipe = self.loaded.pipe
        first = batch[0].params
        request, seeds = batch_request([job.params for job in batch])
        hb = self.heartbeat
        now = self.wall_clock()
        started = time.perf_counter()
        for job in batch:
            job.started_at = time.monotonic()
        hb.begin(
            (first.width, first.height, len(request.prompts)),
            tuple(j.request_id for j in batch),
            first.forwards,
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
            for job in batch:
                job.steps_done = step + 1
                if job.on_step is not None:
                    job.on_step(step + 1)
            stop = all(j.abandoned.is_set() for j in batch)
            if self.link is not None:  # every rank stops at the same step, or none does
                stop = self.link.agree_to_stop(stop)
            if stop:
                raise _Cancelled()
            return callback_kwargs

        shared = False  # whether the other ranks are running this batch too
        ended: Optional[list] = None  # each job's exception, resolved once the heartbeat has ended
        outcome = selfcheck.OTHER  # unless the batch runs through, or fails for no reason of its own
        try:
            if self.loras is not None:  # before the other ranks are told: a refused file fails alone
                self.loras.apply(first.loras)
            self.faults.before_generation()
            if self.link is not None:
                warm, delays = self.warmup.seconds is not None, self.faults.shared_step_delays()
                self.link.share(RankWork.of(request, seeds, warm, delays))
                shared = True
            with torch.inference_mode():
                images, stages = run_batch(
                    pipe, request, self.loaded.exec_device, self.prompt_cache, on_step_end, on_stage
                )
        except _Cancelled:
            ended = [_why_stopped(job) for job in batch]
        except Exception as exc:
            if shared:
                # The other ranks may be inside a collective this rank will never join: only a
                # restart of the whole group gets them out (the monitor replaces an unhealthy app).
                self.state, self.state_reason = "unhealthy", f"{exc.__class__.__name__}: {exc}"[:200]
                failure = failures.parallel_generation_failed(batch, exc)
            elif isinstance(exc, torch.OutOfMemoryError):
                outcome = selfcheck.OOM
                self.free_cache()
                failure = failures.out_of_memory(batch, exc, probe, self.settings.min_size)
            elif failures.is_fatal(exc):
                self.state, self.state_reason = "unhealthy", f"{exc.__class__.__name__}: {exc}"[:200]
                failure = failures.fatal_cuda_error(exc)
            else:
                failure = failures.generation_failed(batch, exc)
                outcome = selfcheck.OTHER if isinstance(exc, errors.ServiceError) else selfcheck.FAILED
            ended = [failure] * len(batch)
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
        if ended is not None:  # after hb.end(): a caller told "cancelled" or "failed" sees it idle
            verdict = selfcheck.judge(self, outcome) if served else None
            for job, exc in zip(batch, ended if verdict is None else [verdict] * len(batch)):
                resolve(job.future, exc)
            return outcome
        seconds = time.perf_counter() - started
        if served:
            self.failure_streak.record(selfcheck.OK)  # a success ends a streak of failures
        if watch and self.state == "ready":
            count, compile_s = watch.since(compiled_before)
            if count > 0:
                self.compiles_after_warmup += count
                failures.compiled_in_request(batch, count, compile_s)
        peak = torch.cuda.max_memory_allocated(self.loaded.device) if cuda else None
        hb.generations += 1
        if self.on_batch_done:
            self.on_batch_done(len(images), seconds, first.num_inference_steps)
        offset = 0
        for job in batch:
            n = job.params.num_images
            if job.cancelled.is_set():  # its batch ran on for the others: its images are dropped
                resolve(job.future, errors.Cancelled("cancelled while running"))
                offset += n
                continue
            resolve(
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
        return selfcheck.OK

    # ---- admin and status ----------------------------------------------------------------
    def free_cache(self) -> dict:
        """Return unused cached GPU memory to the driver (safe while a generation runs)."""
        self.prompt_cache.clear()
        return memory.free_cache(self.loaded.device if self.loaded else None)

    def memory(self) -> dict:
        return memory.memory(self.loaded.device if self.loaded else None)

    def status(self) -> EngineStatus:
        loaded, cache = self.loaded, self.loaded.step_cache if self.loaded else None
        model = None
        if loaded is not None:
            model = ModelFacts(
                source=loaded.source,
                device=str(loaded.device),
                dtype=str(loaded.dtype).replace("torch.", ""),
                vae_dtype=str(loaded.vae_dtype).replace("torch.", ""),
                compiled=loaded.compiled,
                compile_backend=loaded.compile_backend,
                load_seconds=round(loaded.load_seconds, 3),
                notes=tuple(loaded.notes),
            )
        return EngineStatus(
            state=self.state,
            reason=self.state_reason or None,
            waiting=self.queue.waiting,
            running=self.queue.running,
            heartbeat=self.heartbeat.snapshot(),
            warmup_seconds=self.warmup.seconds,
            compiles_after_warmup=self.compiles_after_warmup,
            model=model,
            step_cache=None if cache is None else {"reused": cache.reused, "computed": cache.computed},
            loras=None if self.loras is None else self.loras.status(),
            self_checks=dict(self.failure_streak.checks),
        )
