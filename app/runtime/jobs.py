"""What goes into the engine and what comes out: a generation's parameters, a queued job, its
result, and the engine's status snapshot for the web side."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional


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
    init_image: Optional[object] = None  # PIL image at width×height: image-to-image
    mask_image: Optional[object] = None  # PIL "L" image at width×height: inpainting (white repaints)
    strength: float = 1.0
    loras: tuple = ()  # ((name, scale), …): merged into the weights for this request (lora_merge.py)

    @property
    def forwards(self) -> int:
        """Transformer forwards this request runs: image-to-image skips the first (1 − strength)
        of the schedule (diffusers' get_timesteps)."""
        n = self.num_inference_steps
        return n if self.init_image is None else n - int(max(n - n * self.strength, 0))

    @property
    def mode(self) -> str:
        return (
            "inpaint"
            if self.mask_image is not None
            else "img2img"
            if self.init_image is not None
            else "text2img"
        )

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call without changing their images (an
        image-to-image request never does: its own image is part of the call; LoRAs are the weights)."""
        key = (self.width, self.height, self.num_inference_steps, self.cfg_scale, self.loras)
        return key if self.mode == "text2img" else key + (self.mode, id(self))


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
    abandoned: threading.Event = field(default_factory=threading.Event)  # nobody waits: stop early
    cancelled: threading.Event = field(default_factory=threading.Event)  # a user asked: say so
    started_at: Optional[float] = None
    priority: int = 1  # 0: health checks (the monitor's warm-up) go before user work
    seq: int = 0
    steps_done: int = 0  # denoising steps of this job's batch finished so far
    on_step: Optional[Callable[[int], None]] = None  # told steps_done after each step (engine thread)
    labels: dict = field(default_factory=dict)  # the caller's own notes (the web side: input hashes)


def resolve(future: Future, outcome) -> None:
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


@dataclass(frozen=True)
class ModelFacts:
    """How the loaded model runs, for /api/info, the UI and the metrics."""

    source: str  # "tiny" or the model directory
    device: str
    dtype: str
    vae_dtype: str
    compiled: bool
    compile_backend: str  # aot | jit | none
    load_seconds: float
    notes: tuple[str, ...]


@dataclass(frozen=True)
class EngineStatus:
    """One consistent read of the engine, everything the web side may know about it."""

    state: str  # starting, loading, warming, ready, failed, unhealthy, stopped
    reason: Optional[str]
    waiting: int
    running: int
    heartbeat: dict  # common.heartbeat.Heartbeat as a dict (the monitor reads it from /healthz)
    warmup_seconds: Optional[float]
    compiles_after_warmup: int
    model: Optional[ModelFacts]  # None until loaded
    step_cache: Optional[dict] = None  # {"reused", "computed"} where the lossy step cache is on
    loras: Optional[dict] = None  # LoraSet.status() where lora_dir is set: loaded, merged, bytes
    self_checks: Optional[dict] = None  # {"passed", "failed"}: app/runtime/selfcheck.py, since start

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def alive(self) -> bool:
        return self.state not in ("failed", "unhealthy")
