"""Load the pipeline and apply the speed options: device, dtype, attention backend, VAE precision,
offload mode, torch.compile. The demo model and a real model directory go through the same steps."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from app.config import AppSettings

log = logging.getLogger("app.runtime.loader")

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
    quantize: str = "none"
    compile_backend: str = "none"  # aot | jit | none: how the transformer blocks run
    step_cache: Optional[object] = None  # app.runtime.stepcache.StepCache where step_cache_skips > 0
    phases: dict[str, float] = field(default_factory=dict)  # where start-up time went (…_s) and allocated_gib

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


def _configure_compile_cache(settings: AppSettings) -> None:
    """Inductor's on-disk caches make the next start of a process reuse compiled kernels.
    Assigned, not setdefault: torch writes its default into TORCHINDUCTOR_CACHE_DIR the first time
    anything asks for the cache dir (an import can), and a setdefault after that silently kept
    the caches in /tmp (caught by tests/app/test_compile.py)."""
    settings.compile_cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.compile_cache_dir / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(settings.compile_cache_dir / "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def trust_cpu_vector_flags() -> None:
    """Inductor asks which CPU vector ISA to generate C++ for (loading an AOT package asks too) and
    finds out by building a test library per ISA and loading each in a child Python that imports
    torch: 15 s of every start on the lent H100 (torch 2.11), 60 s on a fresh machine, for CPU code
    a GPU deployment never runs. Inductor's own switch for this, cpp.vec_isa_ok, is not honoured on
    that path in torch 2.11, so the check itself trusts the CPU's flags (what torch 2.13 does with
    vec_isa_ok = True). GPU machines only: CPU deployments run the C++ this check is for. The child
    that loads a new AOT package first (app/runtime/aot_verify.py) calls it too: without it, each child
    check took ~20 s of the first start on the H100."""
    import torch._inductor.config as inductor_config
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    if inductor_config.cpp.vec_isa_ok is None:
        inductor_config.cpp.vec_isa_ok = True
    if inductor_config.cpp.vec_isa_ok:
        cpu_vec_isa.VecISA.check_build = lambda self, code: True


def load_pipeline(settings: AppSettings) -> LoadedPipeline:
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    vae_dtype = dtype if settings.vae_dtype == "auto" else _DTYPES[settings.vae_dtype]
    notes: list[str] = []
    phases: dict[str, float] = {}
    if apply_memory_cap(settings, device):
        notes.append(f"GPU memory capped at {settings.memory_cap_gib:g} GiB")

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
        mark = time.perf_counter()
        from diffusers import ZImagePipeline  # noqa: F401  (timed on its own: seconds of a cold start are imports)
        from transformers import PreTrainedModel  # noqa: F401

        phases["import_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.init()
        phases["cuda_init_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        pipe = _from_directory(settings, device, dtype, notes, phases)
        phases["read_s"] = time.perf_counter() - mark
        source = str(settings.model_dir)
        pipe.set_progress_bar_config(disable=True)

    mark = time.perf_counter()
    pipe.vae.to(vae_dtype)
    _place(pipe, settings.offload, device, notes)
    phases["place_s"] = time.perf_counter() - mark

    if settings.attention_backend != "native":
        try:
            pipe.transformer.set_attention_backend(settings.attention_backend)
        except Exception as exc:  # an unavailable kernel is a config error, said clearly
            raise RuntimeError(
                f"attention backend {settings.attention_backend!r} unavailable: {exc}"
            ) from exc

    if settings.quantize == "fp8":
        from app.runtime.fp8 import fp8_matmul_supported, quantize_transformer

        mark = time.perf_counter()
        count = quantize_transformer(pipe.transformer, min_features=min(512, pipe.transformer.config.dim))
        phases["quantize_s"] = time.perf_counter() - mark
        notes.append(
            f"FP8 linear layers: {count}"
            + ("" if fp8_matmul_supported(device) else " (emulated: no FP8 matmul here)")
        )

    if device.type == "cuda":
        phases["allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    compiled = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda")
    backend = "none"
    if compiled:
        mark = time.perf_counter()
        backend = compile_pipeline(pipe, settings, device, dtype, notes, phases)
        phases["compile_setup_s"] = time.perf_counter() - mark
    step_cache = None
    if settings.step_cache_skips:
        from app.runtime import stepcache

        step_cache = stepcache.StepCache(settings.step_cache_skips)
        stepcache.install(pipe.transformer, step_cache)
        notes.append(
            f"step cache: up to {settings.step_cache_skips} of each generation's steps reuse the "
            "main layers' previous residual (lossy)"
        )
    if _graph_text_encoder(settings, device, compiled):
        from app.runtime import encoder_graph

        encoder_graph.install(pipe.text_encoder)
        notes.append("text encoder: CUDA graph per batch size (captured at its first use)")
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
        notes=notes,
        quantize=settings.quantize,
        step_cache=step_cache,
        phases={k: round(v, 2) for k, v in phases.items()},
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


def _from_directory(
    settings: AppSettings,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str],
    phases: dict[str, float],
):
    """from_pretrained, except that when everything stays on one device the two big components
    (transformer 12 GiB, text encoder 8 GiB) are read by app/runtime/fastload.py, concurrently: large
    sequential reads into pinned buffers, straight to the GPU, started under the process's imports
    (diffusers' own loader spent 18.8 s on this on the H100; docs/PERFORMANCE.md)."""
    from diffusers import ZImagePipeline

    kwargs = {"torch_dtype": dtype}
    if settings.offload == "none":
        if settings.fast_load:
            try:
                mark = time.perf_counter()
                kwargs.update(_read_big_components(settings.model_dir, device, dtype))
                phases["build_big_s"] = time.perf_counter() - mark
            except Exception as exc:  # a layout we do not know: the library's loader reads everything
                from app.runtime.fastload import discard_prefetch

                discard_prefetch()  # reads nobody will take would hold GPU memory for good
                notes.append(f"fast load skipped ({exc.__class__.__name__}: {exc})")
                log.warning(
                    "fast load failed; using from_pretrained",
                    extra={"event": "fast_load_failed", "error": str(exc)[:300]},
                )
        if device.type == "cuda":
            # What is left (VAE, or everything after a fallback): file → GPU, not file → CPU → GPU.
            kwargs["device_map"] = "cuda" if device.index is None else f"cuda:{device.index}"
    try:
        mark = time.perf_counter()
        pipe = ZImagePipeline.from_pretrained(str(settings.model_dir), **kwargs)
        phases["from_pretrained_s"] = time.perf_counter() - mark
        return pipe
    except (TypeError, ValueError, NotImplementedError) as exc:
        if "device_map" not in kwargs:
            raise
        notes.append(f"device_map load unavailable ({exc.__class__.__name__}); loaded on CPU then moved")
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


def compile_pipeline(
    pipe,
    settings: AppSettings,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str],
    phases: dict[str, float],
) -> str:
    """Compile where it pays; returns how the transformer blocks run ("aot" or "jit"). Compiled code
    is cached on disk under compile_cache_dir for the next start: AOT packages are made here (once
    per GPU/torch/architecture), torch.compile's graphs at the first call of each shape (the warm-up)."""
    _configure_compile_cache(settings)
    if device.type == "cuda":
        trust_cpu_vector_flags()
    import torch._dynamo as dynamo  # (a bare `import torch._dynamo` would make `torch` local here)

    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    backend = "jit"
    if settings.compile_backend == "aot":
        backend = "aot" if _install_aot(pipe, settings, device, dtype, notes, phases) else "jit"
    if backend == "jit":
        _compile_blocks_jit(pipe, settings)
    if (
        settings.compile_text_encoder and settings.offload == "none"
    ):  # (group-offload hooks and compile do not mix)
        # The pipeline pads every prompt to 512 tokens: one static shape per batch size. Off by
        # default: on the H100 encoding took 31–54 ms compiled against 46–49 ms eager (the tokenizer
        # and mask building dominate), for 10–20 s more warm-up.
        for layer in pipe.text_encoder.layers:
            layer.compile(fullgraph=False, dynamic=None, mode=settings.compile_mode)
    if settings.compile_vae and not (
        backend == "aot" and _install_aot_decoder(pipe, settings, device, notes, phases)
    ):
        # Static shapes: dynamic VAE graphs took 17-21 s to load from a warm cache at start-up (static:
        # ~2 s) and still recompiled per size. Sizes the warm-up did not decode run eagerly (+50 ms).
        pipe.vae.decoder.compile(fullgraph=False, dynamic=False, mode=settings.compile_mode)
    return backend


