"""Step caching: which steps reuse (pure rules) and what a reused step computes (a toy layer stack)."""

import pytest
import torch
from torch import nn

from app.runtime.stepcache import StepCache, install, skipped_steps


def test_the_plan_keeps_the_first_two_and_the_last_step_and_never_skips_twice_in_a_row():
    for steps in range(1, 51):
        for skips in range(0, 9):
            plan = skipped_steps(steps, skips)
            assert not plan & {0, 1, steps - 1}, (steps, skips)
            assert all(s + 1 not in plan for s in plan), (steps, skips)
            assert all(0 <= s < steps for s in plan), (steps, skips)
            assert len(plan) == min(skips, max(0, (steps - 2) // 2)), (steps, skips)


def test_nine_steps_two_skips_reuse_at_steps_five_and_seven():
    assert skipped_steps(9, 2) == {5, 7}
    assert skipped_steps(9, 1) == {7}
    assert skipped_steps(2, 3) == frozenset()  # the warm-up's 2 steps: nothing to skip


class Affine(nn.Module):
    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift, self.calls = scale, shift, 0

    def forward(self, x, mask, adaln):
        self.calls += 1
        return x * self.scale + self.shift + adaln


class ToyTransformer(nn.Module):
    """The shape of diffusers' main loop: `for layer in self.layers: x = layer(x, ...)`."""

    def __init__(self, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(Affine(1.0 + 0.1 * i, 0.01 * i) for i in range(n_layers))

    def forward(self, x, adaln):
        for layer in self.layers:
            x = layer(x, None, adaln)
        return x


def run_steps(model, cache, steps, batch=2):
    torch.manual_seed(0)
    inputs = [torch.randn(batch, 5, 4) for _ in range(steps)]
    outputs = []
    if cache:
        cache.begin(steps)
    for s, x in enumerate(inputs):
        outputs.append(model(x, adaln=0.1 * s))
        if cache:
            cache.end_step()
    if cache:
        cache.end()
    return inputs, outputs


@pytest.mark.parametrize("n_layers", [1, 2, 5])
def test_a_skipped_step_adds_the_previous_residual_and_runs_no_layer(n_layers):
    plain = ToyTransformer(n_layers)
    _, expected = run_steps(plain, None, 9)
    cached, cache = ToyTransformer(n_layers), StepCache(2)
    install(cached, cache)
    inputs, got = run_steps(cached, cache, 9)
    for s in range(9):
        if s in (5, 7):
            torch.testing.assert_close(got[s], inputs[s] + (expected[s - 1] - inputs[s - 1]))
            assert not torch.allclose(got[s], expected[s])  # (the reuse is an approximation)
        else:
            torch.testing.assert_close(got[s], expected[s], rtol=0, atol=0)
    assert all(layer.calls == 7 for layer in cached.layers) and cache.reused == 2 and cache.computed == 7
    assert not cache.plan and not cache._residuals  # nothing held between generations


def test_outside_a_generation_and_with_no_skips_the_layers_are_the_modules_themselves():
    model, cache = ToyTransformer(3), StepCache(0)
    install(model, cache)
    assert [type(m) for m in model.layers] == [Affine] * 3
    cache.begin(9)
    assert list(model.layers) == list(model.layers._modules.values())
    assert set(model.state_dict()) == set(ToyTransformer(3).state_dict())


def test_a_changed_batch_at_a_skipped_step_computes_instead_of_reusing():
    model, cache = ToyTransformer(3), StepCache(1)  # plan for 4 steps: {2}
    install(model, cache)
    cache.begin(4)
    for s in range(4):
        x = torch.ones(2 if s < 2 else 1, 3, 4)  # guidance switched off from step 2 on
        out = model(x, adaln=0.0)
        cache.end_step()
    torch.testing.assert_close(out, ToyTransformer(3)(torch.ones(1, 3, 4), adaln=0.0))
    assert cache.reused == 0 and model.layers[0].calls == 4
