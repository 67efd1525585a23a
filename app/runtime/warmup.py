"""The warm-up: the generations an engine runs before it calls itself ready.

Make one image (a model that cannot is not ready), and with torch.compile'd graphs run every kind
of batch a request can bring, so that no request compiles (docs/PERFORMANCE.md): the compiled
transformer blocks take any size and prompt length (dynamic shapes) but specialise on one image
against several, and on a batch whose prompts differ in length (it carries an attention mask).
After that, what is still new runs eagerly. AOT-compiled blocks (app/runtime/aot/) were made for
every batch size and mask before the warm-up."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from app.runtime.jobs import GenerationParams, Job

if TYPE_CHECKING:
    from app.config import AppSettings
    from app.runtime.engine import Engine

log = logging.getLogger(__name__)

PROMPT = "warm-up: a lighthouse at dusk"


@dataclass
class WarmupReport:
    seconds: Optional[float] = None
    parts: dict = field(default_factory=dict)  # seconds of each warm-up generation
    compile: dict = field(default_factory=dict)  # what the warm-up compiled: compiles, compile_s
    stages: dict = field(default_factory=dict)  # encode_s, denoise_s, decode_s of the first image


def first_image_params(settings: "AppSettings", device_type: str) -> GenerationParams:
    """The warm-up's first image: what a ready engine is known to make (app/runtime/selfcheck.py
    asks for it again when generations fail)."""
    size = settings.warmup_pixels(device_type)
    return GenerationParams(
        prompt=PROMPT,
        negative_prompt="",
        width=size,
        height=size,
        num_inference_steps=settings.warmup_steps,
        cfg_scale=0.0,
        num_images=1,
        seed=0,
    )


def warm_up(engine: "Engine") -> WarmupReport:
    settings, loaded = engine.settings, engine.loaded
    report = WarmupReport()
    params = first_image_params(settings, loaded.device.type)
    watch = engine.heartbeat.compile_watch
    compiled_before = watch.mark() if watch else None
    started = time.perf_counter()
    job = Job(params=params, request_id="warmup")
    engine.generate_batch([job])
    report.parts = {"one_image_s": round(time.perf_counter() - started, 2)}
    # A model that cannot make one image is not ready: the warm-up's own error fails the start
    # (and the supervisor's retries / the monitor take over) instead of being reported as ready.
    result = job.future.result(timeout=0)
    batches = {}
    # A request for 2-4 images of one prompt: torch.compile's blocks specialise on one image
    # against several. AOT packages take any batch size, so with them this is not needed.
    if loaded.compile_backend == "jit":
        batches["two_images_s"] = [dataclasses.replace(params, num_images=2, seed=1)]
    if settings.max_batch > 1:  # merged requests, prompts of different lengths, a full batch
        long_prompt = "warm-up: " + ", ".join(["a lighthouse on a cliff at dusk, waves below"] * 8)
        batches["merged_batch_s"] = [
            dataclasses.replace(params, prompt=long_prompt if i == 0 else f"warm-up batch {i}", seed=i)
            for i in range(settings.max_batch)
        ]
    for label, batch_params in batches.items():
        mark = time.perf_counter()
        jobs = [Job(params=p, request_id=f"warmup-{i}") for i, p in enumerate(batch_params)]
        engine.generate_batch(jobs, probe=True)
        report.parts[label] = round(time.perf_counter() - mark, 2)
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
        if engine.state == "unhealthy":  # a fatal CUDA error in a batch: this process cannot serve
            raise RuntimeError(f"warm-up: {engine.state_reason}")
    engine.prompt_cache.clear()
    report.seconds = round(time.perf_counter() - started, 3)
    if watch:
        count, seconds = watch.since(compiled_before)
        report.compile = {"compiles": count, "compile_s": round(seconds, 2)}
    report.stages = {k: round(v, 3) for k, v in result.stages.items()}
    if loaded.compiled and not settings.compile_in_requests:
        import torch.compiler

        # From here a shape the warm-up did not compile (a VAE decode at a new size, say) runs
        # eagerly instead of compiling for seconds to a minute inside somebody's request.
        torch.compiler.set_stance("eager_on_recompile")
    return report
