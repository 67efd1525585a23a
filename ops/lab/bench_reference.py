"""The bench's side-by-side parts: the plain-diffusers reference (the model card's snippet, timed in
this process) and the table printed at the end of a run."""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path
from typing import Optional

from ops.lab.bench_app import PROMPT, emit


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("zimage_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model_dir(reference, model_dir: Path, results: list) -> None:
    """The reference's own full-size random pipeline, saved in diffusers layout for the app to load."""
    if (model_dir / "model_index.json").exists():
        return
    import torch

    t0 = time.time()
    pipe = reference.build()
    pipe.save_pretrained(str(model_dir), safe_serialization=True)
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) / 2**30
    emit(results, event="model_saved", seconds=round(time.time() - t0, 1), size_gib=round(size, 1))
    del pipe
    torch.cuda.empty_cache()


def ensure_model_dir(model_dir: str, reference_path: str) -> Optional[float]:
    """The lab tools' model: `model_dir` built from the reference script unless it holds a model
    already (or is "tiny", the app's demo model). Returns the seconds building took, or None."""
    path = Path(model_dir)
    if model_dir == "tiny" or (path / "model_index.json").exists():
        return None
    started = time.time()
    build_model_dir(load_reference(reference_path), path, [])
    return time.time() - started


def run_reference(reference, results: list, size: int = 1024, n: int = 5, steps: int = 9) -> None:
    """Plain diffusers as the model card shows it: eager, bf16, default attention (the card's 9
    steps unless told: diffusers 0.42 runs Turbo's 8 forwards at num_inference_steps=8)."""
    import torch

    pipe = reference.build()
    kw = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0)
    pipe(**kw, generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(**kw, generator=torch.Generator("cuda").manual_seed(i))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    emit(
        results,
        event="reference",
        size=size,
        steps=steps,
        median_s=round(statistics.median(times), 3),
        min_s=round(min(times), 3),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
    )
    del pipe
    torch.cuda.empty_cache()


def print_table(results: list) -> None:
    rows = [("measurement", "figure")]
    for r in results:
        e = r["event"]
        if e == "env":
            rows.append(("device", f"{r['gpu']}, torch {r['torch']}, {r['date']}"))
        elif e == "reference":
            rows.append(
                (f"reference (plain diffusers) {r['size']}²", f"{r['median_s']} s, peak {r['peak_gib']} GiB")
            )
        elif e == "latency":
            rows.append(
                (
                    f"latency {r['size']}²: {r['label']}",
                    f"e2e p50 {r['e2e_p50_s']} s (pipeline {r['pipeline_p50_s']} s = "
                    + f"encode {r['encode_p50_s']} + denoise {r['denoise_p50_s']} "
                    + f"+ decode {r['decode_p50_s']}); "
                    + f"overhead {r['overhead_pct']} %"
                    + (f"; {r['speedup']}× the reference" if r.get("speedup") else ""),
                )
            )
        elif e == "throughput":
            rows.append(
                (
                    f"throughput {r['size']}²: {r['label']}",
                    f"{r['images_per_hour']} img/h ({r['images']} in {r['wall_s']} s)",
                )
            )
        elif e == "quality":
            rows.append(
                (
                    f"quality: {r['label']}",
                    f"PSNR {r['psnr_db']} dB (4× downscaled {r['psnr_4x_down_db']} dB)",
                )
            )
        elif e == "loadspeed":
            rows.append(
                (
                    f"reading a {r['file_gb']} GB file to the GPU",
                    ", ".join(f"{k} {v}" for k, v in r.items() if k.endswith("_s")),
                )
            )
        elif e == "error":
            rows.append((f"FAILED phase {r['phase']}", r["error"][-200:]))
        elif e == "first_requests":
            rows.append(
                ("first requests after start", ", ".join(f"{k} {v}" for k, v in r.items() if k != "event"))
            )
        elif e == "cold_start":
            parts = ", ".join(f"{k} {v}" for k, v in r.get("breakdown", {}).items())
            first = f" + first image {r['first_image_s']} s" if "first_image_s" in r else ""
            rows.append(
                (
                    f"start to ready: {r['label']}",
                    f"{r['ready_s']} s{first}" + (f" ({parts})" if parts else ""),
                )
            )
    width = max(len(a) for a, _ in rows)
    print("\n" + "\n".join(f"{a:<{width}}  {b}" for a, b in rows), flush=True)
