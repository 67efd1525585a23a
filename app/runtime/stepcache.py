"""Opt-in step caching (`step_cache_skips = N`): lossy, for throughput.

At a skipped denoising step the transformer's 30 main layers do not run: their input gets the
residual (output − input) those layers added at the step before, and only the embedders, the two
refiners and the final layer run. The main layers are ~93 % of a step's work at 1024², so each
skipped step of nine saves ~10 % of the denoising time. This is the residual reuse of DeepCache and
the "first block cache" family, with a fixed schedule instead of a threshold: which steps reuse is
known before the generation starts, so the saving is the same for every request and can be
planned for (and a batch's images are treated alike).

Which steps (`skipped_steps`, pure): never the first two (the composition forms there), never the
last (it lands the image), never two in a row (a reuse needs a residual computed at the step right
before it); counted back from the second-to-last step, every other one — for 9 steps, 2 skips:
steps 5 and 7 (0-based).

Mechanics: the transformer's `layers` list is swapped for a subclass whose iteration the cache
steers. diffusers' forward loops `for layer in self.layers`; outside a generation, or with a plan
that skips nothing, iteration yields the layers themselves, so everything else (compiled blocks,
AOT packages, state dicts) is untouched. The engine brackets each generation with begin()/end()
and calls end_step() from the pipeline's step callback.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn


def skipped_steps(num_steps: int, skips: int) -> frozenset[int]:
    """0-based indices of the denoising steps whose main layers reuse the previous step's residual."""
    return frozenset(list(range(num_steps - 2, 1, -2))[: max(skips, 0)])


class StepCache:
    """The state of one generation at a time (the engine runs one batch at a time)."""

    def __init__(self, skips: int):
        self.skips = skips
        self.plan: frozenset[int] = frozenset()
        self.step = 0
        self._call = 0  # transformer calls within this step (one, or two where guidance runs apart)
        self._residuals: dict[int, torch.Tensor] = {}
        self.reused = 0  # main-layer passes skipped since start (metrics, tests)
        self.computed = 0

    def begin(self, num_steps: int) -> None:
        self.plan, self.step, self._call = skipped_steps(num_steps, self.skips), 0, 0
        self._residuals.clear()

    def end_step(self) -> None:
        self.step += 1
        self._call = 0

    def end(self) -> None:
        self.plan = frozenset()
        self._residuals.clear()  # (up to 32 MB per image at 1024²)

    def layers(self, layers: list[nn.Module]) -> Iterator[Callable]:
        """What the transformer's main loop runs for its next call."""
        if not self.plan or not layers:
            return iter(layers)
        call = self._call
        self._call += 1
        residual = self._residuals.pop(call, None)
        if self.step in self.plan and residual is not None:
            return iter((self._reuse(residual, layers),))
        self.computed += 1
        if self.step + 1 not in self.plan:
            return iter(layers)
        return iter(self._recording(layers, call))

    def _reuse(self, residual: torch.Tensor, layers: list[nn.Module]) -> Callable:
        def reuse(x: torch.Tensor, *args) -> torch.Tensor:
            if x.shape == residual.shape:
                self.reused += 1
                return x + residual
            for layer in layers:  # guidance switched on or off since the residual was taken: compute
                x = layer(x, *args)
            self.computed += 1
            return x

        return reuse

    def _recording(self, layers: list[nn.Module], call: int) -> list[Callable]:
        """The layers, the first remembering its input and the last storing output − that input."""
        first_input: list[torch.Tensor] = []

        def run_first(x, *args):
            first_input.append(x)
            return layers[0](x, *args)

        def run_last(x, *args):
            out = (layers[-1] if len(layers) > 1 else run_first)(x, *args)
            self._residuals[call] = out - first_input[0]
            return out

        return [run_first, *layers[1:-1], run_last] if len(layers) > 1 else [run_last]


class _CachedLayers(nn.ModuleList):
    """transformer.layers, iterated through a StepCache."""

    def __iter__(self):
        return self.step_cache.layers(list(super().__iter__()))


def install(transformer: nn.Module, cache: StepCache) -> None:
    layers = _CachedLayers(list(nn.ModuleList.__iter__(transformer.layers)))
    object.__setattr__(layers, "step_cache", cache)  # (not a submodule, not a parameter)
    transformer.layers = layers
