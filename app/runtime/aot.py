"""Ahead-of-time compiled transformer blocks and VAE decoder (`compile_backend = "aot"`): start-up speed.

torch.compile (the "jit" backend) keeps its kernels in an on-disk cache, but every start still
re-traces the Python of the blocks with dynamo and loads the cached graphs one by one: ~8 s of an
18-24 s warm start on the H100 (docs/PERFORMANCE.md). Here each kind of block is exported once with
torch.export (dynamic batch and sequence length) and compiled by AOTInductor into a .pt2 package
under compile_cache_dir; a later start only loads the packages (a shared library each) and no
dynamo runs at all, at start or in a request.

The 30 main blocks and the refiner blocks share one package per kind because the weights are not
baked in: the exported function takes them as inputs (torch.func.functional_call), and each block
instance calls the package with its own tensors. Kinds: with or without adaLN modulation (the
caption refiner has none) × with or without an attention mask (a batch whose prompts differ in
length carries one; a single prompt does not, and takes the faster unmasked attention kernel).

A package is keyed by everything that changes the generated code (torch/CUDA/diffusers versions,
GPU, dtype, block dimensions, FP8, attention backend), never by weight values, so a fine-tune of the
same architecture reuses it. Anything the packages do not cover (the omni model's per-token
modulation, a complex dtype other than complex64) runs the block's own eager forward.

The VAE decoder gets one static package for the warm-up's size (the default 1024²), like the
torch.compile path it replaces: dynamo re-traced it at every start (~3.5 s on the H100), and other
sizes run eagerly (+50 ms).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from app.runtime.aot_verify import cpp_compiler, load_in_child, why_failed

log = logging.getLogger("app.runtime.aot")

FORMAT = 2  # bump when the exported signature below changes: old packages are then ignored
_MAX_BATCH = 64
_MAX_SEQ = 1 << 16
_EXAMPLE_SEQ = 96  # small: export traces with fake tensors, the size only has to be unspecial


@dataclass(frozen=True)
class Kind:
    """Which package a block call needs."""

    modulated: bool
    masked: bool

    @property
    def name(self) -> str:
        return f"{'mod' if self.modulated else 'plain'}-{'mask' if self.masked else 'nomask'}"


ALL_KINDS = tuple(Kind(m, k) for m in (True, False) for k in (False, True))


def weight_names(block: nn.Module) -> list[str]:
    """The block's tensors in the order the exported function takes them."""
    return sorted([n for n, _ in block.named_parameters()] + [n for n, _ in block.named_buffers()])


def weights_of(block: nn.Module, names: list[str]) -> list[torch.Tensor]:
    tensors = dict(block.named_parameters())
    tensors.update(block.named_buffers())
    return [tensors[n] for n in names]


