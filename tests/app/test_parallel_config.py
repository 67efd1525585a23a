"""parallel = "context": what the settings refuse, which GPU each rank gets, and the work a rank
receives making the same noise as rank 0's own generators, and a drill's slow rank (the CPU run of
the ranks themselves is tests/integration/test_context_parallel.py)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch

from app.config import load_settings
from app.ranks import rank_gpus
from app.runtime.faults import FaultInjector
from app.runtime.parallel import RankEnv, RankWork, cp_plan, enable
from app.runtime.stages import BatchRequest
from common.configfile import ConfigError


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"replicas": 2}, "replicas = 1"),
        ({"offload": "model"}, "offload = 'none'"),
        ({"step_cache_skips": 1}, "step_cache_skips"),
        ({"parallel_degree": 1}, "parallel_degree"),
    ],
)
def test_settings_that_cannot_run_across_ranks_are_refused_with_the_reason(extra, reason):
    with pytest.raises((ConfigError, ValueError)) as err:
        load_settings(env={}, parallel="context", **extra)
    assert reason in str(err.value)


def test_each_rank_gets_its_own_gpu_from_the_visible_ones():
    assert rank_gpus(2, "3,5,6") == ["3", "5"]
    assert rank_gpus(2, "GPU-aaa,GPU-bbb") == ["GPU-aaa", "GPU-bbb"]
    with pytest.raises(RuntimeError, match="needs 2 GPUs; this process sees 1"):
        rank_gpus(2, "0")
    assert rank_gpus(2, "") == [None, None]  # no GPU: the CPU path


def test_the_rank_environment_is_read_only_when_set():
    assert RankEnv.from_env({}) is None
    env = {"ZIMAGE_PARALLEL_RANK": "1", "ZIMAGE_PARALLEL_WORLD": "2", "ZIMAGE_PARALLEL_PORT": "2900"}
    assert RankEnv.from_env(env) == RankEnv(1, 2, "127.0.0.1", 2900)


def test_shared_work_makes_the_same_noise_as_rank_zeros_generators():
    seeds = [7, 8]
    request = BatchRequest(
        prompts=["a", "b"],
        negatives=None,
        width=128,
        height=64,
        num_inference_steps=8,
        cfg_scale=0.0,
        generators=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        strength=0.6,
    )
    work = RankWork.of(request, seeds, eager_on_recompile=True)
    again = work.request()
    assert (again.prompts, again.width, again.height, again.strength) == (["a", "b"], 128, 64, 0.6)
    for mine, theirs in zip(request.generators, again.generators):
        assert torch.equal(torch.randn(4, generator=mine), torch.randn(4, generator=theirs))


def test_the_plan_splits_the_noise_refiner_and_the_main_layers_and_gathers_the_final_layer():
    # (the refiner's gather is a hook of ours, registered by enable(): the CP integration tests)
    plan = cp_plan("2-1", refiner_layers=2)
    assert set(plan) == {"layers.0", "layers.*", "all_final_layer.2-1", "noise_refiner.0", "noise_refiner.*"}
    assert plan["layers.0"]["x"].split_dim == 1 and plan["layers.*"]["freqs_cis"].split_dim == 1
    assert plan["noise_refiner.0"]["x"].split_dim == 1 and plan["noise_refiner.*"]["freqs_cis"].split_dim == 1
    assert plan["all_final_layer.2-1"].gather_dim == 1
    assert set(cp_plan("2-1", split_refiner=False)) == {"layers.0", "layers.*", "all_final_layer.2-1"}


@pytest.mark.parametrize("degree", [3, 4, 5, 6])
def test_a_degree_that_cannot_split_the_heads_or_every_sequence_is_refused_with_the_degrees_that_fit(degree):
    # The real model's 30 heads: 3, 5 and 6 divide them but not a 1024² image's 4096 + 64 tokens
    # (they failed at the first request); 4 does not divide the heads. Refused before anything runs.
    transformer = SimpleNamespace(config=SimpleNamespace(n_heads=30))
    with pytest.raises(ValueError, match=r"fits parallel_degree in \[2\]"):
        enable(transformer, torch.device("cpu"), degree)


def test_a_slow_rank_fault_travels_with_the_work_to_that_rank_only():
    """zimagectl chaos slow --rank 1: rank 1 sleeps in its own steps while rank 0 waits for it in a
    collective (the stall end to end: tests/integration/test_context_parallel.py)."""
    faults = FaultInjector(enabled=True)
    faults.inject("slow", seconds=3.0, rank=1)
    assert faults.step_delay_s == 0.0 and faults.shared_step_delays() == ((1, 3.0),)
    assert faults.state()["rank_step_delays"] == {"1": 3.0}
    request = BatchRequest(["a"], None, 64, 64, 8, 0.0, [torch.Generator("cpu").manual_seed(1)])
    work = pickle.loads(pickle.dumps(RankWork.of(request, [1], False, faults.shared_step_delays())))
    assert dict(work.step_delays) == {1: 3.0}  # (broadcast_object_list pickles it)
    faults.inject("slow", seconds=0.0, rank=1)
    assert faults.shared_step_delays() == ()
    faults.inject("slow", seconds=2.0, rank=2)
    faults.inject("clear")
    assert faults.shared_step_delays() == ()
    with pytest.raises(ValueError, match="only 'slow' reaches another rank"):
        faults.inject("oom", rank=1)
    assert faults.oom_pending == 0
    off = FaultInjector(enabled=False)
    off.rank_step_delays[1] = 5.0  # (cannot be set through inject when disabled; never shared)
    assert off.shared_step_delays() == ()
