"""Model and live system information, for /api/info and the UI's advanced tab."""

from __future__ import annotations

import os
import platform

import psutil

from app import __version__


def model_info(service) -> dict:
    settings, status = service.settings, service.engine.status()
    model = status.model
    import diffusers
    import torch

    info = {
        "version": __version__,
        "demo_model": settings.is_demo_model,
        "model_source": "tiny" if settings.is_demo_model else "directory",
        "model_dir": None if settings.model_dir is None else str(settings.model_dir),
        "model_label": service.model_label,
        "state": status.state,
        "state_reason": status.reason,
        "ready": service.ready,
        "draining": service.draining,
        "device": model.device if model else settings.device,
        "dtype": model.dtype if model else settings.dtype,
        "vae_dtype": model.vae_dtype if model else settings.vae_dtype,
        "attention_backend": settings.attention_backend,
        "compile": model.compiled if model else settings.compile,
        "compile_backend": model.compile_backend if model else settings.compile_backend,
        "offload": settings.offload,
        "quantize": settings.quantize,  # lossy opt-ins, shown beside the images they made
        "step_cache_skips": settings.step_cache_skips,
        "loras": status.loras,  # None without lora_dir
        "max_batch": settings.max_batch,
        "load_seconds": model.load_seconds if model else None,
        "warmup_seconds": status.warmup_seconds,
        "notes": list(model.notes) if model else [],
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
        info["gpu_name"] = torch.cuda.get_device_name(model.device if model else None)
    return info


def live_info(service, gpu_reader) -> dict:
    engine = service.engine
    status = engine.status()
    proc = psutil.Process(os.getpid())
    vm = psutil.virtual_memory()
    info = {
        "ready": service.ready,
        "state": status.state,
        "draining": service.draining,
        "queue_waiting": status.waiting,
        "running": status.running,
        "in_flight": service.in_flight,
        "heartbeat": status.heartbeat,
        "cpu_percent": psutil.cpu_percent(interval=None),
        "ram_used_bytes": vm.total - vm.available,
        "ram_total_bytes": vm.total,
        "process_rss_bytes": proc.memory_info().rss,
        "gpus": [s.as_dict() for s in gpu_reader.sample()] if gpu_reader.available else [],
        "gpu_reader": gpu_reader.reason,
    }
    info.update({f"torch_{k}": v for k, v in engine.memory().items()})
    return info
