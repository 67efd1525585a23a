"""FP8 linear layers: the quantization is real (values change a little, not a lot), and a quantized
tiny pipeline still makes nearly the same picture. On this CPU the FP8 product is emulated with the
same rounding; the kernel path (torch._scaled_mm) runs on the GPU in ops/lab/bench.py's fp8 phase."""

import numpy as np
import torch
from torch import nn

from app.runtime.fp8 import FP8, Float8Linear, quantize_rows, quantize_transformer
from app.runtime.stages import BatchRequest, PromptEmbeddingCache, run_batch
from app.runtime.tiny import build_tiny_pipeline


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_rows_quantize_to_float8_with_one_scale_each():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitude
    values, scales = quantize_rows(x)
    assert values.dtype == FP8 and scales.shape == (64, 1)
    assert values.float().abs().amax(dim=1).min() == 448  # each row uses the full e4m3 range
    err = relative_error(values.float() * scales, x)
    assert 0 < err < 0.04


def test_float8_linear_matches_the_bf16_layer_closely():
    torch.manual_seed(0)
    linear = nn.Linear(512, 1024, bias=True)
    x = torch.randn(3, 77, 512)
    q = Float8Linear(linear)
    assert q.weight_fp8.dtype == FP8 and q.weight_fp8.shape == (1024, 512)
    with torch.no_grad():
        out, ref = q(x), linear(x)
    assert out.shape == ref.shape == (3, 77, 1024)
    assert 0 < relative_error(out, ref) < 0.06


def test_quantized_tiny_pipeline_makes_nearly_the_same_image():
    def image(quantize: bool):
        pipe = build_tiny_pipeline(dtype=torch.float32)
        if quantize:
            count = quantize_transformer(pipe.transformer, min_features=pipe.transformer.config.dim)
            assert count > 0
            assert not any(
                type(m) is nn.Linear
                and m.in_features == pipe.transformer.config.dim
                and m.out_features == pipe.transformer.config.dim
                for b in pipe.transformer.layers
                for m in b.modules()
            )
        req = BatchRequest(
            prompts=["a red fox in snow"],
            negatives=None,
            width=128,
            height=128,
            num_inference_steps=4,
            cfg_scale=0.0,
            generators=[torch.Generator("cpu").manual_seed(1)],
        )
        with torch.inference_mode():
            return np.asarray(
                run_batch(pipe, req, torch.device("cpu"), PromptEmbeddingCache(0))[0][0]
            ).astype(float)

    plain, fp8 = image(False), image(True)
    mse = ((plain - fp8) ** 2).mean()
    psnr = 10 * np.log10(255**2 / mse) if mse else float("inf")
    assert mse > 0, "quantization changed nothing: the FP8 path did not run"
    print(f"tiny pipeline FP8 vs fp32: PSNR {psnr:.1f} dB")
    assert psnr > 30, psnr
