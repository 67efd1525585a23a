"""zimagectl bench: the performance table, measured side by side with plain diffusers in one run.

On a GPU machine (full-size Z-Image architecture, random weights: weight values change neither
FLOPs nor memory):
    python -m ops.bench --reference .bench/zimage_gpu_baseline.py --out bench.json
builds and saves the full-size pipeline once (diffusers layout), times the reference snippet
(plain diffusers, eager, bf16), then starts the real app (`python -m app`) on that directory and
measures through POST /api/generate: warm latency with its stage split, service overhead, batched
throughput, the opt-in FP8 path with a same-seed quality check against the default, cold start
(empty and warm compile cache, with where the time goes) and a 16 GiB per-process cap. Without a
GPU it runs the same steps on the tiny demo model, so the tool itself is tested on every machine.
Every measurement is one JSON line as it happens; the table comes at the end.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("Young Chinese woman in red Hanfu, intricate embroidery, impeccable makeup, elaborate high bun with a "
          "golden phoenix headdress, soft-lit outdoor night, silhouetted pagoda, blurred colorful lights, photorealistic")
ALL_PHASES = "reference,latency,throughput,fp8,coldstart,loadspeed,fastload,parts,dynamic,cap16"


def emit(results: list, **row) -> dict:
    results.append(row)
    print(json.dumps(row), flush=True)
    return row


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


def run_reference(reference, results: list, size: int = 1024, n: int = 5) -> None:
    """Plain diffusers as the model card shows it: eager, bf16, default attention."""
    import torch

    pipe = reference.build()
    kw = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=9, guidance_scale=0.0)
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
    emit(results, event="reference", size=size, median_s=round(statistics.median(times), 3),
         min_s=round(min(times), 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    del pipe
    torch.cuda.empty_cache()


def _log_time(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


class AppRun:
    """The real app in a subprocess, configured through ZIMAGE_APP_* variables."""

    def __init__(self, port: int, home: Path, **settings):
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
        env.update(ZIMAGE_HOME=str(home), ZIMAGE_CONFIG=str(home / "bench.toml"), PYTHONUNBUFFERED="1",
                   ZIMAGE_APP_PORT=str(port), ZIMAGE_APP_UI="false")
        (home / "bench.toml").write_text("")
        for key, value in settings.items():
            env[f"ZIMAGE_APP_{key.upper()}"] = str(value)
        self.env, self.home = env, home
        # One client with keep-alive, as an API client would hold: a new httpx client per request
        # costs its own setup (an SSL context even for http) and would be counted as our overhead.
        self.client = httpx.Client(timeout=600)
        self.log_path = home / f"app-{port}.log"
        self.log = open(self.log_path, "wb")
        self.started_wall = time.time()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited {self.proc.returncode}: " + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"app not ready in {timeout:.0f} s: " + self.log_path.read_text()[-3000:])

    def startup_breakdown(self) -> dict:
        """Where the start went, from the app's own log: interpreter + imports until its first
        line, reading the weights, placing them, and the warm-up (compiling included)."""
        events, out = {}, {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") in ("starting", "model_loading", "model_loaded", "ready"):
                events.setdefault(record["event"], record)
            elif record.get("event") == "weights_read":
                out.setdefault("reads", []).append(f"{record['gib']} GiB {record['seconds']} s")
        if "starting" in events:
            out["imports_s"] = round(_log_time(events["starting"]["ts"]) - self.started_wall, 1)
        loaded = events.get("model_loaded", {})
        for key in ("import_and_cuda_init_s", "read_s", "place_s", "quantize_s", "allocated_gib"):
            if key in loaded:
                out[key] = loaded[key]
        if "warmup_s" in events.get("ready", {}):
            out["warmup_s"] = round(events["ready"]["warmup_s"], 1)
        return out

    def generate(self, size: int, steps: int = 9, seed: int = 0, prompt: str = PROMPT, **extra) -> dict:
        r = self.client.post(self.url + "/api/generate",
                             json={"prompt": prompt, "width": size, "height": size, "num_inference_steps": steps,
                                   "seed": seed, **extra})
        r.raise_for_status()
        return r.json()

    def image(self, size: int, seed: int) -> np.ndarray:
        from PIL import Image

        body = self.generate(size, seed=seed, response_format="base64")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64_png"]))).convert("RGB"))

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def measure_latency(app: AppRun, results: list, label: str, size: int, n: int) -> dict:
    app.generate(size, seed=999)  # one more warm-up at this exact size and prompt length
    e2e, timings = [], []
    for i in range(n):
        t0 = time.perf_counter()
        body = app.generate(size, seed=i, prompt=f"{PROMPT}, variation {i}")  # a new prompt each time: no cache hits
        e2e.append(time.perf_counter() - t0)
        timings.append(body["timings"])
    gen = statistics.median(t["generation_s"] for t in timings)

    def p50(key):
        values = [t[key] for t in timings if t.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    return emit(results, event="latency", label=label, size=size, n=n, e2e_p50_s=round(statistics.median(e2e), 3),
                e2e_min_s=round(min(e2e), 3), pipeline_p50_s=round(gen, 3), encode_p50_s=p50("encode_s"),
                denoise_p50_s=p50("denoise_s"), decode_p50_s=p50("decode_s"), save_p50_s=p50("save_s"),
                overhead_pct=round(100 * (statistics.median(e2e) - gen) / gen, 1),
                peak_gib=round((body.get("peak_memory_bytes") or 0) / 2**30, 1))


def measure_throughput(app: AppRun, results: list, label: str, size: int, requests: int, concurrency: int) -> dict:
    app.generate(size, seed=1)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        bodies = list(pool.map(lambda i: app.generate(size, seed=i, prompt=f"{PROMPT} #{i}"), range(requests)))
    wall = time.perf_counter() - t0
    batches = sorted({b["timings"]["generation_s"] for b in bodies})
    return emit(results, event="throughput", label=label, size=size, images=requests, wall_s=round(wall, 2),
                images_per_hour=round(requests / wall * 3600), concurrency=concurrency, batch_generation_s=batches[:6])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def quality_row(results: list, label: str, reference: np.ndarray, candidate: np.ndarray, images_dir: Path | None,
                name: str) -> dict:
    """Same prompt and seed through the default and an opt-in path: PSNR of the full image and of a
    4× downscale (what the eye sees of composition and colour)."""
    if images_dir:
        from PIL import Image

        images_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(candidate).save(images_dir / f"quality-{name}.png")
        Image.fromarray(reference).save(images_dir / "quality-default.png")

    def small(x):
        h, w = x.shape[0] // 4 * 4, x.shape[1] // 4 * 4
        return x[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3))

    return emit(results, event="quality", label=label, psnr_db=round(psnr(reference, candidate), 1),
                psnr_4x_down_db=round(psnr(small(reference), small(candidate)), 1),
                max_abs_diff=int(np.abs(reference.astype(int) - candidate.astype(int)).max()))


def print_table(results: list) -> None:
    rows = [("measurement", "figure")]
    for r in results:
        e = r["event"]
        if e == "env":
            rows.append(("device", f"{r['gpu']}, torch {r['torch']}, {r['date']}"))
        elif e == "reference":
            rows.append((f"reference (plain diffusers) {r['size']}²", f"{r['median_s']} s, peak {r['peak_gib']} GiB"))
        elif e == "latency":
            rows.append((f"latency {r['size']}²: {r['label']}",
                         f"e2e p50 {r['e2e_p50_s']} s (pipeline {r['pipeline_p50_s']} s = encode {r['encode_p50_s']} "
                         f"+ denoise {r['denoise_p50_s']} + decode {r['decode_p50_s']}); overhead {r['overhead_pct']} %"
                         + (f"; {r['speedup']}× the reference" if r.get("speedup") else "")))
        elif e == "throughput":
            rows.append((f"throughput {r['size']}²: {r['label']}", f"{r['images_per_hour']} img/h ({r['images']} in {r['wall_s']} s)"))
        elif e == "quality":
            rows.append((f"quality: {r['label']}", f"PSNR {r['psnr_db']} dB (4× downscaled {r['psnr_4x_down_db']} dB)"))
        elif e == "loadspeed":
            rows.append((f"reading a {r['file_gb']} GB file to the GPU", ", ".join(f"{k} {v}" for k, v in r.items()
                                                                        if k.endswith("_s"))))
        elif e == "error":
            rows.append((f"FAILED phase {r['phase']}", r["error"][-200:]))
        elif e == "cold_start":
            parts = ", ".join(f"{k} {v}" for k, v in r.get("breakdown", {}).items())
            first = f" + first image {r['first_image_s']} s" if "first_image_s" in r else ""
            rows.append((f"start to ready: {r['label']}", f"{r['ready_s']} s{first}" + (f" ({parts})" if parts else "")))
    width = max(len(a) for a, _ in rows)
    print("\n" + "\n".join(f"{a:<{width}}  {b}" for a, b in rows), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zimagectl bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="shared/bench/zimage_gpu_baseline.py (copied into the repo); GPU only")
    parser.add_argument("--model-dir", default="/tmp/zimage-full")
    parser.add_argument("--home", default="/tmp/zimage-bench")
    parser.add_argument("--phases", default=ALL_PHASES, help=f"comma-separated subset of {ALL_PHASES}")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--attention", default="native")
    parser.add_argument("--images-dir", type=Path, default=None, help="where the quality-check images are written")
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    phases = set(args.phases.split(","))
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    results: list = []
    emit(results, event="env", gpu=torch.cuda.get_device_name() if gpu else "none (CPU, tiny model)",
         torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    reference_s = None
    if gpu:
        if not args.reference:
            parser.error("--reference is needed on a GPU machine")
        reference = load_reference(args.reference)
        build_model_dir(reference, Path(args.model_dir), results)
        model = {"model_dir": args.model_dir, "attention_backend": args.attention,
                 "compile_cache_dir": str(home / "compile-cache")}
        if "reference" in phases:
            run_reference(reference, results, args.size)
            reference_s = results[-1]["median_s"]
        ports = iter(range(7900, 7999))
    else:
        args.size = min(args.size, 256)
        model = {"min_size": 64, "warmup_size": 128, "compile_cache_dir": str(home / "compile-cache")}
        ports = iter(range(17900, 17999))

    def speedup(row):
        if reference_s:
            row["speedup"] = round(reference_s / row["e2e_p50_s"], 2)
            print(json.dumps({"event": "speedup", "label": row["label"], "x": row["speedup"]}), flush=True)

    def started(label: str, cache: str, **settings) -> AppRun:
        app = AppRun(next(ports), home, **{**model, **settings})
        try:
            ready = app.wait_ready()
        except BaseException:
            app.stop()
            raise
        emit(results, event="cold_start", label=label, cache=cache, ready_s=round(ready, 1),
             breakdown=app.startup_breakdown())
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
        shutil.rmtree(home / "compile-cache", ignore_errors=True)
        app = started("default, batching on (max_batch=4)", "empty", max_batch=4, queue_size=16)
        try:
            if "latency" in phases:
                speedup(measure_latency(app, results, "default settings", args.size, args.n))
            default_image.append(app.image(args.size, seed=42))
            if "throughput" in phases:
                measure_throughput(app, results, "default, max_batch=4, 8 clients", args.size, requests=16, concurrency=8)
        finally:
            app.stop()

    def fp8_phase():
        app = started("fp8, max_batch=4", "transformer cache empty for fp8", quantize="fp8", max_batch=4, queue_size=16)
        try:
            speedup(measure_latency(app, results, "opt-in quantize=fp8", args.size, args.n))
            if default_image:
                quality_row(results, "fp8 vs default, same prompt and seed", default_image[0],
                            app.image(args.size, seed=42), args.images_dir, "fp8")
            if "throughput" in phases:
                measure_throughput(app, results, "fp8, max_batch=4, 8 clients", args.size, requests=16, concurrency=8)
        finally:
            app.stop()

    def coldstart_phase():
        app = AppRun(next(ports), home, **model)
        try:
            ready = app.wait_ready()
            t0 = time.perf_counter()
            app.generate(args.size, seed=5)
            first = time.perf_counter() - t0
            emit(results, event="cold_start", label="default (max_batch=1)", cache="warm", ready_s=round(ready, 1),
                 first_image_s=round(first, 2), total_s=round(ready + first, 1), breakdown=app.startup_breakdown())
        finally:
            app.stop()

    def dynamic_phase():
        # Dynamic sequence length from the start: one graph fewer to compile. Started twice so the
        # second start shows the warm-cache figure.
        for cache in ("partial", "warm"):
            app = started("compile_dynamic=on", cache, compile_dynamic="on")
            try:
                if cache == "warm":
                    speedup(measure_latency(app, results, "compile_dynamic=on", args.size, max(3, args.n // 2)))
            finally:
                app.stop()

    def loadspeed_phase():
        """The fast reader alone against safetensors' own, on the largest transformer file."""
        if not gpu:
            return
        from safetensors.torch import load_file as safetensors_load

        from app import fastload

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
        app = started("VAE eager, text encoder compiled", "partial", compile_text_encoder="true", compile_vae="false")
        try:
            speedup(measure_latency(app, results, "VAE decoder eager, text encoder compiled",
                                    args.size, max(3, args.n // 2)))
        finally:
            app.stop()

    def cap16_phase():
        if not gpu:
            return
        app = started("16 GiB cap", "warm", offload="text-encoder", memory_cap_gib=16)
        try:
            speedup(measure_latency(app, results, "16 GiB cap, text encoder streamed", args.size, max(3, args.n // 2)))
        finally:
            app.stop()

    if phases & {"latency", "throughput"}:
        phases.add("default")
    guarded("default", default_phases)
    guarded("fp8", fp8_phase)
    guarded("coldstart", coldstart_phase)
    guarded("loadspeed", loadspeed_phase)
    guarded("fastload", fastload_phase)
    guarded("parts", parts_phase)
    guarded("dynamic", dynamic_phase)
    guarded("cap16", cap16_phase)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
