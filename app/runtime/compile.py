"""Compile where it pays: AOT packages of the transformer blocks and the VAE decoder
(app/runtime/aot/), else torch.compile's regional compilation; and the on-disk caches that make
the next start reuse the compiled code."""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING

import torch

from app.config import CUDA_GRAPH_MODES, AppSettings

if TYPE_CHECKING:
    from app.runtime.loader import LoadReport

log = logging.getLogger(__name__)


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
    torch: seconds of every start (a minute on a fresh machine; docs/PERFORMANCE.md), for CPU code
    a GPU deployment never runs. Inductor's own switch for this, cpp.vec_isa_ok, is not honoured on
    that path in torch 2.11, so the check itself trusts the CPU's flags (what torch 2.13 does with
    vec_isa_ok = True). GPU machines only: CPU deployments run the C++ this check is for. The child
    that loads a new AOT package first (app/runtime/aot/verify.py) calls it too, for the same reason."""
    import torch._inductor.config as inductor_config
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    if inductor_config.cpp.vec_isa_ok is None:
        inductor_config.cpp.vec_isa_ok = True
    if inductor_config.cpp.vec_isa_ok:
        cpu_vec_isa.VecISA.check_build = lambda self, code: True


def compile_pipeline(
    pipe, settings: AppSettings, device: torch.device, dtype: torch.dtype, report: "LoadReport"
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
    if settings.parallel == "context" and settings.compile_backend == "aot":
        # An AOT package is one GPU's block: the context-parallel attention (all-to-all) is not in it.
        report.note("transformer blocks: torch.compile (AOT packages are single-GPU; parallel = context)")
    elif settings.compile_backend == "aot":
        backend = "aot" if _install_aot(pipe, settings, device, dtype, report) else "jit"
    if backend == "jit":
        _compile_blocks_jit(pipe, settings)
    if (
        settings.compile_text_encoder and settings.offload == "none"
    ):  # (group-offload hooks and compile do not mix)
        # The pipeline pads every prompt to 512 tokens: one static shape per batch size. Off by
        # default: compiled encoding was no reliably faster (the tokenizer and mask building
        # dominate) for seconds more warm-up (docs/PERFORMANCE.md).
        for layer in pipe.text_encoder.layers:
            layer.compile(fullgraph=False, dynamic=None, mode=_without_graphs(settings.compile_mode))
    if settings.compile_vae and not (
        backend == "aot" and _install_aot_decoder(pipe, settings, device, report)
    ):
        # Static shapes: dynamic VAE graphs took 17-21 s to load from a warm cache at start-up (static:
        # ~2 s) and still recompiled per size. Sizes the warm-up did not decode run eagerly (+50 ms).
        pipe.vae.decoder.compile(fullgraph=False, dynamic=False, mode=_without_graphs(settings.compile_mode))
    return backend


def _install_aot(
    pipe, settings: AppSettings, device: torch.device, dtype: torch.dtype, load: "LoadReport"
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
            _note_aot(report, "transformer blocks", load)
            load.note(
                f"transformer blocks: AOT packages ({len(report.loaded)} kinds, {report.blocks} blocks)"
            )
            return True
    load.note(f"transformer blocks: torch.compile (AOT unavailable: {reason})")
    return False


def _install_aot_decoder(pipe, settings: AppSettings, device: torch.device, load: "LoadReport") -> bool:
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
    _note_aot(report, "VAE decoder", load)
    load.note(f"VAE decoder: AOT package for {side * pipe.vae_scale_factor}² (other sizes eager)")
    return True


def _note_aot(report, part: str, load: "LoadReport") -> None:
    load.add("aot_load_s", report.load_s)
    if report.compiled:
        load.add("aot_compile_s", report.compile_s)
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
    # image size with every preset; static shapes recompiled per prompt (on a GPU the recompile
    # limit was hit after a few prompts and requests failed), and "auto" left that change to a request.
    dynamic = {"auto": None, "on": True, "off": False}[settings.compile_dynamic]
    if dynamic:
        configure_dynamic_compile()
    pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic, mode=settings.compile_mode)
    if settings.compile_mode in CUDA_GRAPH_MODES:
        copy_block_outputs(pipe.transformer)


def copy_block_outputs(transformer) -> None:
    """Each block's output copied out of its CUDA graph's memory as the call returns, outside the
    compiled region. All 30 main blocks replay graphs of one compiled function, and a replay
    overwrites the output of the replay before it: the caption refiner's output, still waiting while
    the noise refiner's blocks run, would be read overwritten (torch 2.11 raises on it). One device
    copy per block call (~2 GB a step at 1024²: under a millisecond on an H200). The class keeps
    its name, which the FP8 and AOT code look blocks up by."""
    names = set(getattr(transformer, "_repeated_blocks", ()))
    for module in transformer.modules():
        if type(module).__name__ in names and not getattr(type(module), "copies_output", False):
            module.__class__ = _output_copying(type(module))


@functools.cache
def _output_copying(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        return cls.__call__(self, *args, **kwargs).clone()

    return type(
        cls.__name__, (cls,), {"__call__": __call__, "copies_output": True, "__module__": cls.__module__}
    )


def _without_graphs(mode: str) -> str:
    """The text encoder's and the decoder's mode: their layers' outputs would need the same copying
    as the blocks' for little gain (the encoder has a graph of its own, app/runtime/encoder_graph.py;
    a decode is compute-bound), so CUDA graphs are left to the blocks."""
    return CUDA_GRAPH_MODES.get(mode, mode)


def configure_dynamic_compile() -> None:
    """Dynamo's process-wide settings for the blocks' dynamic-shape graphs (ops/lab/cp_profile.py
    compiles with the same)."""
    import torch.fx.experimental._config as fx_config

    # Dynamic sizes still specialise on 1: a graph made for one image recompiled for two.
    # Size-oblivious reasoning keeps the batch size symbolic: on the CPU one graph then serves
    # 1-4 images; on a GPU an Inductor guard still splits 1 from 2+, which the warm-up's
    # 2-image request covers (docs/PERFORMANCE.md). The CPU compile test checks the pixels.
    fx_config.backed_size_oblivious = True
    # Sizes that happen to be equal at the first call are not tied together (dynamo's "duck
    # shaping"): tied, what pins one pins the other. The demo model's 64-token caption beside its
    # 64-wide hidden size made the caption refiner a graph for 64 tokens only, so after the
    # warm-up every prompt of another length ran that block eagerly, silently; on the real model
    # a 256² warm-up ties the noise refiner's 256 image tokens to the 256-wide time embedding.
    # tests/app/test_compile.py compiles in requests to catch such a graph.
    fx_config.use_duck_shape = False
    import torch._dynamo.config as dynamo_config

    # Floats are constants, not graph inputs. Dynamic compiles otherwise make every float a
    # block reads (each RMSNorm's eps, dropout's p: 7 per block) an input that each call turns
    # into a tensor and guards: 34 block calls a step, 2.3-5 ms of the CPU's time per step on
    # the H200 (docs/PERFORMANCE.md), which counts wherever the GPU waits for the CPU (small
    # images, context parallelism). They never change, so nothing recompiles for them.
    dynamo_config.specialize_float = True
