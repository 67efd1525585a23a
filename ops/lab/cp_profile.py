"""Where a context-parallel step's time goes: the full-size transformer alone (random weights, no
pipeline, no service), one forward per step at 1024², on one GPU and split over two, in several
variants side by side, each in fresh processes (one per rank).

    python -m ops.lab.cp_profile --variants one,cp-old,cp --profile cp

Variants: `one` (one GPU, compiled as the app compiles), `cp` (the app's context-parallel plan),
`cp-old` (the plan before the noise refiner was split: every refiner attention under Ulysses over a
sequence each rank holds whole), `*-fp8` (`quantize = "fp8"`), `cp-overlap` (`cp` with Inductor's
compute/communication reordering), `*-static` (static shapes instead of the app's dynamic ones),
`cp-ov*` (parallel_attention = "overlapped": app/runtime/ulysses.py), `*-cpp` (Inductor's C++
wrapper around the kernels instead of its Python one: less CPU per block),
`*-skipguards` (after the warm-up, dynamo's skip_guard_eval_unsafe stance: only the guards that tell
compiled entries apart are checked), `*-graphs` (mode="reduce-overhead", CUDA graphs: fails under
regional compilation, each block's graph overwrites the output the next block reads; H200, torch 2.11),
`*-graphs-clone` (the same with each block's output copied out of its graph's memory),
`*-floats` (floats as graph inputs, as the app compiled before 2026-12-01),
`*-pipe` (diffusers' ZImagePipeline denoising loop around the same transformer: its scheduler and
per-step Python on top of the forwards) and `cp-pipe-vote` (the same with the app's per-step cancel
vote, one all-reduce over the gloo group, as app/runtime/engine.py and follower.py make it).
Per variant: ms per step over rounds of 8 forwards launched back to back (as the pipeline does), the
CPU's time to launch them (equal to the step time once the launch queue is full: read it only when
it is well below), and with --profile, rank 0's kernel time per step by kind and the
GPU's idle time (wall minus the union of kernel intervals, all streams). One JSON line each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

from ops.lab.kernel_profile import category
from ops.tempstack import free_port

VARIANTS = {
    "one": dict(world=1, plan="app", dynamic=True),
    "one-static": dict(world=1, plan="app", dynamic=False),
    "cp": dict(world=2, plan="app", dynamic=True),
    "cp-static": dict(world=2, plan="app", dynamic=False),
    "cp-old": dict(world=2, plan="old", dynamic=True),
    "cp-overlap": dict(world=2, plan="app", dynamic=True, overlap=True),
    "one-fp8": dict(world=1, plan="app", dynamic=True, fp8=True),
    "cp-fp8": dict(world=2, plan="app", dynamic=True, fp8=True),
    "one-graphs": dict(world=1, plan="app", dynamic=True, mode="reduce-overhead"),
    "cp-graphs": dict(world=2, plan="app", dynamic=True, mode="reduce-overhead"),
    "one-graphs-clone": dict(world=1, plan="app", dynamic=True, mode="reduce-overhead", clone=True),
    "one-pipe-graphs-clone": dict(
        world=1, plan="app", dynamic=True, mode="reduce-overhead", clone=True, pipe=True
    ),
    "cp-graphs-clone": dict(world=2, plan="app", dynamic=True, mode="reduce-overhead", clone=True),
    "cp-pipe-graphs-clone": dict(
        world=2, plan="app", dynamic=True, mode="reduce-overhead", clone=True, pipe=True
    ),
    "one-pipe": dict(world=1, plan="app", dynamic=True, pipe=True),
    "cp-pipe": dict(world=2, plan="app", dynamic=True, pipe=True),
    "cp-pipe-vote": dict(world=2, plan="app", dynamic=True, pipe=True, vote=True),
    "cp-ov": dict(world=2, plan="app", dynamic=True, attention="overlapped"),
    "cp-ov-fp8": dict(world=2, plan="app", dynamic=True, attention="overlapped", fp8=True),
    "cp-ov-pipe-vote": dict(world=2, plan="app", dynamic=True, attention="overlapped", pipe=True, vote=True),
    "one-floats": dict(world=1, plan="app", dynamic=True, floats=True),
    "one-pipe-floats": dict(world=1, plan="app", dynamic=True, pipe=True, floats=True),
    "cp-floats": dict(world=2, plan="app", dynamic=True, floats=True),
    "one-cpp": dict(world=1, plan="app", dynamic=True, cpp=True),
    "cp-cpp": dict(world=2, plan="app", dynamic=True, cpp=True),
    "one-skipguards": dict(world=1, plan="app", dynamic=True, skipguards=True),
    "cp-skipguards": dict(world=2, plan="app", dynamic=True, skipguards=True),
    "one-cpp-skipguards": dict(world=1, plan="app", dynamic=True, cpp=True, skipguards=True),
    "cp-cpp-skipguards": dict(world=2, plan="app", dynamic=True, cpp=True, skipguards=True),
    "cp-cpp-skipguards-pipe-vote": dict(
        world=2, plan="app", dynamic=True, cpp=True, skipguards=True, pipe=True, vote=True
    ),
}


def log(**row) -> None:
    print(json.dumps(row, default=str), flush=True)


def kind(name: str) -> str:
    return "communication" if "nccl" in name.lower() else category(name)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The union's length: kernels on several streams (NCCL's own) may overlap."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def build(rank: int, spec: dict, port: int, tiny: bool = False):
    import torch
    from diffusers import ZImageTransformer2DModel

    from app.runtime import parallel

    # (--tiny: the demo model's transformer on the CPU over gloo, to try a variant before a GPU run)
    device = torch.device("cpu") if tiny else torch.device("cuda", rank)
    if not tiny:
        torch.cuda.set_device(device)
    if spec["world"] > 1:
        parallel.join_group(parallel.RankEnv(rank, spec["world"], "127.0.0.1", port), device)
    torch.manual_seed(0)
    if tiny:
        from app.runtime.tiny import build_tiny_pipeline

        transformer = build_tiny_pipeline(torch.bfloat16).transformer
    else:
        with torch.device(device):
            transformer = ZImageTransformer2DModel().to(torch.bfloat16).eval()  # the released 6B config
    if spec["world"] > 1 and spec["plan"] == "app":
        parallel.enable(transformer, device, spec["world"], spec.get("attention", "diffusers"))
    elif spec["world"] > 1:
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=spec["world"]),
            cp_plan=parallel.cp_plan(split_refiner=False),
        )
        parallel._cache_forward_signatures(transformer)
    if spec.get("fp8"):  # after the hooks, as app/runtime/loader.py orders it
        from app.runtime.fp8 import quantize_transformer

        quantize_transformer(transformer)
    if spec.get("overlap"):
        import torch._inductor.config as inductor_config

        inductor_config.reorder_for_compute_comm_overlap = True
    if spec.get("cpp"):
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
    if spec["dynamic"]:
        from app.runtime.compile import configure_dynamic_compile

        configure_dynamic_compile()  # as the app compiles
        if spec.get("floats"):  # as it compiled before floats were constants
            import torch._dynamo.config as dynamo_config

            dynamo_config.specialize_float = False
    transformer.compile_repeated_blocks(
        fullgraph=True, dynamic=spec["dynamic"], mode=spec.get("mode", "default")
    )
    if spec.get("clone"):  # as the app does for its CUDA-graph modes
        from app.runtime.compile import copy_block_outputs

        copy_block_outputs(transformer)
    return transformer, device


def make_pipeline(transformer):
    """diffusers' own ZImagePipeline around `transformer`: prompt embeddings go in, latents come out,
    so no text encoder, tokenizer or VAE is needed (the VAE's absence means a scale factor of 8)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def worker(rank: int, name: str, port: int, args) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    spec = VARIANTS[name]
    started = time.perf_counter()
    transformer, device = build(rank, spec, port, args.tiny)
    generator = torch.Generator(device).manual_seed(0)  # the same inputs on every rank
    width, _, height = args.size.partition("x")
    width, height = int(width), int(height or width)
    x = [
        torch.randn(16, 1, height // 8, width // 8, generator=generator, device=device, dtype=torch.bfloat16)
    ]
    caption = [
        torch.randn(
            args.caption,
            transformer.config.cap_feat_dim,
            generator=generator,
            device=device,
            dtype=torch.bfloat16,
        )
    ]
    t = torch.tensor([0.5], device=device, dtype=torch.bfloat16)
    if spec.get("pipe"):
        from app.runtime.parallel import RankLink

        pipe = make_pipeline(transformer)
        link = RankLink(rank) if spec.get("vote") else None

        def vote(_pipe, _step, _timestep, callback_kwargs):
            if link is not None and link.agree_to_stop(False):
                raise RuntimeError("nobody votes to stop here")
            return callback_kwargs

        def steps(n: int = 8) -> float:
            """One pipeline call of n steps; returns its CPU time (the scheduler synchronises once)."""
            launched = time.perf_counter()
            pipe(
                prompt_embeds=caption,
                height=height,
                width=width,
                num_inference_steps=n,
                guidance_scale=0.0,
                generator=torch.Generator(device).manual_seed(0),
                output_type="latent",
                callback_on_step_end=vote if link is not None else None,
            )
            return time.perf_counter() - launched

    else:

        def steps(n: int = 8) -> float:
            """n forwards back to back; returns the CPU's time to launch them."""
            launched = time.perf_counter()
            for _ in range(n):
                transformer(x, t, caption, return_dict=False)
            return time.perf_counter() - launched

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if spec["world"] > 1:
            dist.barrier()

    with torch.inference_mode():
        steps(1)
        sync()
        ready_s = time.perf_counter() - started
        steps(8)
        sync()
        if spec.get("skipguards"):  # (entries compiled: from here only their differences are checked)
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        walls, launches = [], []
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            launches.append(steps(8))
            sync()
            walls.append(time.perf_counter() - t0)
        row = {
            "variant": name,
            "size": args.size,
            "world": spec["world"],
            "ms_per_step": round(min(walls) / 8 * 1e3, 2),
            "median_ms_per_step": round(sorted(walls)[len(walls) // 2] / 8 * 1e3, 2),
            "launch_ms_per_step": round(min(launches) / 8 * 1e3, 2),
            "built_and_compiled_s": round(ready_s, 1),
            "allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        }
        if name in args.profile.split(","):
            sync()
            activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.profile_cpu else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                steps(8)
                sync()
                wall_us = (time.perf_counter() - t0) * 1e6
            if rank == 0:
                row.update(summarise(prof, wall_us, args.top))
    if rank == 0:
        log(**row)
    if spec["world"] > 1:
        dist.destroy_process_group()


def summarise(prof, wall_us: float, top: int) -> dict:
    import torch

    per_kernel: collections.Counter = collections.Counter()
    intervals = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time
            intervals.append((event.time_range.start, event.time_range.end))
    by_kind: collections.Counter = collections.Counter()
    for name, us in per_kernel.items():
        by_kind[kind(name)] += us
    busy = busy_us(intervals)
    cpu = collections.Counter()
    for average in prof.key_averages():  # empty unless --profile-cpu
        if average.self_cpu_time_total > 0:
            cpu[average.key] += average.self_cpu_time_total
    extra = {}
    if cpu:  # CPU time in operators (the rest of a step's CPU time is Python around them)
        extra = {
            "cpu_in_ops_ms_per_step": round(sum(cpu.values()) / 8e3, 2),
            "top_cpu_ops_ms_per_step": [[round(us / 8e3, 2), n[:110]] for n, us in cpu.most_common(top)],
        }
    return {
        **extra,
        "profiled_wall_ms_per_step": round(wall_us / 8e3, 2),
        "gpu_busy_ms_per_step": round(busy / 8e3, 2),
        "gpu_idle_ms_per_step": round((wall_us - busy) / 8e3, 2),
        "kernel_ms_per_step_by_kind": {k: round(v / 8e3, 2) for k, v in by_kind.most_common()},
        "top_kernels_ms_per_step": [
            [round(us / 8e3, 2), kind(n), n[:110]] for n, us in per_kernel.most_common(top)
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="one,cp-old,cp")
    parser.add_argument("--profile", default="", help="comma list of variants to profile")
    parser.add_argument(
        "--size", default="1024", help="1024 or WxH: one GPU at 1024x512 does a rank's share of the rows"
    )
    parser.add_argument("--caption", type=int, default=64, help="caption tokens (a multiple of 32)")
    parser.add_argument("--profile-cpu", action="store_true", help="and the CPU's time by operator")
    parser.add_argument("--tiny", action="store_true", help="the demo model on the CPU (a dry run)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compile-cache", default="/tmp/cp-profile-cache")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", args.compile_cache)
    import torch.multiprocessing as mp

    for name in args.variants.split(","):
        spec = VARIANTS[name]
        t0 = time.time()
        try:
            mp.spawn(worker, args=(name, free_port(), args), nprocs=spec["world"], join=True)
        except Exception as exc:  # one variant failing still leaves the others' rows
            log(variant=name, error=repr(exc)[-2000:])
        log(event="variant_done", variant=name, seconds=round(time.time() - t0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