def _install_aot(
    pipe,
    settings: AppSettings,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str],
    phases: dict[str, float],
) -> bool:
    """The blocks' AOT packages, or False (said in the notes and the log) to fall back to
    torch.compile: a model that exports differently must still start, only slower."""
    from app.runtime import aot

    reason = aot.supported(settings.offload)
    if reason is None:
        try:
            report = aot.install(
                pipe.transformer,
                settings.compile_cache_dir,
                dtype,
                device,
                settings.quantize,
                settings.attention_backend,
            )
        except Exception as exc:
            aot.uninstall(pipe.transformer)
            reason = f"{exc.__class__.__name__}: {str(exc)[:300]}"
            log.warning(
                "AOT compile of the transformer blocks failed; using torch.compile",
                extra={"event": "aot_failed", "part": "transformer", "error": reason},
            )
        else:
            _note_aot(report, "transformer blocks", phases)
            notes.append(
                f"transformer blocks: AOT packages ({len(report.loaded)} kinds, {report.blocks} blocks)"
            )
            return True
    notes.append(f"transformer blocks: torch.compile (AOT unavailable: {reason})")
    return False


def _install_aot_decoder(
    pipe, settings: AppSettings, device: torch.device, notes: list[str], phases: dict[str, float]
) -> bool:
    from app.runtime import aot

    vae = pipe.vae
    side = settings.warmup_pixels(device.type) // pipe.vae_scale_factor
    shape = (1, vae.config.latent_channels, side, side)
    try:
        report = aot.install_decoder(vae.decoder, settings.compile_cache_dir, shape, vae.dtype, device)
    except Exception as exc:
        vae.decoder.__dict__.pop("forward", None)
        log.warning(
            "AOT compile of the VAE decoder failed; using torch.compile",
            extra={
                "event": "aot_failed",
                "part": "vae_decoder",
                "error": f"{exc.__class__.__name__}: {str(exc)[:300]}",
            },
        )
        return False
    _note_aot(report, "VAE decoder", phases)
    notes.append(f"VAE decoder: AOT package for {side * pipe.vae_scale_factor}² (other sizes eager)")
    return True


