"""Load the pipeline and apply the speed options: device, dtype, attention backend, VAE precision,
offload mode, torch.compile. The demo model and a real model directory go through the same steps."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from app.config import AppSettings
from app.runtime.compile import compile_pipeline

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadReport:
    """What a load did and where its time went: notes for /api/info and the log (fallbacks, lossy
    options), and seconds per phase (…_s) plus allocated_gib, for docs/PERFORMANCE.md."""

    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def add(self, phase: str, value: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + value

    @contextmanager
    def timed(self, phase: str):
        mark = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - mark)

    def rounded(self) -> "LoadReport":
        return LoadReport(list(self.notes), {k: round(v, 2) for k, v in self.phases.items()})


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
    report: LoadReport = field(default_factory=LoadReport)
    quantize: str = "none"
    compile_backend: str = "none"  # aot | jit | none: how the transformer blocks run
    step_cache: Optional[object] = None  # app.runtime.stepcache.StepCache where step_cache_skips > 0

    @property
    def notes(self) -> list[str]:
        return self.report.notes

    @property
    def phases(self) -> dict[str, float]:
        return self.report.phases

    def log_fields(self) -> dict:
        """What the "model loaded" log line says of it."""
        return {
            "source": self.source,
            "device": str(self.device),
            "dtype": str(self.dtype),
            "quantize": self.quantize,
            "notes": self.notes,
            "seconds": round(self.load_seconds, 2),
            **self.phases,
        }

    @property
    def exec_device(self) -> torch.device:
        """Where generators and latents live: offloaded pipelines still compute on the accelerator."""
        return self.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        from app.runtime.parallel import RankEnv

        env = RankEnv.from_env()
        if env is not None:  # context parallel: rank r computes on the r-th visible GPU
            device = torch.device("cuda", env.rank)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is Z-Image's native precision; CPUs run fp32 much faster than emulated bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def apply_memory_cap(settings: AppSettings, device: torch.device) -> bool:
    """Behave like a smaller card: the caching allocator refuses to grow past the cap."""
    if not settings.memory_cap_gib or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, settings.memory_cap_gib * 2**30 / total), index)
    return True


def start_weight_prefetch(settings: AppSettings) -> bool:
    """Begin reading the big components' weights now, on a background thread, when the fast loader
    will want them (a model directory, nothing offloaded, a GPU). Called by `python -m app` before it
    imports the web stack; load_pipeline picks the reads up later."""
    if settings.model_dir is None or not settings.fast_load or settings.offload != "none":
        return False
    try:
        device = resolve_device(settings.device)
        if device.type != "cuda":
            return False
        from app.runtime.fastload import start_prefetch

        apply_memory_cap(settings, device)
        start_prefetch(settings.model_dir, device)
    except Exception as exc:  # the engine's own load reports the problem properly (readiness, reason)
        log.warning(
            "weight prefetch not started", extra={"event": "prefetch_skipped", "error": str(exc)[:300]}
        )
        return False
    return True


def load_pipeline(settings: AppSettings) -> LoadedPipeline:
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    vae_dtype = dtype if settings.vae_dtype == "auto" else _DTYPES[settings.vae_dtype]
    report = LoadReport()
    if apply_memory_cap(settings, device):
        report.note(f"GPU memory capped at {settings.memory_cap_gib:g} GiB")

    if settings.model_dir is None:
        from app.runtime.tiny import build_tiny_pipeline

        log.warning(
            "no model_dir configured: serving the built-in random-weight DEMO model (not Z-Image-Turbo)",
            extra={"event": "demo_model"},
        )
        pipe = build_tiny_pipeline(dtype=dtype)
        source = "tiny"
    else:
        log.info("loading model", extra={"event": "model_loading", "model_dir": str(settings.model_dir)})
        with report.timed("import_s"):  # on its own: seconds of a cold start are imports
            from diffusers import ZImagePipeline  # noqa: F401
            from transformers import PreTrainedModel  # noqa: F401
        with report.timed("cuda_init_s"):
            if device.type == "cuda":
                torch.cuda.init()
        with report.timed("read_s"):
            pipe = _from_directory(settings, device, dtype, report)
        source = str(settings.model_dir)
        pipe.set_progress_bar_config(disable=True)

    with report.timed("place_s"):
        pipe.vae.to(vae_dtype)
        _place(pipe, settings.offload, device, report)

    if settings.attention_backend != "native":
        try:
            pipe.transformer.set_attention_backend(settings.attention_backend)
        except Exception as exc:  # an unavailable kernel is a config error, said clearly
            raise RuntimeError(
                f"attention backend {settings.attention_backend!r} unavailable: {exc}"
            ) from exc

    if settings.parallel == "context":
        from app.runtime import parallel

        env = parallel.RankEnv.from_env()
        if env is None:
            raise RuntimeError("parallel = 'context' needs the ranks python -m app starts (app/ranks.py)")
        with report.timed("parallel_join_s"):
            parallel.join_group(env, device)
        report.note(parallel.enable(pipe.transformer, device, env.world_size, settings.parallel_attention))

    if settings.quantize == "fp8":
        from app.runtime.fp8 import fp8_matmul_supported, quantize_transformer

        with report.timed("quantize_s"):
            count = quantize_transformer(pipe.transformer, min_features=min(512, pipe.transformer.config.dim))
        report.note(
            f"FP8 linear layers: {count}"
            + ("" if fp8_matmul_supported(device) else " (emulated: no FP8 matmul here)")
        )

    if device.type == "cuda":
        report.add("allocated_gib", torch.cuda.memory_allocated(device) / 2**30)
    compiled = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda")
    backend = "none"
    if compiled:
        with report.timed("compile_setup_s"):
            backend = compile_pipeline(pipe, settings, device, dtype, report)
    step_cache = None
    if settings.step_cache_skips:
        from app.runtime import stepcache

        step_cache = stepcache.StepCache(settings.step_cache_skips)
        stepcache.install(pipe.transformer, step_cache)
        report.note(
            f"step cache: up to {settings.step_cache_skips} of each generation's steps reuse the "
            "main layers' previous residual (lossy)"
        )
    if _graph_text_encoder(settings, device, compiled):
        from app.runtime import encoder_graph

        encoder_graph.install(pipe.text_encoder)
        report.note("text encoder: CUDA graph per batch size (captured at its first use)")
    return LoadedPipeline(
        pipe=pipe,
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        compiled=compiled,
        compile_backend=backend,
        attention_backend=settings.attention_backend,
        offload=settings.offload,
        source=source,
        load_seconds=time.perf_counter() - started,
        report=report.rounded(),
        quantize=settings.quantize,
        step_cache=step_cache,
    )


def _graph_text_encoder(settings: AppSettings, device: torch.device, compiled: bool) -> bool:
    """CUDA graphs need the encoder's weights to stay where they are (no offload hooks moving
    them) and do not mix with a torch.compile'd encoder."""
    return (
        settings.text_encoder_graph
        and device.type == "cuda"
        and settings.offload == "none"
        and not (compiled and settings.compile_text_encoder)
    )


