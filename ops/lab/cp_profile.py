"""Where a context-parallel step's time goes: the full-size transformer alone (random weights, no
pipeline, no service), one forward per step at 1024², on one GPU and split over two, in several
variants side by side, each in fresh processes (one per rank).

    python -m ops.lab.cp_profile --variants one,cp-old,cp --profile cp

Variants: `one` (one GPU, compiled as the app compiles), `cp` (the app's context-parallel plan),
`cp-old` (the plan before the noise refiner was split: every refiner attention under Ulysses over a
sequence each rank holds whole), `*-fp8` (`quantize = "fp8"`), `cp-overlap` (`cp` with Inductor's
compute/communication reordering), `*-static` (static shapes instead of the app's dynamic ones).
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


def build(rank: int, spec: dict, port: int):
    import torch
    from diffusers import ZImageTransformer2DModel

    from app.runtime import parallel

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    if spec["world"] > 1:
        parallel.join_group(parallel.RankEnv(rank, spec["world"], "127.0.0.1", port), device)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = ZImageTransformer2DModel().to(torch.bfloat16).eval()  # the released 6B config
    if spec["world"] > 1 and spec["plan"] == "app":
        parallel.enable(transformer, device, spec["world"])
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
    if spec["dynamic"]:
        import torch.fx.experimental._config as fx_config

        fx_config.backed_size_oblivious = True  # as app/runtime/compile.py
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=spec["dynamic"])
    return transformer, device


def worker(rank: int, name: str, port: int, args) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    spec = VARIANTS[name]
    started = time.perf_counter()
    transformer, device = build(rank, spec, port)
    generator = torch.Generator(device).manual_seed(0)  # the same inputs on every rank
    width, _, height = args.size.partition("x")
    shape = (16, 1, int(height or width) // 8, int(width) // 8)
    x = [torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16)]
    caption = [torch.randn(args.caption, 2560, generator=generator, device=device, dtype=torch.bfloat16)]
    t = torch.tensor([0.5], device=device, dtype=torch.bfloat16)

    def steps(n: int = 8) -> float:
        """n forwards back to back; returns the CPU's time to launch them."""
        launched = time.perf_counter()
        for _ in range(n):
            transformer(x, t, caption, return_dict=False)
        return time.perf_counter() - launched

    def sync() -> None:
        torch.cuda.synchronize(device)
        if spec["world"] > 1:
            dist.barrier()

    with torch.inference_mode():
        steps(1)
        sync()
        ready_s = time.perf_counter() - started
        steps(8)
        sync()
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
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
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
    return {
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