def _note_aot(report, part: str, phases: dict[str, float]) -> None:
    phases["aot_load_s"] = phases.get("aot_load_s", 0.0) + report.load_s
    if report.compiled:
        phases["aot_compile_s"] = phases.get("aot_compile_s", 0.0) + report.compile_s
        log.info(
            f"compiled the {part} ahead of time",
            extra={
                "event": "aot_compiled",
                "part": part,
                "kinds": report.compiled,
                "seconds": report.compile_s,
                "directory": report.directory,
            },
        )


def _compile_blocks_jit(pipe, settings: AppSettings) -> None:
    # Regional compilation: the 30 identical transformer blocks compile once and are reused,
    # which is most of full-graph speed at a fraction of the compile time. Dynamic shapes from the
    # first call (compile_dynamic = "on"): the caption length differs with every prompt and the
    # image size with every preset; static shapes recompiled per prompt (on the H100 the recompile
    # limit was hit after 8 prompts and requests failed), and "auto" left that change to a request.
    dynamic = {"auto": None, "on": True, "off": False}[settings.compile_dynamic]
    if dynamic:
        import torch.fx.experimental._config as fx_config

        # Dynamic sizes still specialise on 1: a graph made for one image recompiled for two.
        # Size-oblivious reasoning keeps the batch size symbolic: on the CPU one graph then serves
        # 1-4 images; on the H100 an Inductor guard still splits 1 from 2+, which the warm-up's
        # 2-image request covers (docs/PERFORMANCE.md). The CPU compile test checks the pixels.
        fx_config.backed_size_oblivious = True
    pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic, mode=settings.compile_mode)


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
        apply_group_offloading(
            pipe.text_encoder,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
