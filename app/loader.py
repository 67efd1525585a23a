"""Load the pipeline and apply the speed options: device, dtype, attention backend, VAE precision,
offload mode, torch.compile. The demo model and a real model directory go through the same steps."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from app.config import AppSettings

log = logging.getLogger("app.loader")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedPipeline:
    pipe: object
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    compiled: bool
    attention_backend: str
    offload: str
    source: str  # "tiny" or the model directory
    load_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def exec_device(self) -> torch.device:
        """Where generators and latents live: offloaded pipelines still compute on the accelerator."""
        return self.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is Z-Image's native precision; CPUs run fp32 much faster than emulated bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _configure_compile_cache(settings: AppSettings) -> None:
    """Inductor's on-disk caches make the second start of a process reuse compiled kernels."""
    settings.compile_cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.compile_cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(settings.compile_cache_dir / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def load_pipeline(settings: AppSettings) -> LoadedPipeline:
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    vae_dtype = dtype if settings.vae_dtype == "auto" else _DTYPES[settings.vae_dtype]
    notes: list[str] = []
    if settings.memory_cap_gib and device.type == "cuda":
        # Behave like a smaller card: the caching allocator refuses to grow past the cap.
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, settings.memory_cap_gib * 2**30 / total), index)
        notes.append(f"GPU memory capped at {settings.memory_cap_gib:g} GiB")

    if settings.model_dir is None:
        from app.tiny import build_tiny_pipeline

        log.warning("no model_dir configured: serving the built-in random-weight DEMO model (not Z-Image-Turbo)",
                    extra={"event": "demo_model"})
        pipe = build_tiny_pipeline(dtype=dtype)
        source = "tiny"
    else:
        from diffusers import ZImagePipeline

        log.info("loading model", extra={"event": "model_loading", "model_dir": str(settings.model_dir)})
        kwargs = {"torch_dtype": dtype}
        if device.type == "cuda" and settings.offload == "none":
            # Load safetensors straight onto the GPU instead of CPU first and then .to(): one copy, not two.
            kwargs["device_map"] = "cuda" if device.index is None else f"cuda:{device.index}"
        try:
            pipe = ZImagePipeline.from_pretrained(str(settings.model_dir), **kwargs)
        except (TypeError, ValueError, NotImplementedError) as exc:
            if "device_map" not in kwargs:
                raise
            notes.append(f"device_map load unavailable ({exc.__class__.__name__}); loaded on CPU then moved")
            kwargs.pop("device_map")
            pipe = ZImagePipeline.from_pretrained(str(settings.model_dir), **kwargs)
        source = str(settings.model_dir)
        pipe.set_progress_bar_config(disable=True)

    pipe.vae.to(vae_dtype)
    _place(pipe, settings.offload, device, notes)

    if settings.attention_backend != "native":
        try:
            pipe.transformer.set_attention_backend(settings.attention_backend)
        except Exception as exc:  # an unavailable kernel is a config error, said clearly
            raise RuntimeError(f"attention backend {settings.attention_backend!r} unavailable: {exc}") from exc

    compiled = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda")
    if compiled:
        _configure_compile_cache(settings)
        # Regional compilation: the 30 identical transformer blocks compile once and are reused,
        # which is most of full-graph speed at a fraction of the compile time. dynamic=None lets
        # dynamo mark the sequence length dynamic after the first change: the caption length differs
        # with every prompt, and static shapes would recompile per prompt (seen on the H100: the
        # recompile limit was hit after 8 prompts and requests failed).
        import torch._dynamo as dynamo  # (a bare `import torch._dynamo` would make `torch` local here)

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=None, mode=settings.compile_mode)
    return LoadedPipeline(
        pipe=pipe, device=device, dtype=dtype, vae_dtype=vae_dtype, compiled=compiled,
        attention_backend=settings.attention_backend, offload=settings.offload, source=source,
        load_seconds=time.perf_counter() - started, notes=notes,
    )


def _place(pipe, offload: str, device: torch.device, notes: list[str]) -> None:
    if device.type != "cuda":
        pipe.to(device)
        if offload != "none":
            notes.append(f"offload={offload} ignored on {device.type}")
        return
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "text-encoder":
        # Transformer and VAE stay resident; the text encoder lives in pinned CPU memory and streams
        # onto the GPU block by block while it runs, overlapping copies with compute.
        from diffusers.hooks import apply_group_offloading

        pipe.transformer.to(device)
        pipe.vae.to(device)
        apply_group_offloading(pipe.text_encoder, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)
