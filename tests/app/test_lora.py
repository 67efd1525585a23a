"""LoRAs merged into the tiny model's weights (app/runtime/lora_merge.py), against diffusers' own
adapter layers (peft) as the reference, with files made offline by peft (tests/lora_files.py)."""

from __future__ import annotations

import pytest
import torch

from app import errors
from app.runtime.lora import LoraLibrary
from app.runtime.lora_merge import LoraSet
from app.runtime.tiny import build_tiny_pipeline
from tests.lora_files import make_foreign_lora, make_lora, make_wrong_size_lora


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    make_lora(root, "ink", seed=1)
    make_lora(root, "film", seed=2, rank=2, alpha=2, targets=["w1", "w3"])
    make_foreign_lora(root, "sdxl-style")
    make_wrong_size_lora(root, "big-model")
    return root


def latents(pipe, seed=3):
    out = pipe(
        prompt="a paper boat on a pond",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    return out.images


def snapshot(transformer):
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def same_weights(transformer, saved) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in transformer.state_dict().items())


def test_a_merged_lora_gives_what_diffusers_adapter_layers_give(loras):
    """The reference: diffusers' load_lora_weights (peft layers, alpha/r scaling from the saved
    config) with set_adapters at 0.7 and 0.5, beside our merge of the same files and scales."""
    reference = build_tiny_pipeline()
    reference.load_lora_weights(str(loras / "ink.safetensors"), adapter_name="ink")
    reference.load_lora_weights(str(loras / "film.safetensors"), adapter_name="film")
    reference.set_adapters(["ink", "film"], [0.7, 0.5])
    expected = latents(reference)

    pipe = build_tiny_pipeline()
    plain = latents(pipe)
    merged = LoraSet(pipe.transformer, loras, capacity=4)
    merged.apply((("ink", 0.7), ("film", 0.5)))
    got = latents(pipe)
    assert (got - plain).abs().max() > 1e-2  # the LoRAs do change the image
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_switching_back_and_forth_never_drifts_from_the_model_s_own_weights(loras):
    pipe = build_tiny_pipeline()
    own = snapshot(pipe.transformer)
    merged = LoraSet(pipe.transformer, loras, capacity=4)
    merged.apply((("ink", 1.0),))
    once = snapshot(pipe.transformer)
    assert not same_weights(pipe.transformer, own)
    for i in range(40):
        merged.apply(((("ink", 1.0), ("film", -0.5)), (("film", 2.0),), ())[i % 3])
    merged.apply(())
    assert same_weights(pipe.transformer, own)  # bit for bit: restored from the kept originals
    merged.apply((("ink", 1.0),))
    assert same_weights(pipe.transformer, once)
    assert merged.loads == 2  # each file read once: the rest came from the cache


def test_the_same_set_again_is_not_merged_again(loras):
    pipe = build_tiny_pipeline()
    merged = LoraSet(pipe.transformer, loras, capacity=4)
    merged.apply((("ink", 0.8),))
    merged.apply((("ink", 0.8),))
    assert merged.merges == 1
    merged.apply((("ink", 0.9),))
    assert merged.merges == 2


def test_a_lora_for_another_model_is_refused_naming_its_keys_and_nothing_changes(loras):
    pipe = build_tiny_pipeline()
    own = snapshot(pipe.transformer)
    merged = LoraSet(pipe.transformer, loras, capacity=4)
    with pytest.raises(errors.InvalidLora) as caught:
        merged.apply((("ink", 1.0), ("sdxl-style", 1.0)))
    message = caught.value.message
    assert (
        "does not fit this model" in message and "transformer.down_blocks.0.proj_in.lora_A.weight" in message
    )
    assert caught.value.status == 422
    assert same_weights(pipe.transformer, own) and merged.merged == ()


