"""The text encoder's CUDA-graph path (app/runtime/encoder_graph.py) on the parts a CPU can check: the 4-D
causal-and-padding mask it feeds the encoder gives the same embeddings as the 2-D padding mask
diffusers passes (the graph's correctness rests on this), and the loader installs graphs only where
they can work. The capture and replay themselves run on the GPU (ops/bench, docs/PERFORMANCE.md)."""

import pytest
import torch

from app.config import load_settings
from app.runtime import encoder_graph
from app.runtime.encoder_graph import causal_padding_mask
from app.runtime.loader import _graph_text_encoder
from app.runtime.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(dtype=torch.float32)


def test_mask_is_causal_and_hides_padding():
    mask = causal_padding_mask(torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False]  # a token sees itself and earlier ones
    assert mask[0, 0, 1].tolist() == [True, True, False, False, False]  # never a later one
    assert mask[0, 0, 4].tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]  # padding is never seen, even by padding


@pytest.mark.parametrize(
    "prompts", [["a fox"], ["a fox", "a much longer prompt about a lighthouse at dusk, oil painting"]]
)
def test_the_4d_mask_gives_the_embeddings_of_the_2d_mask(pipe, prompts):
    """What diffusers' encode_prompt computes (2-D padding mask) against what the graph runs."""
    texts = [
        pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask.bool()
    assert not mask.all()  # (padding present: the case the graph serves)
    with torch.inference_mode():
        two_d = pipe.text_encoder(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        four_d = pipe.text_encoder(
            input_ids=ids,
            attention_mask=causal_padding_mask(mask),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states[-2]
    for i in range(len(prompts)):
        valid = mask[i]  # diffusers keeps only these positions
        torch.testing.assert_close(four_d[i][valid], two_d[i][valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "device,overrides,expected",
    [
        ("cuda", {}, True),
        ("cpu", {}, False),  # no CUDA graphs
        ("cuda", {"text_encoder_graph": False}, False),
        ("cuda", {"offload": "text-encoder"}, False),  # group offloading moves the weights between calls
        ("cuda", {"compile_text_encoder": True}, False),  # compiled instead
    ],
)
def test_where_graphs_are_installed(device, overrides, expected):
    settings = load_settings(env={}, **overrides)
    assert _graph_text_encoder(settings, torch.device(device), compiled=True) is expected


def test_installed_forward_serves_diffusers_encode_prompt(pipe):
    """Installed as the encoder's forward, it takes diffusers' own call (here on the CPU, where it
    hands every call to the eager forward) and returns what encode_prompt reads."""
    with torch.inference_mode():
        before, _ = pipe.encode_prompt(
            prompt=["a fox", "a lighthouse"], device="cpu", do_classifier_free_guidance=False
        )
        graphed = encoder_graph.install(pipe.text_encoder)
        try:
            after, _ = pipe.encode_prompt(
                prompt=["a fox", "a lighthouse"], device="cpu", do_classifier_free_guidance=False
            )
        finally:
            encoder_graph.uninstall(pipe.text_encoder)
    assert graphed.graphs == {} and graphed.replays == 0  # (no CUDA here: nothing captured)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    assert "forward" not in vars(pipe.text_encoder)  # uninstalled
