"""One image on several GPUs: diffusers' context parallelism (Ulysses) for Z-Image's transformer.

Each rank is a process with one GPU and the whole pipeline. Rank 0 is the app: it takes requests and,
before each pipeline call, broadcasts what to run (a RankWork: prompts, size, steps, seeds, images)
to the other ranks, which run the same call (app/follower.py). Inside the 30 main layers every rank
holds 1/N of the token sequence; attention all-to-alls heads against tokens, so it still sees every
token (lossless: the same image as one GPU within bf16 noise; docs/PERFORMANCE.md). The noise
refiner is split the same way. Text encoding, the caption refiner and the VAE run whole on every
rank: they are a small part of the time, and running them everywhere costs no communication.

Everything the ranks do together must happen in the same order on all of them, or a collective
waits forever. Hence: a cancel is agreed at every step (one tiny all-reduce on a CPU group), and a
failure inside a generation is not survivable (the ranks may be at different collectives): the
engine becomes unhealthy and the monitor replaces the group (app/ranks.py ties the processes
together so no rank outlives the others).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)


# Where the sequence is split and gathered (a diffusers ContextParallelModelPlan). Z-Image has no
# _cp_plan in diffusers 0.42.1. Its forward builds one unified sequence (image tokens, then caption
# tokens) before the 30 main layers: the first main layer's input is split along the sequence, every
# main layer splits its RoPE frequencies the same way (they are passed whole to each), and the final
# layer's output is gathered back before unpatchify. The attention mask of a merged batch stays whole:
# after the all-to-all, attention sees the whole sequence, which is what the mask describes.
#
# The noise refiner (2 layers over the image tokens alone, before the caption joins them) is split
# the same way and gathered after its last layer (by our own hook, registered in enable()). Left
# whole, it was worse than unsplit: enable_parallelism gives every attention module the Ulysses
# config, and Ulysses over a sequence every rank holds whole attends over N copies of it (the same
# result, N times the attention work and the all-to-alls of the full sequence). The context
# refiner's caption is too short to split (tens of tokens), so its attention is made local again.
def cp_plan(patch_key: str = "2-1", refiner_layers: int = 2, split_refiner: bool = True) -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    def split():
        return ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)

    plan = {
        "layers.0": {"x": split()},
        "layers.*": {"freqs_cis": split()},
        f"all_final_layer.{patch_key}": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    if split_refiner and refiner_layers >= 2:  # (the gather after the last: sequence_gather_hook)
        plan |= {"noise_refiner.0": {"x": split()}, "noise_refiner.*": {"freqs_cis": split()}}
    return plan


def sequence_gather_hook(group, world_size: int):
    """A diffusers hook that gathers a block's output back along the sequence (dim 1), for the last
    noise-refiner layer. Not diffusers' own gather hook: that one all-gathers along dim 1 through
    torch's _maybe_view_chunk_cat, which dynamo refuses to trace, and the refiner blocks are compiled
    with fullgraph (the H200 start failed there; the final layer, where the plan gathers the main
    layers, is not compiled). This gathers along dim 0, which needs no such step, and reorders with
    plain tensor ops."""
    from diffusers.hooks.hooks import ModelHook

    class SequenceGather(ModelHook):
        def post_forward(self, module, output):
            import torch.distributed._functional_collectives as funcol

            b = output.shape[0]
            gathered = funcol.wait_tensor(
                torch.ops._c10d_functional.all_gather_into_tensor(
                    output.contiguous(), world_size, group.group_name
                )
            )  # (world · b, s, d): rank 0's batch, then rank 1's
            gathered = gathered.view(world_size, b, *output.shape[1:]).transpose(0, 1)
            return gathered.reshape(b, world_size * output.shape[1], *output.shape[2:])

    return SequenceGather()


def make_local(modules) -> None:
    """Attention in `modules` back to one rank's own (no all-to-all): for sequences every rank holds
    whole."""
    for module in modules.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and getattr(processor, "_parallel_config", None) is not None:
            processor._parallel_config = None


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the group, from the environment app/ranks.py sets (torchrun's names)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, env=os.environ) -> Optional["RankEnv"]:
        if "ZIMAGE_PARALLEL_RANK" not in env:
            return None
        return cls(
            rank=int(env["ZIMAGE_PARALLEL_RANK"]),
            world_size=int(env["ZIMAGE_PARALLEL_WORLD"]),
            master_addr=env.get("ZIMAGE_PARALLEL_ADDR", "127.0.0.1"),
            master_port=int(env["ZIMAGE_PARALLEL_PORT"]),
        )


_control_group = None


def join_group(env: RankEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group (NCCL between GPUs, gloo on a CPU) and make the CPU group that carries
    the work and the per-step cancel vote (small objects; no GPU synchronisation). Idempotent."""
    global _control_group
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    log.info(
        "joined the context-parallel group",
        extra={"event": "parallel_joined", "rank": env.rank, "world": env.world_size, "backend": backend},
    )


@contextlib.contextmanager
def _cpu_counts_as_one_device(device: torch.device):
    """diffusers 0.42.1 picks each rank's device as rank % torch.accelerator.device_count(), which is
    a division by zero without an accelerator. On a CPU (the tests, gloo) there is one device."""
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


# Image tokens are (height/16)·(width/16) for sizes in multiples of 64: always a multiple of 16;
# captions are padded to a multiple of 32. A degree that divides 16 splits every sequence evenly.
SEQUENCE_DEGREES = (2, 4, 8)