def rotate_real(x_in: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Z-Image's RoPE, x · e^{iθ} on (real, imag) pairs, in real arithmetic: the same fp32 products
    as diffusers' complex multiply, but without complex tensors, which Inductor does not generate
    code for. Complex ops in a package run through AOTInductor's proxy executor: on the H100 such a
    package took ~5 s to load and crashed a process that loaded it before importing diffusers.
    x_in (B, S, H, D); freqs (B, S, D/2, 2) as torch.view_as_real gives them."""
    x = x_in.float().unflatten(-1, (-1, 2))
    xr, xi = x[..., 0], x[..., 1]
    fr, fi = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)
    return torch.stack((xr * fr - xi * fi, xr * fi + xi * fr), dim=-1).flatten(3).type_as(x_in)


class RealRopeAttnProcessor:
    """diffusers' ZSingleStreamAttnProcessor (0.42) with rotate_real for its complex RoPE; used only
    while a block is exported. `freqs_cis` keeps its name: Attention passes it on by name."""

    def __init__(self, backend=None):
        self.backend = backend  # the attention backend the replaced processor was set to

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotate_real(query, freqs_cis), rotate_real(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]  # (B, S) → broadcast over heads and queries
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self.backend
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


class _ExportedCall(nn.Module):
    """The function a package holds: (x, [mask], freqs as real pairs, [adaln], weights) → x."""

    def __init__(self, block: nn.Module, names: list[str], kind: Kind):
        super().__init__()
        self.block, self.names, self.kind = block, names, kind

    def forward(self, x, mask, freqs_real, adaln, weights):
        params = dict(zip(self.names, weights))
        args = (x, mask, freqs_real)
        if self.kind.modulated:
            args = args + (adaln,)
        return torch.func.functional_call(self.block, params, args)


def _examples(block: nn.Module, kind: Kind, dtype: torch.dtype, device: torch.device, names: list[str]):
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=_MAX_BATCH), Dim("seq", min=2, max=_MAX_SEQ)
    dim, head_dim = block.dim, block.head_dim
    x = torch.randn(2, _EXAMPLE_SEQ, dim, dtype=dtype, device=device)
    mask = torch.ones(2, _EXAMPLE_SEQ, dtype=torch.bool, device=device) if kind.masked else None
    freqs = torch.randn(2, _EXAMPLE_SEQ, head_dim // 2, 2, dtype=torch.float32, device=device)
    adaln = None
    if kind.modulated:
        adaln = torch.randn(2, block.adaLN_modulation[0].in_features, dtype=dtype, device=device)
    weights = tuple(weights_of(block, names))
    args = (x, mask, freqs, adaln, weights)
    shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: seq} if kind.masked else None,
        {0: batch, 1: seq},
        {0: batch} if kind.modulated else None,
        tuple(None for _ in weights),
    )
    return args, shapes


def _versions(device: torch.device) -> dict:
    import diffusers

    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else [],
    }


def _shapes(module: nn.Module) -> dict:
    names = weight_names(module)
    return {n: list(t.shape) + [str(t.dtype)] for n, t in zip(names, weights_of(module, names))}


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_key(
    block: nn.Module, dtype: torch.dtype, device: torch.device, quantize: str, attention_backend: str
) -> str:
    """Everything that changes a block's generated code, hashed; weight values are not part of it."""
    return _digest(
        {
            **_versions(device),
            "dtype": str(dtype),
            "quantize": quantize,
            "attention": attention_backend,
            "block": {
                "dim": block.dim,
                "head_dim": block.head_dim,
                "heads": block.attention.heads,
                "shapes": _shapes(block),
            },
        }
    )


def _compile_package(exported, path: Path) -> None:
    """AOTInductor into path, atomically: a crash mid-way leaves no half package for the next start."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # (the packager wants .pt2)
    # Kernels inside the shared library: one file to map at load instead of one per kernel.
    torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp), inductor_configs={"aot_inductor.embed_kernel_binary": True}
    )
    os.replace(tmp, path)


class PreviousLoadCrashed(RuntimeError):
    """Starts kept dying while loading these packages (a native crash leaves no exception behind)."""


CRASHED_LOADS_LIMIT = 3  # unfinished loads in a row before the packages are refused


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_package(path: Path, device: torch.device):
    """Load with a marker around it: loading runs native code, and a crash there (seen on the H100
    while probing how to load) kills the process without an exception; supervisord would restart it
    into the same crash. The marker lists the processes whose load has not finished. One of them
    may have been killed for another reason (SIGKILL during start-up), so only CRASHED_LOADS_LIMIT
    of them, none still running, make a start refuse the packages; the caller then falls back to
    torch.compile. A finished load clears the marker; a normal exit mid-load, its own entry."""
    marker = path.with_name(path.name + ".loading")
    try:
        pids = [int(p) for p in marker.read_text().split()]
    except (OSError, ValueError):
        pids = []
    gone = [p for p in pids if p != os.getpid() and not _pid_alive(p)]
    if gone:
        log.warning(
            "an earlier load of this package did not finish",
            extra={"event": "aot_unfinished_load", "package": path.name, "pids": gone},
        )
    if len(gone) >= CRASHED_LOADS_LIMIT:
        raise PreviousLoadCrashed(
            f"{len(gone)} starts died while loading {path.name}; remove {marker} to retry"
        )
    try:
        marker.write_text(" ".join(str(p) for p in pids + [os.getpid()]))
    except OSError:  # a read-only cache: load without the guard rather than not at all
        pass
    # A process that exits normally mid-load (stopped by SIGTERM during start-up: the main thread
    # exits while the engine thread loads) did not crash: it takes its entry back on the way out.
    forget = functools.partial(_forget_pid, marker, os.getpid())
    atexit.register(forget)
    try:
        return aoti_load(path, device)
    finally:  # reached unless the process died: a finished load is no evidence of a crash
        atexit.unregister(forget)
        _clear_marker(marker)


def aoti_load(path: Path, device: torch.device):
    """The package, run without AOTInductor's thread-safety protocol. That protocol hands each call
    a model instance and, with the default one instance per package, first waits on an event for
    the previous call's GPU work to finish: the CPU could never queue block N+1 while the GPU ran
    block N, and the GPU sat idle during every block's launch (306 block calls per image). Without
    it, on the H100: 1.03–1.06 → 0.99 s per 1024² image in bf16, 0.82 → 0.71 s in FP8. The engine
    loads the pipeline and makes every generation on its one thread, so no two calls of a package
    overlap; the installed forwards send a call from any other thread to the eager forward."""
    try:
        return torch._inductor.aoti_load_package(
            str(path), run_single_threaded=True, device_index=_device_index(device)
        )
    except TypeError:  # a torch without the switch (< 2.7): correct, only slower
        return torch._inductor.aoti_load_package(str(path), device_index=_device_index(device))


def _forget_pid(marker: Path, pid: int) -> None:
    try:
        pids = [p for p in marker.read_text().split() if p != str(pid)]
        if pids:
            marker.write_text(" ".join(pids))
        else:
            marker.unlink()
    except OSError:
        pass


def _clear_marker(marker: Path) -> None:
    try:
        marker.unlink(missing_ok=True)
    except OSError:
        pass


@dataclass
class AotReport:
    """What installing the packages did, for the start-up log and the bench."""

    compiled: list[str] = field(default_factory=list)  # kinds compiled in this start (an empty cache)
    loaded: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    load_s: float = 0.0
    blocks: int = 0
    directory: str = ""


class BrokenPackage(RuntimeError):
    """Every compiler tried built a package that killed the process loading it (checked in a child)."""


FALLBACK_CXX = "g++"  # Inductor's own pick when CXX is unset

# Compiler → why it was refused, for any package built in this process. On the H100 the wrapper in
# CXX crashed the loader of every package it built; asking it again for each of the five packages
# of a first start cost ~40 s apiece (a build and a child check). Kept per process, not on disk: a
# later start reads each package's own record, and a cleared cache tries CXX's compiler once again.
_REFUSED_IN_THIS_PROCESS: dict[str, str] = {}


def _verdict_path(path: Path) -> Path:
    return path.with_name(path.name + ".broken")


def _read_verdicts(path: Path) -> dict[str, str]:
    """Compiler → why its package was refused."""
    try:
        broken = json.loads(path.read_text()).get("broken", {})
        return {str(k): str(v) for k, v in broken.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_verdicts(path: Path, broken: dict[str, str]) -> None:
    try:
        path.write_text(json.dumps({"broken": broken}))
    except OSError:  # a read-only cache: the refusal holds for this start only
        pass


def _compiler_candidates() -> list[str]:
    """The compiler Inductor would use (CXX's, where set), then the system g++ if that is another."""
    first = cpp_compiler()
    fallback = shutil.which(FALLBACK_CXX)
    first_path = shutil.which(first)
    if fallback is None or (first_path and os.path.realpath(first_path) == os.path.realpath(fallback)):
        return [first]
    return [first, FALLBACK_CXX]


def _compiler_failure(exc: BaseException) -> Optional[BaseException]:
    """The C++ compiler's own failure (missing, or rejecting the generated code) inside exc, which
    Inductor may wrap (InductorError), or None when the failure is not the compiler's."""
    from torch._inductor import exc as inductor_exc

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (inductor_exc.InvalidCxxCompiler, inductor_exc.CppCompileError)):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def _ensure_loaded(path: Path, export: Callable[[], object], device: torch.device, report: AotReport):
    """The package at path, made first where the cache has none (_build_checked); the time each
    step took goes into report."""
    if not path.exists():
        _build_checked(path, export, device, report)
    mark = time.perf_counter()
    runner = _load_package(path, device)
    report.load_s += time.perf_counter() - mark
    report.loaded.append(path.stem)
    return runner


def _build_checked(path: Path, export: Callable[[], object], device: torch.device, report: AotReport) -> None:
    """export(), then AOTInductor into path, then a load of the package in a child process before
    this one trusts it. A package that kills its loader (a signal, or no answer) is deleted and the
    compiler that built it recorded beside it (`*.pt2.broken`), as is a compiler that is missing or
    rejects the generated code; the next candidate (CXX's compiler first, then the system g++) then
    builds it. A compiler on record is not asked again: a later start goes straight to the one that
    works or, all on record, raises BrokenPackage at once (the caller falls back to torch.compile).
    A compiler not on record (CXX changed) gets a try; one refused for another package in this
    process does not (_REFUSED_IN_THIS_PROCESS), and is recorded for this package too."""
    from torch._inductor import config as inductor_config

    verdict_path = _verdict_path(path)
    broken = _read_verdicts(verdict_path)
    candidates = _compiler_candidates()
    exported = None
    for cxx in candidates:
        if cxx in broken:
            continue
        if cxx in _REFUSED_IN_THIS_PROCESS:
            broken[cxx] = _REFUSED_IN_THIS_PROCESS[cxx]
            _write_verdicts(verdict_path, broken)
            continue
        mark = time.perf_counter()
        if exported is None:
            exported = export()
        refused, stderr_tail = None, ""  # why this compiler's package is not used
        try:
            with inductor_config.patch({"cpp.cxx": (None, cxx)}):
                _compile_package(exported, path)
        except Exception as exc:
            failure = _compiler_failure(exc)
            if failure is None:
                raise  # not the compiler's doing: another would fail the same way
            refused = f"{failure.__class__.__name__}: {str(failure).strip()[:200]}"
        else:
            check = load_in_child(path, str(device))
            if check["crashed"]:
                refused, stderr_tail = why_failed(check), check.get("stderr_tail", "")
            elif not check["ok"]:  # an exception, not a crash: the load in this process raises it too
                log.warning(
                    "the child's load of a new package failed",
                    extra={"event": "aot_check_failed", "package": path.name, "why": why_failed(check)},
                )
        report.compile_s += time.perf_counter() - mark  # (the check's few seconds count as compiling)
        if refused is None:
            if cxx != candidates[0]:
                log.warning(
                    "package built by another C++ compiler",
                    extra={
                        "event": "aot_compiler_fallback",
                        "package": path.name,
                        "compiler": cxx,
                        "refused": sorted(broken),
                    },
                )
            report.compiled.append(path.stem)
            return
        broken[cxx] = refused
        _REFUSED_IN_THIS_PROCESS[cxx] = f"{refused} (building {path.name})"
        log.error(
            "a C++ compiler's package crashed its loader or was not built; not used",
            extra={
                "event": "aot_package_broken",
                "package": path.name,
                "compiler": cxx,
                "why": refused,
                "stderr_tail": stderr_tail[-1500:],
            },
        )
        path.unlink(missing_ok=True)
        _write_verdicts(verdict_path, broken)
    reasons = "; ".join(f"{cxx}: {why}" for cxx, why in sorted(broken.items()))
    raise BrokenPackage(
        f"no C++ compiler made a {path.name} that loads ({reasons}); set CXX to a working one, "
        f"or remove {verdict_path} to try again"
    )


def _export_block(block: nn.Module, kind: Kind, dtype: torch.dtype, device: torch.device):
    """One kind of block as an exported program (RoPE in real arithmetic while it is traced)."""
    names = weight_names(block)
    args, shapes = _examples(block, kind, dtype, device, names)
    processor = block.attention.processor
    block.attention.processor = RealRopeAttnProcessor(getattr(processor, "_attention_backend", None))
    try:
        with torch.no_grad():
            exported = torch.export.export(
                _ExportedCall(block, names, kind), args, dynamic_shapes=shapes, strict=False
            )
    finally:
        block.attention.processor = processor
    return exported


class _BlockForward:
    """Installed as a block instance's forward: the block's own tensors into the package of its kind."""

    def __init__(self, block: nn.Module, runners: dict[Kind, object], eager: Callable):
        self.weights = weights_of(block, weight_names(block))
        self.modulated = bool(block.modulation)
        self.runners, self.eager = runners, eager
        self.owner = threading.get_ident()  # the packages run single-threaded (aoti_load): this thread's
        self.packaged_calls = 0  # (tests: the packages did run)

    def __call__(
        self, x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None, adaln_noisy=None, adaln_clean=None
    ):
        if (
            noise_mask is not None
            or freqs_cis.dtype != torch.complex64
            or (self.modulated and adaln_input is None)
            or x.shape[0] > _MAX_BATCH
            or x.shape[1] > _MAX_SEQ  # (outside the exported ranges)
            or threading.get_ident() != self.owner
        ):  # (another thread: correct, slower)
            return self.eager(x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)
        kind = Kind(self.modulated, attn_mask is not None)
        inputs = [x.contiguous()]
        if kind.masked:
            inputs.append(attn_mask.contiguous())
        inputs.append(torch.view_as_real(freqs_cis.contiguous()))
        if kind.modulated:
            inputs.append(adaln_input.contiguous())
        inputs.extend(self.weights)
        self.packaged_calls += 1
        return self.runners[kind].loader.boxed_run(inputs)[0]  # (boxed: the list is consumed)


def blocks_of(transformer: nn.Module) -> list[nn.Module]:
    block_class = set(getattr(transformer, "_repeated_blocks", []))
    return [m for m in transformer.modules() if type(m).__name__ in block_class]


def install(
    transformer: nn.Module,
    cache_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    quantize: str,
    attention_backend: str,
    kinds: tuple[Kind, ...] = ALL_KINDS,
) -> AotReport:
    """Load (compiling first where the cache has none) one package per kind and route every block
    of the transformer through them. Raises when a package cannot be made; the caller decides.
    Call it once the weights are where they will stay: each block keeps references to its tensors."""
    uninstall(transformer)  # export must trace the blocks' own forward
    blocks = blocks_of(transformer)
    if not blocks:
        raise RuntimeError("no repeated transformer blocks to compile ahead of time")
    examples: dict[bool, nn.Module] = {}
    for block in blocks:
        examples.setdefault(bool(block.modulation), block)
    key = cache_key(examples.get(True) or blocks[0], dtype, device, quantize, attention_backend)
    directory = cache_dir / "aot" / key
    directory.mkdir(parents=True, exist_ok=True)
    report = AotReport(directory=str(directory), blocks=len(blocks))
    runners: dict[Kind, object] = {}
    for kind in kinds:
        if kind.modulated not in examples:
            continue
        block = examples[kind.modulated]
        runners[kind] = _ensure_loaded(
            directory / f"{kind.name}.pt2", lambda: _export_block(block, kind, dtype, device), device, report
        )
    for block in blocks:
        eager = type(block).forward.__get__(block)
        block.forward = _BlockForward(block, runners, eager)
    report.compile_s, report.load_s = round(report.compile_s, 2), round(report.load_s, 2)
    return report


class _ExportedDecoder(nn.Module):
    def __init__(self, decoder: nn.Module, names: list[str]):
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, sample, weights):
        return torch.func.functional_call(self.decoder, dict(zip(self.names, weights)), (sample,))


