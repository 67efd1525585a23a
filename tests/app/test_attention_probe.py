"""The FP8 attention probe's quantized math (ops/lab/attention_probe.py), on the CPU: the reference its
Triton kernel is checked against on the GPU must itself be attention, up to FP8 rounding."""

import math

import torch

from ops.lab.attention_probe import FP8, quantize_per_token, quantize_v, reference


def test_quantizers_round_trip_within_e4m3_precision_and_v_is_transposed():
    torch.manual_seed(0)
    x = (
        torch.randn(2, 40, 3, 64) * torch.logspace(-2, 2, 40)[None, :, None, None]
    )  # tokens of very different size
    x8, scale = quantize_per_token(x)
    assert x8.dtype == FP8 and scale.shape == (2, 40, 3)
    back = x8.float() * scale.unsqueeze(-1)
    assert (
        (back - x).abs() <= x.abs().amax(-1, keepdim=True) / 16 + 1e-9
    ).all()  # 3 mantissa bits, per token
    vt8, v_scale = quantize_v(x)
    assert vt8.shape == (2, 3, 64, 40) and v_scale.shape == (2, 3, 64)
    back_v = vt8.float().permute(0, 3, 1, 2) * v_scale.unsqueeze(1)
    assert ((back_v - x).abs() <= x.abs().amax(1, keepdim=True) / 16 + 1e-9).all()  # per head and channel


def test_reference_is_attention_up_to_fp8_rounding():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 300, 2, 64) for _ in range(3))
    q = q * 3  # peaked attention, where a wrong scale would show
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    q8, qs = quantize_per_token(q)
    k8, ks = quantize_per_token(k)
    vt8, vs = quantize_v(v)
    got = reference(q8, qs, k8, ks, vt8, vs, 1 / math.sqrt(64))
    assert got.shape == exact.shape
    rel = float((got - exact).norm() / exact.norm())
    assert 0 < rel < 0.1, rel  # lossy, but attention: a misplaced scale or transpose gives ~1
