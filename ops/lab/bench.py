"""zimagectl bench: the performance table, measured side by side with plain diffusers in one run.

On a GPU machine (full-size Z-Image architecture, random weights: weight values change neither
FLOPs nor memory):
    python -m ops.lab.bench --reference .bench/zimage_gpu_baseline.py --out bench.json
builds and saves the full-size pipeline once (diffusers layout), times the reference snippet
(plain diffusers, eager, bf16), then starts the real app (`python -m app`) on that directory and
measures through POST /api/generate: warm latency with its stage split, service overhead, batched
throughput, the lossy opt-ins (FP8; the step cache, alone and with FP8) each with a same-seed
quality check against the default, cold start
(empty and warm compile cache, with where the time goes) and a 16 GiB per-process cap. Without a
GPU it runs the same steps on the tiny demo model, so the tool itself is tested on every machine.
Every measurement is one JSON line as it happens; the table comes at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ops.lab.bench_app import PROMPT, REPO, AppRun, emit, measure_latency, measure_throughput, quality_row
from ops.lab.bench_reference import build_model_dir, load_reference, print_table, run_reference
from ops.tempstack import free_port

__all__ = ["main", "REPO"]
ALL_PHASES = ",".join(
    [
        "reference",
        "latency",
        "jobs",
        "throughput",
        "fp8",
        "stepcache",
        "coldstart",
        "startopts",
        "loadspeed",
        "fastload",
        "parts",
        "dynamic",
        "jit",
        "cap16",
    ]
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="zimagectl bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference", help="shared/bench/zimage_gpu_baseline.py (copied into the repo); GPU only"
    )
    parser.add_argument("--model-dir", default="/tmp/zimage-full")
    parser.add_argument("--home", default="/tmp/zimage-bench")
    parser.add_argument("--phases", default=ALL_PHASES, help=f"comma-separated subset of {ALL_PHASES}")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--attention", default="native")
    parser.add_argument(
        "--keep-cache",
        action="store_true",
        help="start the default phases on the compile cache an earlier run left instead of an empty one",
    )
    parser.add_argument(
        "--images-dir", type=Path, default=None, help="where the quality-check images are written"
    )
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    phases = set(args.phases.split(","))
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    results: list = []
    emit(
        results,
        event="env",
        gpu=torch.cuda.get_device_name() if gpu else "none (CPU, tiny model)",
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    reference_s = None
    if gpu:
        if not args.reference:
            parser.error("--reference is needed on a GPU machine")
        reference = load_reference(args.reference)
        build_model_dir(reference, Path(args.model_dir), results)
        model = {
            "model_dir": args.model_dir,
            "attention_backend": args.attention,
            "compile_cache_dir": str(home / "compile-cache"),
        }
        if "reference" in phases:
            run_reference(reference, results, args.size)
            reference_s = results[-1]["median_s"]
    else:
        args.size = min(args.size, 256)
        model = {"min_size": 64, "warmup_size": 128, "compile_cache_dir": str(home / "compile-cache")}

    def speedup(row):
        if reference_s:
            row["speedup"] = round(reference_s / row["e2e_p50_s"], 2)
            print(json.dumps({"event": "speedup", "label": row["label"], "x": row["speedup"]}), flush=True)

    def start(**settings) -> tuple[AppRun, float]:
        """The app with the model settings plus `settings`, ready; and how long that took."""
        app = AppRun(free_port(), home, **{**model, **settings})
        try:
            return app, app.wait_ready()
        except BaseException:
            app.stop()
            raise

    def started(label: str, cache: str, **settings) -> AppRun:
        app, ready = start(**settings)
        emit(
            results,
            event="cold_start",
            label=label,
            cache=cache,
            ready_s=round(ready, 1),
            breakdown=app.startup_breakdown(),
        )
        return app

    def guarded(name: str, fn) -> None:
        """One phase; a failure is a row in the table, and the phases after it still run."""
        if name not in phases:
            return
        try:
            fn()
        except Exception as exc:
            emit(results, event="error", phase=name, error=f"{exc.__class__.__name__}: {exc}"[-1500:])

    default_image: list = []

    def default_phases():
        if not args.keep_cache:
            shutil.rmtree(home / "compile-cache", ignore_errors=True)
        app = started(
            "default, batching on (max_batch=4)",
            "kept" if args.keep_cache else "empty",
            max_batch=4,
            queue_size=16,
        )
        try:
            if "latency" in phases:
                speedup(measure_latency(app, results, "default settings", args.size, args.n))
                # The old default beside it: one forward more, off the distilled schedule.
                measure_latency(app, results, "default settings at 9 steps", args.size, args.n, steps=9)
            if "jobs" in phases:  # the async path with every step event read, beside the sync one
                measure_latency(app, results, "default, POST /api/generate", args.size, args.n)
                measure_latency(app, results, "default, as a job + SSE", args.size, args.n, as_job=True)
            default_image.append(app.image(args.size, seed=42))
            if "throughput" in phases:
                measure_throughput(
                    app, results, "default, max_batch=4, 8 clients", args.size, requests=32, concurrency=8
                )
        finally:
            app.stop()

    def lossy_phase(title: str, option: str, image: str, cache: str, **settings):
        """An opt-in that changes the image: its latency, a same-seed quality row against the default,
        its throughput. Rows are labelled "{title}, max_batch=4", "opt-in {option}", "{title} vs default"."""
        app = started(f"{title}, max_batch=4", cache, max_batch=4, queue_size=16, **settings)
        try:
            speedup(measure_latency(app, results, f"opt-in {option}", args.size, args.n))
            if default_image:
                quality_row(
                    results,
                    f"{title} vs default, same prompt and seed",
                    default_image[0],
                    app.image(args.size, seed=42),
                    args.images_dir,
                    image,
                )
            if "throughput" in phases:
                measure_throughput(
                    app, results, f"{title}, max_batch=4, 8 clients", args.size, requests=32, concurrency=8
                )
        finally:
            app.stop()

    def fp8_phase():
        lossy_phase("fp8", "quantize=fp8", "fp8", "transformer cache empty for fp8", quantize="fp8")

    def stepcache_phase():
        # Same compiled packages as the default and fp8 phases (the cache changes no block's code).
        for label, settings in (("bf16", {}), ("fp8", {"quantize": "fp8"})):
            lossy_phase(
                f"{label} + step cache",
                f"{label} + step_cache_skips=2",
                f"{label}-stepcache",
                "warm",
                step_cache_skips=2,
                **settings,
            )

    def coldstart_phase():
        # As deployed (the UI is built while the model loads), and the API alone.
        for ui in ("true", "false"):
            app, ready = start(ui=ui)
            try:
                t0 = time.perf_counter()
                app.generate(args.size, seed=5)
                first = time.perf_counter() - t0
                emit(
                    results,
                    event="cold_start",
                    label=f"default, UI {'on' if ui == 'true' else 'off'}, max_batch=1",
                    cache="warm",
                    ready_s=round(ready, 1),
                    first_image_s=round(first, 2),
                    total_s=round(ready + first, 1),
                    breakdown=app.startup_breakdown(),
                )
                if ui == "true":
                    first_requests(app)
            finally:
                app.stop()

    def first_requests(app: AppRun) -> None:
        """Right after a start: requests the warm-up did not make (another size, a long prompt,
        several images), each timed on its first occurrence, and whether any of them compiled."""
        wide = (args.size * 3 // 4 // 64 * 64, args.size * 5 // 4 // 64 * 64)
        row = {"event": "first_requests"}
        for label, size, extra in (
            ("long_prompt", (args.size, args.size), {"prompt": PROMPT + ", " + PROMPT}),
            ("other_size", wide, {}),
            ("two_images", (args.size, args.size), {"num_images": 2}),
        ):
            t0 = time.perf_counter()
            app.generate(size[0], height=size[1], **extra)
            row[f"{label}_s"] = round(time.perf_counter() - t0, 2)
        row["compiles_after_warmup"] = app.metric("zimage_compiles_after_warmup")
        emit(results, **row)

    def startopts_phase():
        """What the start costs with less to warm up: the VAE decoder eager (decode +50 ms per image)."""
        started("compile_vae=false, UI off", "warm", ui="false", compile_vae="false").stop()

    def dynamic_phase():
        # The previous default side by side: static shapes first, dynamic after the first change
        # (which then compiles in a request: see first_requests). Started twice so the second start
        # shows the warm-cache figure.
        for cache in ("partial", "warm"):
            app = started("compile_dynamic=auto", cache, compile_dynamic="auto")
            try:
                if cache == "warm":
                    speedup(
                        measure_latency(app, results, "compile_dynamic=auto", args.size, max(3, args.n // 2))
                    )
                    first_requests(app)
            finally:
                app.stop()

    def jit_phase():
        # The previous default side by side: torch.compile'd blocks, re-traced by dynamo at every
        # start. Started twice so the second start shows the warm-cache figure.
        for cache in ("partial", "warm"):
            app = started("compile_backend=jit", cache, compile_backend="jit", ui="false")
            try:
                if cache == "warm":
                    speedup(
                        measure_latency(app, results, "compile_backend=jit", args.size, max(3, args.n // 2))
                    )
                    first_requests(app)
            finally:
                app.stop()

    def loadspeed_phase():
        """The fast reader alone against safetensors' own, on the largest transformer file."""
        if not gpu:
            return
        from safetensors.torch import load_file as safetensors_load

        from app.runtime import fastload

        path = max(Path(args.model_dir, "transformer").glob("*.safetensors"), key=lambda p: p.stat().st_size)
        row = {"event": "loadspeed", "file_gb": round(path.stat().st_size / 1e9, 2)}

        def timed(label, read):
            t0 = time.perf_counter()
            tensors = read()
            torch.cuda.synchronize()
            row[label] = round(time.perf_counter() - t0, 2)
            del tensors

        timed("safetensors_s", lambda: safetensors_load(str(path), device="cuda"))
        for readers in (1, 2, 4, 8):
            fastload.READERS = readers
            timed(f"fast_{readers}_readers_s", lambda: fastload.load_file(path, torch.device("cuda")))
        fastload.READERS = 4
        emit(results, **row)

    def fastload_phase():
        app = started("fast_load=false (diffusers from_pretrained)", "warm", fast_load="false")
        try:
            measure_latency(app, results, "fast_load=false", args.size, 3)
        finally:
            app.stop()

    def parts_phase():
        # Side by side: what compiling the VAE decoder buys, and what compiling the text encoder costs.
        app = started(
            "VAE eager, text encoder compiled", "partial", compile_text_encoder="true", compile_vae="false"
        )
        try:
            speedup(
                measure_latency(
                    app, results, "VAE decoder eager, text encoder compiled", args.size, max(3, args.n // 2)
                )
            )
        finally:
            app.stop()

    def cap16_phase():
        if not gpu:
            return
        app = started("16 GiB cap", "warm", offload="text-encoder", memory_cap_gib=16)
        try:
            speedup(
                measure_latency(
                    app, results, "16 GiB cap, text encoder streamed", args.size, max(3, args.n // 2)
                )
            )
        finally:
            app.stop()

    if phases & {"latency", "jobs", "throughput"}:
        phases.add("default")
    guarded("default", default_phases)
    guarded("fp8", fp8_phase)
    guarded("stepcache", stepcache_phase)
    guarded("coldstart", coldstart_phase)
    guarded("startopts", startopts_phase)
    guarded("loadspeed", loadspeed_phase)
    guarded("fastload", fastload_phase)
    guarded("parts", parts_phase)
    guarded("dynamic", dynamic_phase)
    guarded("jit", jit_phase)
    guarded("cap16", cap16_phase)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
