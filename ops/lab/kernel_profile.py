"""Where one 1024² image's GPU time goes: kernel time by kind (matrix products, attention, fused
Triton kernels, the rest) and the costliest kernels, through the app's own loaded pipeline (AOT
packages and all), next to the wall time of the same encode + denoise. A wall time well above the
kernel time means the GPU waits on the CPU (docs/PERFORMANCE.md, "where a 1024² image's time goes").

    python -m ops.lab.kernel_profile --model-dir /tmp/zimage-full --compile-cache DIR [setting=value ...]

e.g. `quantize=fp8`. GPU only; the model directory is the one `zimagectl bench` builds.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

PROMPT = "a red fox in the snow, photorealistic, golden hour"


def category(kernel: str) -> str:
    name = kernel.lower()
    if "attention" in name or "fmha" in name or "flash" in name or ("cudnn" in name and "sdpa" in name):
        return "attention"
    if any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "gemv")):
        return "matrix products"
    if "triton" in name:
        return "fused triton"
    return "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--compile-cache", required=True)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("settings", nargs="*", help="app settings as key=value")
    args = parser.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from app.config import load_settings
    from app.runtime.loader import load_pipeline

    extra = dict(item.split("=", 1) for item in args.settings)
    loaded = load_pipeline(
        load_settings(env={}, model_dir=args.model_dir, compile_cache_dir=args.compile_cache, **extra)
    )
    print(json.dumps({"notes": loaded.notes, "phases": loaded.phases}), flush=True)
    pipe = loaded.pipe
    call = dict(
        prompt=PROMPT,
        height=1024,
        width=1024,
        num_inference_steps=8,
        guidance_scale=0.0,
        output_type="latent",
    )

    def one(seed: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(**call, generator=torch.Generator("cuda").manual_seed(seed))
        torch.cuda.synchronize()
        return time.perf_counter() - started

    for seed in range(3):  # warm: the text encoder's graph, cuDNN plans, the allocator
        one(seed)
    wall = statistics.median(one(seed) for seed in range(5))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one(7)
    per_kernel: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time
            calls[event.name] += 1
    by_kind: collections.Counter = collections.Counter()
    for name, us in per_kernel.items():
        by_kind[category(name)] += us
    print(
        json.dumps(
            {
                "wall_ms": round(wall * 1e3, 1),
                "kernel_ms": round(sum(per_kernel.values()) / 1e3, 1),
                "by_kind_ms": {k: round(v / 1e3, 1) for k, v in by_kind.most_common()},
            }
        ),
        flush=True,
    )
    for name, us in per_kernel.most_common(args.top):
        print(f"{us / 1e3:9.2f} ms {calls[name]:5d}x  {category(name):15s} {name[:140]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
