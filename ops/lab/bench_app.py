"""The app under measurement: `python -m app` in a subprocess, driven over HTTP with one keep-alive
client, and the measurements taken through it (latency with its stage split, throughput, a
same-seed image for quality checks). ops/lab/bench.py decides what to run and prints the table."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from common.polling import poll_until
from ops.tempstack import REPO, app_env

PROMPT = (
    "Young Chinese woman in red Hanfu, intricate embroidery, impeccable makeup, elaborate high bun with a "
    "golden phoenix headdress, soft-lit outdoor night, silhouetted pagoda, blurred colorful lights, "
    "photorealistic"
)


def emit(results: list, **row) -> dict:
    results.append(row)
    print(json.dumps(row), flush=True)
    return row


def _log_time(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


class AppRun:
    """The real app in a subprocess, configured through ZIMAGE_APP_* variables."""

    def __init__(self, port: int, home: Path, **settings):
        self.url = f"http://127.0.0.1:{port}"
        env = app_env(home / "bench.toml", port, **{"ui": "false", **settings})
        env["ZIMAGE_HOME"] = str(home)
        self.env, self.home = env, home
        # One client with keep-alive, as an API client would hold: a new httpx client per request
        # costs its own setup (an SSL context even for http) and would be counted as our overhead.
        self.client = httpx.Client(timeout=600)
        self.log_path = home / f"app-{port}.log"
        self.log = open(self.log_path, "wb")
        self.started_wall = time.time()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 480) -> float:

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited {self.proc.returncode}: " + self.log_path.read_text()[-3000:])
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200

        if poll_until(ready, timeout, 0.1, ignore=(httpx.HTTPError,)):
            return time.perf_counter() - self.started
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
        for key in (
            "import_s",
            "cuda_init_s",
            "read_s",
            "build_big_s",
            "from_pretrained_s",
            "place_s",
            "quantize_s",
            "aot_compile_s",
            "aot_load_s",
            "compile_setup_s",
            "allocated_gib",
        ):
            if key in loaded:
                out[key] = loaded[key]
        if loaded.get("notes"):
            out["notes"] = loaded["notes"]
        ready = events.get("ready", {})
        if "warmup_s" in ready:
            out["warmup_s"] = round(ready["warmup_s"], 1)
        for key in ("compiles", "compile_s", "warmup_stages", "warmup_parts"):
            if key in ready:
                out[key if key.startswith("warmup_") else f"warmup_{key}"] = ready[key]
        return out

    def generate(self, size: int, steps: int = 8, seed: int = 0, prompt: str = PROMPT, **extra) -> dict:
        r = self.client.post(
            self.url + "/api/generate",
            json={
                "prompt": prompt,
                "width": size,
                "height": size,
                "num_inference_steps": steps,
                "seed": seed,
                **extra,
            },
        )
        r.raise_for_status()
        return r.json()

    def generate_as_job(self, size: int, steps: int = 8, seed: int = 0, prompt: str = PROMPT) -> dict:
        """POST /api/jobs, then follow its event stream to the end (every step event read): the
        async path as a client with a progress bar uses it. Returns the job's final view."""
        body = {"prompt": prompt, "width": size, "height": size, "num_inference_steps": steps, "seed": seed}
        job_id = self.client.post(self.url + "/api/jobs", json=body).json()["job_id"]
        final, steps_seen = None, 0
        with self.client.stream("GET", f"{self.url}/api/jobs/{job_id}/events") as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    steps_seen += event == "step"
                    if event in ("done", "failed", "cancelled"):
                        final = json.loads(line[6:])
        if final is None or final["state"] != "done" or steps_seen != steps:
            raise RuntimeError(f"job {job_id}: {final} after {steps_seen} step events")
        return final["result"]

    def metric(self, name: str) -> float | None:
        """One unlabelled value from the app's /metrics."""
        for line in self.client.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def image(self, size: int, seed: int) -> np.ndarray:
        from PIL import Image

        body = self.generate(size, seed=seed, response_format="base64")
        return np.asarray(
            Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64_png"]))).convert("RGB")
        )

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def measure_latency(
    app: AppRun, results: list, label: str, size: int, n: int, steps: int = 8, as_job: bool = False
) -> dict:
    """as_job: through POST /api/jobs and its event stream instead of POST /api/generate."""
    call = app.generate_as_job if as_job else app.generate
    call(size, steps=steps, seed=999)  # one more warm-up at this exact size and prompt length
    e2e, timings = [], []
    for i in range(n):
        t0 = time.perf_counter()
        body = call(
            size, steps=steps, seed=i, prompt=f"{PROMPT}, variation {i} {'job' if as_job else ''}"
        )  # a new prompt each time: no cache hits
        e2e.append(time.perf_counter() - t0)
        timings.append(body["timings"])
    gen = statistics.median(t["generation_s"] for t in timings)

    def p50(key):
        values = [t[key] for t in timings if t.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    return emit(
        results,
        event="latency",
        label=label,
        size=size,
        n=n,
        steps=steps,
        e2e_p50_s=round(statistics.median(e2e), 3),
        e2e_min_s=round(min(e2e), 3),
        pipeline_p50_s=round(gen, 3),
        encode_p50_s=p50("encode_s"),
        denoise_p50_s=p50("denoise_s"),
        decode_p50_s=p50("decode_s"),
        save_p50_s=p50("save_s"),
        overhead_pct=round(100 * (statistics.median(e2e) - gen) / gen, 1),
        peak_gib=round((body.get("peak_memory_bytes") or 0) / 2**30, 1),
    )


def measure_throughput(
    app: AppRun, results: list, label: str, size: int, requests: int, concurrency: int
) -> dict:
    app.generate(size, seed=1)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        bodies = list(
            pool.map(lambda i: app.generate(size, seed=i, prompt=f"{PROMPT} #{i}"), range(requests))
        )
    wall = time.perf_counter() - t0
    batches = sorted({b["timings"]["generation_s"] for b in bodies})
    return emit(
        results,
        event="throughput",
        label=label,
        size=size,
        images=requests,
        wall_s=round(wall, 2),
        images_per_hour=round(requests / wall * 3600),
        concurrency=concurrency,
        batch_generation_s=batches[:6],
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def quality_row(
    results: list,
    label: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    images_dir: Path | None,
    name: str,
) -> dict:
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

    return emit(
        results,
        event="quality",
        label=label,
        psnr_db=round(psnr(reference, candidate), 1),
        psnr_4x_down_db=round(psnr(small(reference), small(candidate)), 1),
        max_abs_diff=int(np.abs(reference.astype(int) - candidate.astype(int)).max()),
    )