def test_a_lora_of_another_size_is_refused_naming_the_layer(loras):
    pipe = build_tiny_pipeline()
    with pytest.raises(errors.InvalidLora, match=r"layers\.0\.attention\.to_q\.lora_A\.weight"):
        LoraSet(pipe.transformer, loras, capacity=4).apply((("big-model", 1.0),))


def test_missing_names_and_names_that_reach_outside_are_unknown(loras, tmp_path):
    library = LoraLibrary(loras)
    for name in ("../loras/ink", "/etc/passwd", "ink.safetensors/..", "", "nope"):
        with pytest.raises(errors.UnknownLora) as caught:
            library.find(name)
        assert caught.value.status == 422
    assert "available: big-model, film, ink, sdxl-style" in (caught.value.hint or "")
    assert LoraLibrary(tmp_path / "absent").files() == []


def test_a_truncated_or_foreign_file_is_refused_not_a_crash(loras, tmp_path):
    (tmp_path / "cut.safetensors").write_bytes((loras / "ink.safetensors").read_bytes()[:300])
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    pipe = build_tiny_pipeline()
    merged = LoraSet(pipe.transformer, tmp_path, capacity=4)
    for name in ("cut", "text"):
        with pytest.raises(errors.InvalidLora, match="could not be read as safetensors") as caught:
            merged.apply(((name, 1.0),))
        assert str(tmp_path) not in caught.value.message  # no server paths in what a client reads


def test_a_replaced_file_is_read_again_and_its_old_layers_restored(tmp_path):
    make_lora(tmp_path, "style", seed=1)  # attention layers
    pipe = build_tiny_pipeline()
    own = snapshot(pipe.transformer)
    merged = LoraSet(pipe.transformer, tmp_path, capacity=4)
    merged.apply((("style", 1.0),))
    make_lora(tmp_path, "style", seed=2, targets=["w2"])  # same name, other layers
    merged.apply((("style", 1.0),))
    assert merged.loads == 2
    attention = [k for k in own if "attention.to_q.weight" in k]
    assert attention and all(torch.equal(pipe.transformer.state_dict()[k], own[k]) for k in attention)


def test_the_cache_is_bounded_and_evicting_frees_originals(tmp_path):
    for i in range(6):
        make_lora(tmp_path, f"l{i}", seed=i)
    pipe = build_tiny_pipeline()
    own = snapshot(pipe.transformer)
    merged = LoraSet(pipe.transformer, tmp_path, capacity=2)
    sizes = []
    for cycle in range(3):
        for i in range(6):
            merged.apply(((f"l{i}", 1.0),))
            assert len(merged.cached) <= 2
            sizes.append(merged.memory_bytes())
    assert max(sizes) == sizes[1] and merged.loads == 18  # a steady footprint: nothing piles up
    merged.apply(())
    assert same_weights(pipe.transformer, own)


def test_a_merge_that_fails_halfway_leaves_the_model_s_own_weights(loras, monkeypatch):
    """Out of memory in the middle of a merge (some layers written, others not): the weights go
    back to the model's own, not a mix, and the next request merges from there."""
    pipe = build_tiny_pipeline()
    own = snapshot(pipe.transformer)
    merged = LoraSet(pipe.transformer, loras, capacity=4)
    merged.apply((("film", 1.0),))
    write, calls = LoraSet._write, []

    def failing(self, module, parts):
        calls.append(module)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        write(self, module, parts)

    monkeypatch.setattr(LoraSet, "_write", failing)
    with pytest.raises(torch.OutOfMemoryError):
        merged.apply((("ink", 1.0),))
    assert len(calls) == 5 and merged.merged == () and same_weights(pipe.transformer, own)
    monkeypatch.setattr(LoraSet, "_write", write)
    merged.apply((("ink", 1.0),))
    reference = LoraSet(build_tiny_pipeline().transformer, loras, capacity=4)
    reference.apply((("ink", 1.0),))
    assert same_weights(pipe.transformer, snapshot(reference.transformer))
