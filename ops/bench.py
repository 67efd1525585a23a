"""zimagectl bench: the performance table, measured side by side with plain diffusers in one run.

On a GPU machine (full-size Z-Image architecture, random weights: weight values change neither
FLOPs nor memory):
    python -m ops.bench --reference .bench/zimage_gpu_baseline.py --out bench.json
builds and saves the full-size pipeline once (diffusers layout), times the reference snippet
(plain diffusers, eager, bf16), then starts the real app (`python -m app`) on that directory and
measures through POST /api/generate: warm latency, service overhead, batched throughput, cold start
(empty and warm compile cache) and a 16 GiB per-process cap. Without a GPU it runs the same steps
on the tiny demo model, so the tool itself is tested on every machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("Young Chinese woman in red Hanfu, intricate embroidery, impeccable makeup, elaborate high bun with a "
          "golden phoenix headdress, soft-lit outdoor night, silhouetted pagoda, blurred colorful lights, photorealistic")


def emit(results: list, **row) -> None:
    results.append(row)
    print(json.dumps(row), flush=True)


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
        self.log = open(home / f"app-{port}.log", "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited {self.proc.returncode}: "
                                   + (self.home / f"app-{self.url.rsplit(':', 1)[1]}.log").read_text()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("app not ready")

    def generate(self, size: int, steps: int = 9, seed: int = 0, prompt: str = PROMPT) -> dict:
        r = httpx.post(self.url + "/api/generate", timeout=600,
                       json={"prompt": prompt, "width": size, "height": size, "num_inference_steps": steps,
                             "seed": seed})
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def measure_latency(app: AppRun, results: list, label: str, size: int, n: int) -> dict:
    app.generate(size, seed=999)  # a warm-up at this exact size (compiled graphs are per shape)
    e2e, gen = [], []
    for i in range(n):
        t0 = time.perf_counter()
        body = app.generate(size, seed=i, prompt=f"{PROMPT}, variation {i}")
        e2e.append(time.perf_counter() - t0)
        gen.append(body["timings"]["generation_s"])
    row = dict(event="latency", label=label, size=size, n=n, e2e_p50_s=round(statistics.median(e2e), 3),
               e2e_min_s=round(min(e2e), 3), pipeline_p50_s=round(statistics.median(gen), 3),
               overhead_pct=round(100 * (statistics.median(e2e) - statistics.median(gen)) / statistics.median(gen), 1),
               peak_gib=round((body.get("peak_memory_bytes") or 0) / 2**30, 1))
    emit(results, **row)
    return row


def measure_throughput(app: AppRun, results: list, label: str, size: int, requests: int, concurrency: int) -> dict:
    app.generate(size, seed=1)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        bodies = list(pool.map(lambda i: app.generate(size, seed=i, prompt=f"{PROMPT} #{i}"), range(requests)))
    wall = time.perf_counter() - t0
    row = dict(event="throughput", label=label, size=size, images=requests, wall_s=round(wall, 2),
               images_per_hour=round(requests / wall * 3600), concurrency=concurrency)
    emit(results, **row)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="shared/bench/zimage_gpu_baseline.py (copied into the repo)")
    parser.add_argument("--model-dir", default="/tmp/zimage-full")
    parser.add_argument("--home", default="/tmp/zimage-bench")
    parser.add_argument("--phases", default="reference,latency,throughput,coldstart,cap16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--attention", default="native")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    phases = set(args.phases.split(","))
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    results: list = []
    emit(results, event="env", gpu=torch.cuda.get_device_name() if gpu else "none (CPU, tiny model)",
         torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    model: dict = {}
    if gpu:
        reference = load_reference(args.reference)
        model_dir = Path(args.model_dir)
        build_model_dir(reference, model_dir, results)
        model = {"model_dir": str(model_dir), "attention_backend": args.attention, "compile_mode": args.compile_mode,
                 "compile_cache_dir": str(home / "compile-cache")}
        if "reference" in phases:
            run_reference(reference, results, args.size)
    else:
        args.size = min(args.size, 256)
        model = {"min_size": 64, "warmup_size": 128}
    port = 7900
    if phases & {"latency", "throughput", "coldstart"}:
        shutil.rmtree(home / "compile-cache", ignore_errors=True)
        app = AppRun(port, home, max_batch=4, queue_size=16, **model)
        try:
            emit(results, event="cold_start", cache="empty", ready_s=round(app.wait_ready(), 1))
            if "latency" in phases:
                measure_latency(app, results, "engine default (bf16, compile)", args.size, args.n)
            if "throughput" in phases:
                measure_throughput(app, results, "max_batch=4", args.size, requests=16, concurrency=8)
        finally:
            app.stop()
        if "coldstart" in phases:
            app = AppRun(port + 1, home, **model)
            try:
                ready = app.wait_ready()
                t0 = time.perf_counter()
                app.generate(args.size, seed=5)
                first = time.perf_counter() - t0
                emit(results, event="cold_start", cache="warm", ready_s=round(ready, 1),
                     first_image_s=round(first, 2), total_s=round(ready + first, 1))
            finally:
                app.stop()
    if "cudnn" in phases and gpu:
        app = AppRun(port + 3, home, **{**model, "attention_backend": "_native_cudnn"})
        try:
            emit(results, event="cold_start", cache="partial", label="cudnn attention",
                 ready_s=round(app.wait_ready(), 1))
            measure_latency(app, results, "attention _native_cudnn", args.size, args.n)
        finally:
            app.stop()
    if "cap16" in phases and gpu:
        app = AppRun(port + 2, home, offload="text-encoder", memory_cap_gib=16, **model)
        try:
            emit(results, event="cold_start", cache="warm", label="16 GiB cap", ready_s=round(app.wait_ready(), 1))
            measure_latency(app, results, "16 GiB cap, text encoder streamed", args.size, max(3, args.n // 2))
        finally:
            app.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
