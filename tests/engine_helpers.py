"""An in-process engine on the tiny model, and image comparisons, for the runtime's tests."""

from __future__ import annotations

import numpy as np

from app.config import load_settings
from app.runtime.engine import Engine, GenerationParams
from app.runtime.faults import FaultInjector
from tests.helpers import wait_for


def make_settings(tmp_path, **overrides):
    """Settings for an engine on the tiny model with a small, quick warm-up."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "none.toml").write_text("")
    return load_settings(
        {"ZIMAGE_CONFIG": str(tmp_path / "none.toml")},
        outputs_dir=tmp_path / "out",
        admin_token_file=tmp_path / "tok",
        **{"warmup_size": 128, "warmup_steps": 1, "min_size": 64, **overrides},
    )


def make_engine(tmp_path, ready_timeout=120, **overrides):
    engine = Engine(make_settings(tmp_path, **overrides), faults=FaultInjector(enabled=True))
    engine.start()
    wait_for(lambda: engine.state in ("ready", "failed"), ready_timeout, what="engine start")
    assert engine.state == "ready", engine.state_reason
    return engine


def params(**kw) -> GenerationParams:
    """A request for the tiny model: small and quick unless a test says otherwise."""
    base = dict(
        prompt="a red fox in snow",
        negative_prompt="",
        width=256,
        height=192,
        num_inference_steps=3,
        cfg_scale=0.0,
        num_images=1,
        seed=7,
    )
    base.update(kw)
    return GenerationParams(**base)


LONG = "a red fox in fresh snow under a pale winter sky, 35mm photograph, " * 4


def image(engine, prompt, width=128, height=128, num_images=1, loras=()):
    p = params(
        prompt=prompt,
        width=width,
        height=height,
        num_inference_steps=2,
        num_images=num_images,
        seed=9,
        loras=loras,
    )
    result = engine.submit(p).future.result(600)
    return [np.asarray(im).astype(float) for im in result.images]


def psnr(a, b):
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def block_graphs() -> int:
    """How many graphs dynamo holds for the transformer blocks' forward (every block shares it).
    With compile_in_requests on, a request the warm-up did not cover adds one; with it off (the
    default) the block would run eagerly instead, which no compile count can see."""
    import torch._dynamo.eval_frame as eval_frame
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    return len(eval_frame._debug_get_cache_entry_list(ZImageTransformerBlock.forward.__code__))