def enable(transformer, device: torch.device, world_size: int, attention: str = "diffusers") -> str:
    """Shard Z-Image's noise refiner and main layers over the group (Ulysses: heads must divide by
    the ranks, and so must every sequence). attention="overlapped" (two ranks): the split blocks'
    exchanges overlap their projections (app/runtime/ulysses.py) instead of diffusers' Ulysses."""
    from diffusers import ContextParallelConfig

    heads = transformer.config.n_heads
    if heads % world_size or world_size not in SEQUENCE_DEGREES:
        fits = [d for d in SEQUENCE_DEGREES if heads % d == 0]
        raise ValueError(
            f"context parallelism over {world_size} GPUs needs the attention heads ({heads}) to divide "
            f"by {world_size}, and {world_size} to be one of {list(SEQUENCE_DEGREES)} (the sequence "
            f"splits evenly); this model fits parallel_degree in {fits or 'none'}"
        )
    patch_key = f"{transformer.config.all_patch_size[0]}-{transformer.config.all_f_patch_size[0]}"
    plan = cp_plan(patch_key, len(transformer.noise_refiner))
    with _cpu_counts_as_one_device(device):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size), cp_plan=plan)
    make_local(transformer.context_refiner)
    if "noise_refiner.0" in plan:
        from diffusers.hooks import HookRegistry

        group = transformer._parallel_config.context_parallel_config._flattened_mesh.get_group()
        registry = HookRegistry.check_if_exists_or_initialize(transformer.noise_refiner[-1])
        registry.register_hook(sequence_gather_hook(group, world_size), "zimage_cp_refiner_gather")
    else:
        make_local(transformer.noise_refiner)
    how = "diffusers' Ulysses"
    if attention == "overlapped" and world_size == 2:
        split = list(transformer.layers) + (
            list(transformer.noise_refiner) if "noise_refiner.0" in plan else []
        )
        _overlap_exchanges(transformer, split)
        how = "Ulysses, exchanges overlapped with the projections"
    _cache_forward_signatures(transformer)
    return f"context parallel: {how} over {world_size} ranks (one image per {world_size} GPUs)"


def _overlap_exchanges(transformer, blocks) -> None:
    """The split blocks' attention through app/runtime/ulysses.py, on the group diffusers' Ulysses
    would use, keeping the attention backend the model was set to."""
    import torch.distributed as dist

    from app.runtime.ulysses import OverlappedUlyssesProcessor

    group = transformer._parallel_config.context_parallel_config._ulysses_mesh.get_group()
    rank = dist.get_rank(group)
    for block in blocks:
        replaced = block.attention.processor
        processor = OverlappedUlyssesProcessor(group.group_name, rank)
        processor._attention_backend = getattr(replaced, "_attention_backend", None)
        block.attention.processor = processor


def _cache_forward_signatures(transformer) -> None:
    """diffusers' split hook finds a positional argument by inspecting the module's forward signature
    at its first call, and caches it. Under torch.compile that first call is traced, and dynamo
    cannot trace inspect.signature (the hooks sit on the compiled blocks): the H200's first compiled
    start failed there. Filled in here, before anything is traced."""
    import inspect

    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if isinstance(hook, ContextParallelSplitHook):
                meta = hook.module_forward_metadata
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]  # without self
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}


@dataclass
class RankWork:
    """What every rank runs for one batch: the engine's BatchRequest, with seeds in place of the
    generators (a generator does not travel; the same seed makes the same noise on every rank)."""

    prompts: list[str]
    negatives: Optional[list[str]]
    width: int
    height: int
    num_inference_steps: int
    cfg_scale: float
    seeds: list[int]
    init_images: Optional[list] = None
    mask_images: Optional[list] = None
    strength: float = 1.0
    loras: tuple = ()
    eager_on_recompile: bool = False  # rank 0's compile stance after its warm-up, followed by all
    step_delays: tuple = ()  # (rank, seconds): a drill's slow rank (zimagectl chaos slow --rank)

    @classmethod
    def of(cls, request, seeds: list[int], eager_on_recompile: bool, step_delays: tuple = ()) -> "RankWork":
        fields = {
            f.name: getattr(request, f.name) for f in dataclasses.fields(cls) if hasattr(request, f.name)
        }
        return cls(**fields, seeds=seeds, eager_on_recompile=eager_on_recompile, step_delays=step_delays)

    def request(self):
        from app.runtime.stages import BatchRequest

        names = {f.name for f in dataclasses.fields(BatchRequest)} - {"generators"}
        return BatchRequest(
            **{n: getattr(self, n) for n in names},
            generators=[torch.Generator("cpu").manual_seed(s) for s in self.seeds],
        )


class RankLink:
    """The collectives rank 0 and the followers make together besides the model's own. Every call
    is made by every rank, in the same order: rank 0 from the engine thread only."""

    def __init__(self, rank: int):
        self.rank = rank

    def share(self, work: Optional[RankWork]) -> Optional[RankWork]:
        """Rank 0 sends `work` (None: stop); the others receive it."""
        import torch.distributed as dist

        box = [work]
        dist.broadcast_object_list(box, src=0, group=_control_group)
        return box[0]

    def agree_to_stop(self, stop: bool) -> bool:
        """Rank 0's cancel, known to every rank at the same step (only rank 0 ever votes yes)."""
        import torch.distributed as dist

        flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control_group)
        return bool(flag.item())
