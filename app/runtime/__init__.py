"""The model runtime: loads the Z-Image pipeline, warms it up and runs generations on one thread.

This is the whole surface the web side (app/web/) may use; everything else in app/runtime/ is the
runtime's own business (tests of the runtime import its modules directly)."""

from app.runtime.engine import Engine
from app.runtime.faults import FaultInjector
from app.runtime.follower import serve_follower
from app.runtime.jobs import EngineStatus, GenerationParams, JobResult, ModelFacts
from app.runtime.loader import LoadReport, start_weight_prefetch
from app.runtime.lora import LoraLibrary
from app.runtime.stepcache import skipped_steps

__all__ = [
    "Engine",
    "EngineStatus",
    "FaultInjector",
    "GenerationParams",
    "JobResult",
    "LoadReport",
    "LoraLibrary",
    "ModelFacts",
    "serve_follower",
    "skipped_steps",
    "start_weight_prefetch",
]
