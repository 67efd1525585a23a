"""Opt-in FP8 linear layers for the transformer (`quantize = "fp8"`): lossy, faster on Hopper.

Weights are stored as float8 e4m3 with one scale per output channel, computed once at load;
activations are quantized per row (per token) at run time, and the product runs on the FP8 tensor
cores through `torch._scaled_mm` with row-wise scales, accumulating in fp32 and writing bf16. Under
torch.compile the activation quantization fuses into one kernel in front of each matmul. This is
the recipe torchao calls "float8 dynamic activation, float8 weight, per row"; it is written out
here (60 lines) because the serving image has no torchao and the recipe is small and fixed.

Where FP8 matmuls are unavailable (CPU, GPUs before sm_89) the same module computes the same
quantized product by dequantizing: slower, numerically the same rounding, and what the tests
exercise on machines without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_EPS = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (float8 values (M, K), fp32 scales (M, 1)) with x ≈ values * scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_EPS) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_matmul_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Linear(nn.Module):
    """Drop-in for an nn.Linear whose features are multiples of 16 (what the FP8 kernels need)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_fp8, w_scale = quantize_rows(linear.weight.detach())  # one scale per output channel
        self.register_buffer(
            "weight_fp8", w_fp8
        )  # (out, in): its .t() is the column-major B _scaled_mm wants
        self.register_buffer("weight_scale", w_scale.t().contiguous())  # (1, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.use_kernel = fp8_matmul_supported(linear.weight.device)

    def forward(self, x: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """rows=(start, stop): only those output features (app/runtime/ulysses.py computes the
        heads it sends before the ones it keeps); each is computed as in the whole product."""
        weight, weight_scale, bias, out_features = (
            self.weight_fp8,
            self.weight_scale,
            self.bias,
            self.out_features,
        )
        if rows is not None:
            start, stop = rows
            weight, weight_scale, out_features = weight[start:stop], weight_scale[:, start:stop], stop - start
            bias = None if bias is None else bias[start:stop]
        lead = x.shape[:-1]
        x_fp8, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        if self.use_kernel:
            out = torch._scaled_mm(
                x_fp8,
                weight.t(),
                scale_a=x_scale,
                scale_b=weight_scale,
                out_dtype=x.dtype,
                use_fast_accum=True,
            )
        else:
            out = ((x_fp8.float() * x_scale) @ (weight.float() * weight_scale.t()).t()).to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-row"


def quantize_linears(root: nn.Module, min_features: int = 512) -> int:
    """Replace the large nn.Linear layers under `root` with Float8Linear; returns how many.

    Small layers (time embedding, adaLN projections from 256 features, the final projection to 64
    channels) stay in bf16: they cost little time and carry the conditioning the image is most
    sensitive to.
    """
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear
                and child.in_features >= min_features
                and child.out_features >= min_features
                and child.in_features % 16 == 0
                and child.out_features % 16 == 0
            ):
                setattr(parent, name, Float8Linear(child))
                replaced += 1
    return replaced


def quantize_transformer(transformer: nn.Module, min_features: int = 512) -> int:
    """FP8 for the linear layers of the repeated blocks (main layers and both refiners), where ~90 %
    of the FLOPs are; embedders and the final layer stay bf16."""
    blocks = [
        m for m in transformer.modules() if type(m).__name__ in getattr(transformer, "_repeated_blocks", ())
    ]
    count = sum(quantize_linears(block, min_features) for block in blocks)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the bf16 weights just dropped
    return count
