"""Model and live system information, for /api/info and the UI's advanced tab."""

from __future__ import annotations

import os
import platform

import psutil

from app import __version__


def model_info(service) -> dict:
    settings, loaded = service.settings, service.engine.loaded
    import diffusers
    import torch

    info = {
        "version": __version__,
        "demo_model": settings.is_demo_model,
        "model_source": "tiny" if settings.is_demo_model else "directory",
        "model_dir": None if settings.model_dir is None else str(settings.model_dir),
        "model_label": service.model_label,
        "state": service.engine.state,
        "state_reason": service.engine.state_reason or None,
        "ready": service.ready,
        "draining": service.draining,
        "device": str(loaded.device) if loaded else settings.device,
        "dtype": str(loaded.dtype).replace("torch.", "") if loaded else settings.dtype,
        "vae_dtype": str(loaded.vae_dtype).replace("torch.", "") if loaded else settings.vae_dtype,
        "attention_backend": settings.attention_backend,
        "compile": loaded.compiled if loaded else settings.compile,
        "compile_backend": loaded.compile_backend if loaded else settings.compile_backend,
        "offload": settings.offload,
        "quantize": settings.quantize,  # lossy opt-ins, shown beside the images they made
        "step_cache_skips": settings.step_cache_skips,
        "max_batch": settings.max_batch,
        "load_seconds": round(loaded.load_seconds, 3) if loaded else None,
        "warmup_seconds": service.engine.warmup_seconds,
        "notes": loaded.notes if loaded else [],
        "limits": {
            "min_size": settings.min_size,
            "max_size": settings.max_size,
            "max_steps": settings.max_steps,
            "max_images": settings.max_images,
            "max_prompt_chars": settings.max_prompt_chars,
            "max_cfg": settings.max_cfg,
            "queue_size": settings.queue_size,
            "request_timeout_s": settings.request_timeout_s,
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(loaded.device if loaded else None)
    return info


def live_info(service, gpu_reader) -> dict:
    engine = service.engine
    proc = psutil.Process(os.getpid())
    vm = psutil.virtual_memory()
    info = {
        "ready": service.ready,
        "state": engine.state,
        "draining": service.draining,
        "queue_waiting": engine.waiting,
        "running": engine.running,
        "in_flight": service.in_flight,
        "heartbeat": engine.heartbeat.snapshot(),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "ram_used_bytes": vm.total - vm.available,
        "ram_total_bytes": vm.total,
        "process_rss_bytes": proc.memory_info().rss,
        "gpus": [s.as_dict() for s in gpu_reader.sample()] if gpu_reader.available else [],
        "gpu_reader": gpu_reader.reason,
    }
    info.update({f"torch_{k}": v for k, v in engine.memory().items()})
    return info