class _DecoderForward:
    """Installed as the VAE decoder's forward: the package for its one shape, eager for the rest."""

    def __init__(self, decoder: nn.Module, shape: tuple, runner, eager: Callable):
        self.weights = weights_of(decoder, weight_names(decoder))
        self.shape, self.runner, self.eager = shape, runner, eager
        self.owner = threading.get_ident()  # as _BlockForward
        self.packaged_calls = 0

    def __call__(self, sample, latent_embeds=None):
        if (
            latent_embeds is not None
            or tuple(sample.shape) != self.shape
            or threading.get_ident() != self.owner
        ):
            return self.eager(sample, latent_embeds)
        self.packaged_calls += 1
        return self.runner.loader.boxed_run([sample.contiguous(), *self.weights])[0]


def install_decoder(
    decoder: nn.Module, cache_dir: Path, latent_shape: tuple, dtype: torch.dtype, device: torch.device
) -> AotReport:
    """One static package of the VAE decoder for latents of latent_shape (1, C, h, w)."""
    decoder.__dict__.pop("forward", None)
    names = weight_names(decoder)
    key = _digest(
        {
            **_versions(device),
            "dtype": str(dtype),
            "decoder": _shapes(decoder),
            "class": type(decoder).__name__,
        }
    )
    directory = cache_dir / "aot" / key
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"decoder-{'x'.join(str(n) for n in latent_shape)}.pt2"
    report = AotReport(directory=str(directory), blocks=1)

    def export():
        sample = torch.randn(*latent_shape, dtype=dtype, device=device)
        with torch.no_grad():
            return torch.export.export(
                _ExportedDecoder(decoder, names), (sample, tuple(weights_of(decoder, names))), strict=False
            )

    runner = _ensure_loaded(path, export, device, report)
    decoder.forward = _DecoderForward(
        decoder, tuple(latent_shape), runner, type(decoder).forward.__get__(decoder)
    )
    report.compile_s, report.load_s = round(report.compile_s, 2), round(report.load_s, 2)
    return report


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def uninstall(transformer: nn.Module) -> None:
    """Back to the blocks' own forward (tests; a fallback after a failed install)."""
    for block in blocks_of(transformer):
        block.__dict__.pop("forward", None)


def supported(offload: str) -> Optional[str]:
    """Why the packages cannot serve this set-up, or None. The blocks' weights must stay put on the
    device: group offload moves them under hooks that a functional call would bypass."""
    if offload not in ("none", "text-encoder"):
        return f"offload={offload} moves the transformer's weights"
    return None