def _from_directory(settings: AppSettings, device: torch.device, dtype: torch.dtype, report: LoadReport):
    """from_pretrained, except that when everything stays on one device the two big components
    (transformer 12 GiB, text encoder 8 GiB) are read by app/runtime/fastload.py, concurrently: large
    sequential reads into pinned buffers, straight to the GPU, started under the process's imports
    (diffusers' own loader was the longest part of a cold start; figures in docs/PERFORMANCE.md)."""
    from diffusers import ZImagePipeline

    kwargs = {"dtype": dtype}  # diffusers 0.42 renamed torch_dtype (removed in 1.0)
    if settings.offload == "none":
        if settings.fast_load:
            try:
                with report.timed("build_big_s"):
                    kwargs.update(_read_big_components(settings.model_dir, device, dtype))
            except Exception as exc:  # a layout we do not know: the library's loader reads everything
                from app.runtime.fastload import discard_prefetch

                discard_prefetch()  # reads nobody will take would hold GPU memory for good
                report.note(f"fast load skipped ({exc.__class__.__name__}: {exc})")
                log.warning(
                    "fast load failed; using from_pretrained",
                    extra={"event": "fast_load_failed", "error": str(exc)[:300]},
                )
        if device.type == "cuda":
            # What is left (VAE, or everything after a fallback): file → GPU, not file → CPU → GPU.
            kwargs["device_map"] = "cuda" if device.index is None else f"cuda:{device.index}"
    try:
        with report.timed("from_pretrained_s"):
            return ZImagePipeline.from_pretrained(str(settings.model_dir), **kwargs)
    except (TypeError, ValueError, NotImplementedError) as exc:
        if "device_map" not in kwargs:
            raise
        report.note(f"device_map load unavailable ({exc.__class__.__name__}); loaded on CPU then moved")
        kwargs.pop("device_map")
        return ZImagePipeline.from_pretrained(str(settings.model_dir), **kwargs)


def _read_big_components(model_dir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """The classes model_index.json names (diffusers' transformer, transformers' text encoder)."""
    import concurrent.futures as cf
    import importlib
    import json

    from app.runtime.fastload import build_model, take_prefetched

    index = json.loads((model_dir / "model_index.json").read_text())
    with cf.ThreadPoolExecutor(2, thread_name_prefix="load") as pool:
        futures = {}
        for name in ("transformer", "text_encoder"):
            library, class_name = index[name]
            cls = getattr(importlib.import_module(library), class_name)
            futures[name] = pool.submit(
                build_model, cls, model_dir / name, device, dtype, take_prefetched(model_dir, name)
            )
        return {name: future.result() for name, future in futures.items()}


def _place(pipe, offload: str, device: torch.device, report: LoadReport) -> None:
    if device.type != "cuda":
        pipe.to(device)
        if offload != "none":
            report.note(f"offload={offload} ignored on {device.type}")
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
        apply_group_offloading(
            pipe.text_encoder,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
