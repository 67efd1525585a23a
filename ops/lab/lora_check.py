"""LoRA at the real model's size, beside no LoRA, in one app and one run:

    python -m ops.lab.lora_check --model-dir /tmp/zimage-full --compile on|off [--n 6] [--cycles 100]

Makes LoRA files for the model's transformer (random factors; the layer names and shapes come from
its config, built on the meta device, so no peft is needed), starts the app with lora_dir, and
prints one JSON line per row at --size (1024²), 8 steps:
- e2e p50 with no LoRA, with one LoRA (merged once, then reused), and alternating none / LoRA (a
  merge and a restore per request), for an attention-only rank-32 LoRA and an all-layers rank-16 one;
  the merge seconds from the app's own log; allocated GPU memory after each row;
- PSNR of the LoRA picture against the plain one (the LoRA is in the picture), and of the plain
  picture before and after the LoRA rows (restored exactly: ∞);
- --cycles requests at 256², 1 step, each naming another of 6 files with lora_cache_size 2, so
  every request loads a file and evicts one: allocated memory after the first 6 and at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ops.lab.bench_app import AppRun, emit, psnr
from ops.lab.bench_reference import ensure_model_dir
from ops.tempstack import free_port

ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
ALL_LINEAR = ATTENTION + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of the transformer, from its config (meta device); "tiny":
    the demo model's (a dry run on the CPU)."""
    from diffusers import ZImageTransformer2DModel

    if str(model_dir) == "tiny":
        from app.runtime.tiny import build_tiny_pipeline

        transformer = build_tiny_pipeline().transformer
    else:
        config = json.loads((model_dir / "transformer" / "config.json").read_text())
        with torch.device("meta"):
            transformer = ZImageTransformer2DModel.from_config(config)
    return {
        name: (m.in_features, m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def make_file(path: Path, shapes: dict, targets: tuple, rank: int, seed: int) -> int:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        if name.endswith(targets):
            down = torch.randn(rank, fan_in, generator=generator) * 0.01
            tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
            up = torch.randn(fan_out, rank, generator=generator) * 0.01
            tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    save_file(tensors, str(path))
    return len(tensors) // 2


def picture(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64_png"])))).astype(float)


def allocated(app) -> float:
    return round(
        app.client.get(app.url + "/api/info").json()["live"].get("torch_allocated_bytes", 0) / 2**30, 3
    )


def merge_seconds(app, since: int) -> list[float]:
    found = []
    for line in app.log_path.read_text(errors="replace").splitlines()[since:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "lora_merged":
            found.append(record["seconds"])
    return found


def log_lines(app) -> int:
    return len(app.log_path.read_text(errors="replace").splitlines())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--reference", default=".bench/zimage_gpu_baseline.py")
    parser.add_argument("--compile", default="on")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument(
        "--set", nargs="*", default=[], help="more app settings, key=value (step_cache_skips=2)"
    )
    args = parser.parse_args(argv)
    ensure_model_dir(args.model_dir, args.reference)
    model_dir = Path(args.model_dir)
    home = Path(tempfile.mkdtemp(prefix="lora-"))
    loras = home / "loras"
    loras.mkdir()
    shapes = linear_shapes(model_dir)
    results: list = []
    files = {
        "attn-r32": make_file(loras / "attn-r32.safetensors", shapes, ATTENTION, 32, 1),
        "all-r16": make_file(loras / "all-r16.safetensors", shapes, ALL_LINEAR, 16, 2),
    }
    for i in range(6):
        make_file(loras / f"cycle{i}.safetensors", shapes, ATTENTION, 16, 10 + i)
    emit(
        results,
        event="files",
        layers=files,
        sizes_mb={p.stem: round(p.stat().st_size / 2**20, 1) for p in loras.iterdir()},
    )
    app = AppRun(
        free_port(),
        home,
        model_dir=args.model_dir,
        compile=args.compile,
        lora_dir=loras,
        lora_cache_size=2,
        **dict(kv.split("=", 1) for kv in args.set),
        min_size=64,
    )
    try:
        emit(results, event="ready", seconds=round(app.wait_ready(), 1), allocated_gib=allocated(app))
        size = args.size

        def run(label: str, loras_of) -> list[dict]:
            since = log_lines(app)
            e2e, bodies = [], []
            for i in range(args.n):
                t0 = time.perf_counter()
                bodies.append(app.generate(size, seed=7, response_format="base64", loras=loras_of(i)))
                e2e.append(time.perf_counter() - t0)
            merges = merge_seconds(app, since)
            emit(
                results,
                event="row",
                label=label,
                e2e_p50_s=round(statistics.median(e2e), 3),
                pipeline_p50_s=round(statistics.median(b["timings"]["generation_s"] for b in bodies), 3),
                merges=len(merges),
                merge_p50_s=round(statistics.median(merges), 4) if merges else None,
                merge_max_s=round(max(merges), 4) if merges else None,
                allocated_gib=allocated(app),
            )
            return bodies

        app.generate(size, seed=999)
        plain = picture(run("no LoRA", lambda i: [])[0])
        for name in files:
            app.generate(size, seed=999, loras=[{"name": name}])  # (read and merged once, untimed)
            styled = picture(run(f"{name}, the same LoRA each request", lambda i, n=name: [{"name": n}])[0])
            emit(results, event="picture", lora=name, psnr_vs_plain_db=round(psnr(plain, styled), 2))
            run(f"{name}, alternating with none", lambda i, n=name: [{"name": n}] if i % 2 else [])
        after = picture(app.generate(size, seed=7, response_format="base64"))
        emit(
            results,
            event="picture",
            lora="none, after the LoRA rows",
            psnr_vs_plain_db=round(psnr(plain, after), 2),
        )

        if not args.cycles:
            return 0
        # load / evict cycles: 6 files through a cache of 2, each request a new load
        since = log_lines(app)
        marks = {}
        for i in range(args.cycles):
            app.generate(256, steps=1, seed=i, loras=[{"name": f"cycle{i % 6}"}])
            if i + 1 in (6, args.cycles):
                marks[i + 1] = allocated(app)
        app.generate(256, steps=1, seed=0)
        loads = sum('"lora_loaded"' in line for line in app.log_path.read_text().splitlines()[since:])
        emit(
            results,
            event="cycles",
            requests=args.cycles,
            files_loaded=loads,
            allocated_after_6_gib=marks.get(6),
            allocated_after_all_gib=marks.get(args.cycles),
            allocated_after_none_gib=allocated(app),
        )
    finally:
        app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
