"""What a failed generation means, and what the user and the log are told.

A CUDA OOM fails only the batch that hit it (the process keeps serving); an unrecoverable CUDA
error (common/cuda_markers.py) means the process must be replaced; anything else fails the batch.
A request that had to compile is not a failure, but it is said loudly."""

from __future__ import annotations

import logging

from app import errors
from app.runtime.jobs import Job
from common.cuda_markers import FATAL_CUDA_MARKERS

log = logging.getLogger(__name__)


def out_of_memory(batch: list[Job], exc: BaseException, probe: bool, min_size: int) -> errors.ServiceError:
    if probe:
        # Not torch's words: the monitor restarts on them, and a warm-up that meets them at
        # every start would restart the app in a loop on a card too small for the batch.
        return errors.OutOfMemory("the warm-up batch did not fit in GPU memory")
    p = batch[0].params
    # The log line keeps torch's own words: operators grep for them and the monitor counts them.
    log.error(
        "CUDA out of memory during generation; cache freed, request failed, still serving",
        extra={
            "event": "oom",
            "request_ids": [j.request_id for j in batch],
            "width": p.width,
            "height": p.height,
            "images": sum(j.params.num_images for j in batch),
            "error": str(exc)[:300],
        },
    )
    smaller = max(min_size, (min(p.width, p.height) // 2) // 64 * 64)
    return errors.OutOfMemory(
        "the GPU ran out of memory for this request",
        hint=f"try a smaller size (e.g. {smaller}x{smaller}) or fewer images",
        retry_after_s=5,
    )


def is_fatal(exc: BaseException) -> bool:
    text = f"{exc.__class__.__name__}: {exc}"
    return any(marker in text for marker in FATAL_CUDA_MARKERS)


def fatal_cuda_error(exc: BaseException) -> errors.ServiceError:
    log.critical(
        "unrecoverable CUDA error; engine unhealthy, process must be replaced",
        extra={"event": "cuda_fatal", "error": f"{exc.__class__.__name__}: {exc}"[:500]},
    )
    return errors.EngineUnhealthy("the GPU failed; the service is restarting", retry_after_s=30)


def parallel_generation_failed(batch: list[Job], exc: BaseException) -> errors.ServiceError:
    log.critical(
        "generation failed on a context-parallel group; the ranks may be out of step, so the "
        "engine is unhealthy and the group must be restarted",
        exc_info=exc,
        extra={"event": "parallel_failed", "request_ids": [j.request_id for j in batch]},
    )
    return errors.EngineUnhealthy(
        "a generation failed across GPUs; the service is restarting", retry_after_s=30
    )


def generation_failed(batch: list[Job], exc: BaseException) -> errors.ServiceError:
    if isinstance(exc, errors.ServiceError):  # the request's own fault, told as such (a LoRA refused)
        log.warning(
            "request refused",
            extra={
                "event": "request_refused",
                "code": exc.code,
                "request_ids": [j.request_id for j in batch],
            },
        )
        return exc
    log.error(
        "generation failed",
        exc_info=exc,
        extra={"event": "generation_failed", "request_ids": [j.request_id for j in batch]},
    )
    return errors.GenerationFailed(f"generation failed: {exc.__class__.__name__}")


def compiled_in_request(batch: list[Job], count: int, seconds: float) -> None:
    """A request that had to compile waited seconds (a minute with an empty cache) for it: the
    warm-up is meant to have compiled every shape a request can bring."""
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
