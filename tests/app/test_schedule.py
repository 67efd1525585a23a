"""The step count is pinned to what the pipeline really runs: with diffusers 0.42, n steps are n
transformer forwards on the sigmas linspace(1, 1/n, n). The service's default, 8, is then Turbo's
distilled schedule. A diffusers upgrade that changes this again fails here, loudly."""

import functools

import torch

from app.runtime.stages import BatchRequest, PromptEmbeddingCache, run_batch
from app.runtime.tiny import build_tiny_pipeline
from app.web.schemas import TURBO_DEFAULT_STEPS, Limits, build_request_model


def forwards_and_sigmas(steps: int):
    pipe = build_tiny_pipeline(dtype=torch.float32)
    calls, sigmas = [], []
    forward = pipe.transformer.forward
    set_timesteps = pipe.scheduler.set_timesteps

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    @functools.wraps(set_timesteps)  # (the pipeline reads its signature: it must still take sigmas)
    def recording_set_timesteps(*args, **kwargs):
        sigmas.append(list(kwargs.get("sigmas") or []))
        return set_timesteps(*args, **kwargs)

    pipe.transformer.forward = counting_forward
    pipe.scheduler.set_timesteps = recording_set_timesteps
    request = BatchRequest(
        prompts=["a lighthouse"],
        negatives=None,
        width=64,
        height=64,
        num_inference_steps=steps,
        cfg_scale=0.0,
        generators=[torch.Generator("cpu").manual_seed(0)],
    )
    with torch.inference_mode():
        run_batch(pipe, request, torch.device("cpu"), PromptEmbeddingCache(0))
    return len(calls), sigmas[0]


def test_the_default_is_turbos_eight_forwards():
    request = build_request_model(
        Limits(min_size=64, max_size=2048, max_steps=50, max_images=4, max_prompt_chars=100, max_cfg=20)
    )
    assert TURBO_DEFAULT_STEPS == 8 and request(prompt="x").num_inference_steps == 8
    forwards, sigmas = forwards_and_sigmas(8)
    assert forwards == 8
    assert torch.allclose(torch.tensor(sigmas), torch.linspace(1.0, 1 / 8, 8))


def test_nine_steps_are_nine_forwards_now():
    forwards, sigmas = forwards_and_sigmas(9)
    assert forwards == 9 and len(sigmas) == 9 and abs(sigmas[-1] - 1 / 9) < 1e-6
