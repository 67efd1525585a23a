"""zimagectl-free probe: would an FP8 attention kernel of our own beat cuDNN's bf16 attention?

    python -m ops.lab.attention_probe [--out probe.json]        # on the GPU machine; needs Triton

With FP8 linear layers, attention is ~188 of an image's ~626 ms of kernels (docs/PERFORMANCE.md)
and PyTorch 2.11 has no FP8 attention, so the lever left for throughput was a Triton FP8 kernel
compiled into the AOT packages. This probe holds that kernel and times it against PyTorch's SDPA
backends at Z-Image's shape (30 heads × 128, 4,128 tokens at 1024²), sweeping tile sizes, with the
error of each against fp32 attention. Measured on the H100 (2026-11-23): the best configuration
took 0.480 ms against cuDNN bf16's 0.473 ms (batch 4: 1.900 vs 1.941 ms) at 24× cuDNN's error,
so the kernel was not integrated; the probe stays so the figure can be re-measured when Triton
(warp specialisation on Hopper) or PyTorch (FP8 SDPA) changes.

Numerics (the SageAttention / FlashAttention-3 recipe): Q and K in float8 e4m3 with one scale per
token and head (QKᵀ on the FP8 tensor cores, both scales applied to the fp32 scores); V in float8
with one scale per head and channel, stored transposed (B, H, D, S), the K-major layout Hopper's
FP8 MMA needs for P·V; P multiplied by 448 before its cast so small probabilities keep their bits.
`reference()` is the same quantized product in plain torch (what the CPU test checks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from app.runtime.fp8 import FP8, FP8_MAX, quantize_rows

_LOG2E = 1.4426950408889634

try:  # CUDA builds of torch ship Triton; CPU-only installs (this repo's CI) do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, H, D) → (float8 (B, S, H, D), fp32 scales (B, S, H)) with x ≈ values · scales:
    app/runtime/fp8.py's per-row quantization, a row being one token's head."""
    values, scale = quantize_rows(x)
    return values, scale.squeeze(-1)


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v (B, S, H, D) → (float8 transposed to (B, H, D, S), fp32 scales (B, H, D)): the same per-row
    quantization with the tokens as the row."""
    values, scale = quantize_rows(v.permute(0, 2, 3, 1))
    return values.contiguous(), scale.squeeze(-1)


def reference(q8, q_scale, k8, k_scale, vt8, v_scale, softmax_scale: float) -> torch.Tensor:
    """The quantized attention in fp32 torch, P's rounding to e4m3 included; output (B, S, H, D)."""
    q = q8.float() * q_scale.unsqueeze(-1)
    k = k8.float() * k_scale.unsqueeze(-1)
    scores = torch.einsum("bshd,bthd->bhst", q, k) * softmax_scale
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    row_sum = p.sum(dim=-1, keepdim=True)
    p = (p * FP8_MAX).to(FP8).float()
    out = torch.einsum("bhst,bhdt->bhsd", p, vt8.float()) / (row_sum * FP8_MAX) * v_scale.unsqueeze(2)
    return out.transpose(1, 2)


if triton is not None:

    @triton.jit
    def _fp8_attention_kernel(
        Q,
        K,
        VT,
        SQ,
        SK,
        SV,
        O,  # noqa: E741  (Triton's own name for the output pointer)
        stride_qb,
        stride_qs,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vh,
        stride_vd,
        stride_sqb,
        stride_sqs,
        stride_sqh,
        stride_skb,
        stride_sks,
        stride_skh,
        stride_svb,
        stride_svh,
        stride_ob,
        stride_os,
        stride_oh,
        H,
        S,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        b = off_bh // H
        h = off_bh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        in_m = offs_m < S
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
            mask=in_m[:, None],
            other=0.0,
        )
        # softmax's 1/√d and log2 e fold into Q's per-token scale: exp2 of the product is the softmax
        sq = (
            tl.load(SQ + b * stride_sqb + h * stride_sqh + offs_m * stride_sqs, mask=in_m, other=0.0)
            * qk_scale
        )
        k_base = K + b * stride_kb + h * stride_kh
        sk_base = SK + b * stride_skb + h * stride_skh
        v_base = VT + b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_n in tl.range(0, S, BLOCK_N):
            cols = start_n + offs_n
            in_n = cols < S
            k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=in_n[None, :], other=0.0)
            sk = tl.load(sk_base + cols * stride_sks, mask=in_n, other=0.0)
            qk = tl.dot(q, k) * sq[:, None] * sk[None, :]
            qk = tl.where(in_n[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_d[None, :] * stride_vd + cols[:, None], mask=in_n[:, None], other=0.0)
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc * alpha[:, None])
            m_i = m_new
        sv = tl.load(SV + b * stride_svb + h * stride_svh + offs_d)
        out = acc / (l_i[:, None] * 448.0) * sv[None, :]
        tl.store(
            O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=in_m[:, None],
        )


