"""Install: route every transformer block (and the VAE decoder at its one size) through the
packages, with the block's own eager forward for whatever the packages do not cover (the omni
model's per-token modulation, a complex dtype other than complex64, another thread)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from app.runtime.aot.export import (
    ALL_KINDS,
    MAX_BATCH,
    MAX_SEQ,
    ExportedDecoder,
    Kind,
    cache_key,
    digest,
    export_block,
    shapes_of,
    versions,
    weight_names,
    weights_of,
)
from app.runtime.aot.store import AotReport, ensure_loaded


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
            or x.shape[0] > MAX_BATCH
            or x.shape[1] > MAX_SEQ  # (outside the exported ranges)
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
        runners[kind] = ensure_loaded(
            directory / f"{kind.name}.pt2", lambda: export_block(block, kind, dtype, device), device, report
        )
    for block in blocks:
        eager = type(block).forward.__get__(block)
        block.forward = _BlockForward(block, runners, eager)
    report.compile_s, report.load_s = round(report.compile_s, 2), round(report.load_s, 2)
    return report


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
    key = digest(
        {
            **versions(device),
            "dtype": str(dtype),
            "decoder": shapes_of(decoder),
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
                ExportedDecoder(decoder, names), (sample, tuple(weights_of(decoder, names))), strict=False
            )

    runner = ensure_loaded(path, export, device, report)
    decoder.forward = _DecoderForward(
        decoder, tuple(latent_shape), runner, type(decoder).forward.__get__(decoder)
    )
    report.compile_s, report.load_s = round(report.compile_s, 2), round(report.load_s, 2)
    return report


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
