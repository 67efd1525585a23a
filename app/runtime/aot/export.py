"""Export: a transformer block (one per kind) or the VAE decoder as a torch.export program whose
weights are inputs, and the cache key of everything that changes the generated code.

The 30 main blocks and the refiner blocks share one package per kind because the weights are not
baked in: the exported function takes them as inputs (torch.func.functional_call), and each block
instance calls the package with its own tensors. Kinds: with or without adaLN modulation (the
caption refiner has none) × with or without an attention mask (a batch whose prompts differ in
length carries one; a single prompt does not, and takes the faster unmasked attention kernel).

A package is keyed by everything that changes the generated code (torch/CUDA/diffusers versions,
GPU, dtype, block dimensions, FP8, attention backend), never by weight values, so a fine-tune of the
same architecture reuses it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

FORMAT = 2  # bump when the exported signature below changes: old packages are then ignored


MAX_BATCH = 64


MAX_SEQ = 1 << 16


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


# Copied from diffusers 0.42.1 diffusers/models/transformers/transformer_z_image.py ZSingleStreamAttnProcessor.__call__ sha256:f8f65d350a617957  # noqa: E501
# (tests/app/test_copied_from.py fails when the installed source differs: re-read the copy, then the marker)
class RealRopeAttnProcessor:
    """diffusers' ZSingleStreamAttnProcessor with rotate_real for its complex RoPE; used only while a
    block is exported. `freqs_cis` keeps its name: Attention passes it on by name."""

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

    batch, seq = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=2, max=MAX_SEQ)
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


def versions(device: torch.device) -> dict:
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


def shapes_of(module: nn.Module) -> dict:
    names = weight_names(module)
    return {n: list(t.shape) + [str(t.dtype)] for n, t in zip(names, weights_of(module, names))}


def digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_key(
    block: nn.Module, dtype: torch.dtype, device: torch.device, quantize: str, attention_backend: str
) -> str:
    """Everything that changes a block's generated code, hashed; weight values are not part of it."""
    return digest(
        {
            **versions(device),
            "dtype": str(dtype),
            "quantize": quantize,
            "attention": attention_backend,
            "block": {
                "dim": block.dim,
                "head_dim": block.head_dim,
                "heads": block.attention.heads,
                "shapes": shapes_of(block),
            },
        }
    )


def export_block(block: nn.Module, kind: Kind, dtype: torch.dtype, device: torch.device):
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


class ExportedDecoder(nn.Module):
    def __init__(self, decoder: nn.Module, names: list[str]):
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, sample, weights):
        return torch.func.functional_call(self.decoder, dict(zip(self.names, weights)), (sample,))