def fp8_attention(
    q8,
    q_scale,
    k8,
    k_scale,
    vt8,
    v_scale,
    softmax_scale: float,
    out: torch.Tensor,
    block_m: int = 64,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """The kernel on quantized inputs (as the quantizers above return them) into `out` (B, S, H, D)."""
    batch, seq, heads, head_dim = q8.shape
    _fp8_attention_kernel[(triton.cdiv(seq, block_m), batch * heads)](
        q8,
        k8,
        vt8,
        q_scale,
        k_scale,
        v_scale,
        out,
        q8.stride(0),
        q8.stride(1),
        q8.stride(2),
        k8.stride(0),
        k8.stride(1),
        k8.stride(2),
        vt8.stride(0),
        vt8.stride(1),
        vt8.stride(2),
        q_scale.stride(0),
        q_scale.stride(1),
        q_scale.stride(2),
        k_scale.stride(0),
        k_scale.stride(1),
        k_scale.stride(2),
        v_scale.stride(0),
        v_scale.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        heads,
        seq,
        softmax_scale * _LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=30)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--shapes", default="1x4128,4x4128,1x1088", help="batch x tokens, comma-separated")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if triton is None or not torch.cuda.is_available():
        parser.error("needs a CUDA GPU and Triton")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    heads, head_dim = args.heads, args.head_dim
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(n) for n in shape.split("x"))
        torch.manual_seed(0)
        q = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        # keys of a DiT share a per-channel offset across tokens; the quantization has to cope with it
        k = (
            torch.randn(batch, seq, heads, head_dim, device="cuda")
            + 0.5 * torch.randn(1, 1, heads, head_dim, device="cuda")
        ).bfloat16()
        v = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        flops = 4 * batch * heads * seq * seq * head_dim
        qt, kt, vt = (
            x.transpose(1, 2) for x in (q, k, v)
        )  # the app's layout: (B, S, H, D) viewed as (B, H, S, D)
        exact = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)

        def row(label, ms, out):
            r = {
                "shape": shape,
                "kernel": label,
                "ms": round(ms, 4),
                "tflops": round(flops / ms / 1e9),
                "rel_err": round(float((out.float() - exact).norm() / exact.norm()), 5),
            }
            rows.append(r)
            print(json.dumps(r), flush=True)

        for name, backend in (
            ("cudnn bf16", SDPBackend.CUDNN_ATTENTION),
            ("flash-2 bf16", SDPBackend.FLASH_ATTENTION),
        ):
            with sdpa_kernel(backend):
                ms = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup=50, rep=300)
                row(name, ms, F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2))
        q8, qs = quantize_per_token(q)
        k8, ks = quantize_per_token(k)
        vt8, vs = quantize_v(v)
        out = torch.empty_like(q)
        for bm, bn, warps, stages in (
            (64, 128, 4, 3),
            (64, 128, 4, 2),
            (128, 128, 4, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (64, 64, 4, 3),
        ):

            def call(bm=bm, bn=bn, warps=warps, stages=stages):
                return fp8_attention(
                    q8, qs, k8, ks, vt8, vs, 1 / math.sqrt(head_dim), out, bm, bn, warps, stages
                )

            row(f"triton fp8 {bm}x{bn} w{warps} s{stages}", do_bench(call, warmup=20, rep=150), call())
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
