"""The compile path (transformer blocks + VAE decoder, FP8 layers inside) on the CPU's Inductor:
the same code the GPU runs, checked for the same picture as eager and for surviving a change of
prompt length (the dynamic sequence length). Slow on 2 cores (~1-2 min), so one test does it all."""

import numpy as np
import torch

from app.config import load_settings
from app.loader import load_pipeline
from app.stages import BatchRequest, PromptEmbeddingCache, run_batch


def image(loaded, prompt):
    req = BatchRequest(prompts=[prompt], negatives=None, width=128, height=128, steps=2, cfg_scale=0.0,
                       generators=[torch.Generator("cpu").manual_seed(9)])
    with torch.inference_mode():
        return np.asarray(run_batch(loaded.pipe, req, torch.device("cpu"), PromptEmbeddingCache(0))[0][0]).astype(float)


def test_compiled_fp8_pipeline_matches_eager_across_prompt_lengths(tmp_path):
    (tmp_path / "none.toml").write_text("")

    def load(compile_):
        return load_pipeline(load_settings({"ZIMAGE_CONFIG": str(tmp_path / "none.toml")}, min_size=64,
                                           compile=compile_, quantize="fp8", compile_cache_dir=tmp_path / "cache",
                                           outputs_dir=tmp_path / "out", admin_token_file=tmp_path / "tok"))

    eager, compiled = load("off"), load("on")
    assert compiled.compiled and not eager.compiled
    for prompt in ("a fox", "a red fox in fresh snow under a pale winter sky, 35mm photograph"):
        a, b = image(eager, prompt), image(compiled, prompt)
        mse = ((a - b) ** 2).mean()
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 40, prompt  # same picture, up to fused-kernel rounding
    assert any((tmp_path / "cache" / "inductor").iterdir())  # kernels went to the persistent cache
