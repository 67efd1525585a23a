"""The fast safetensors reader builds the same models as from_pretrained, and the loader falls back
to from_pretrained (with a note) when a directory does not match what the fast path expects."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import ZImageTransformer2DModel
from transformers import Qwen3Model

from app.config import load_settings
from app.runtime import fastload
from app.runtime.loader import load_pipeline
from app.runtime.stages import BatchRequest, PromptEmbeddingCache, run_batch
from app.runtime.tiny import build_tiny_pipeline

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    build_tiny_pipeline(dtype=torch.float32).save_pretrained(str(d))
    return d


@pytest.mark.parametrize("cls,sub", [(ZImageTransformer2DModel, "transformer"), (Qwen3Model, "text_encoder")])
def test_same_weights_buffers_and_dtypes_as_from_pretrained(model_dir, cls, sub, monkeypatch):
    monkeypatch.setattr(fastload, "READERS", 3)  # several ranges per file, as on the GPU
    monkeypatch.setattr(fastload, "CHUNK", 4096)
    theirs = cls.from_pretrained(str(model_dir / sub), dtype=torch.bfloat16)
    ours = fastload.build_model(cls, model_dir / sub, CPU, torch.bfloat16)
    a, b = theirs.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.bfloat16 and torch.equal(a[key], b[key]), key
    buffers = dict(ours.named_buffers())
    for key, value in theirs.named_buffers():  # e.g. Qwen3's fp32 RoPE frequencies stay fp32
        assert buffers[key].dtype == value.dtype and torch.equal(buffers[key], value), key
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())


def settings_for(tmp_path, model_dir, **overrides):
    (tmp_path / "none.toml").write_text("")
    return load_settings(
        {"ZIMAGE_CONFIG": str(tmp_path / "none.toml")},
        model_dir=str(model_dir),
        min_size=64,
        outputs_dir=tmp_path / "out",
        admin_token_file=tmp_path / "tok",
        **overrides,
    )


def one_image(loaded):
    req = BatchRequest(
        prompts=["a red fox in snow"],
        negatives=None,
        width=128,
        height=64,
        num_inference_steps=2,
        cfg_scale=0.0,
        generators=[torch.Generator("cpu").manual_seed(4)],
    )
    with torch.inference_mode():
        return np.asarray(run_batch(loaded.pipe, req, CPU, PromptEmbeddingCache(0))[0][0])


def test_loader_gives_the_same_image_with_and_without_fast_load(tmp_path, model_dir):
    fast = load_pipeline(settings_for(tmp_path, model_dir, fast_load=True, dtype="float32"))
    slow = load_pipeline(settings_for(tmp_path, model_dir, fast_load=False, dtype="float32"))
    assert not any("fast load skipped" in n for n in fast.notes), fast.notes
    # Same weights; from_pretrained's CPU tensors sit unaligned in an mmap of the file, ours in one
    # aligned buffer, and the CPU's GEMM kernels round a few values differently for the two.
    a, b = one_image(fast).astype(int), one_image(slow).astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_a_weight_file_that_does_not_match_the_config_is_refused(tmp_path, model_dir):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "transformer"
    shutil.copytree(model_dir / "transformer", broken)
    (weights,) = broken.glob("*.safetensors")
    state = load_file(weights)
    dropped = sorted(k for k in state if k.startswith("layers.0."))[0]
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):  # never a meta or random weight served
        fastload.build_model(ZImageTransformer2DModel, broken, CPU, torch.float32)


def test_a_directory_without_safetensors_loads_through_from_pretrained(tmp_path):
    legacy = tmp_path / "legacy"
    build_tiny_pipeline(dtype=torch.float32).save_pretrained(str(legacy), safe_serialization=False)
    loaded = load_pipeline(settings_for(tmp_path, legacy, dtype="float32"))
    assert any("fast load skipped (FileNotFoundError" in n for n in loaded.notes), loaded.notes
    assert one_image(loaded).shape == (64, 128, 3)


def test_prefetched_weights_are_the_ones_the_loader_uses(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr(fastload, "_prefetch", None)
    fastload.start_prefetch(model_dir, CPU)  # python -m app does this on a GPU before its imports
    reads = dict(fastload._prefetch._futures)
    loaded = load_pipeline(settings_for(tmp_path, model_dir, fast_load=True, dtype="float32"))
    assert fastload._prefetch._futures == {}  # both taken by the loader
    prefetched = reads["transformer"].result()
    used = dict(loaded.pipe.transformer.named_parameters())
    assert all(
        used[name] is tensor or used[name].data_ptr() == tensor.data_ptr()
        for name, tensor in prefetched.items()
    )
    assert fastload.take_prefetched(tmp_path / "other", "transformer") is None
