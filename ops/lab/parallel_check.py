"""One image on two GPUs (parallel = "context") against one GPU, side by side in one run, on the
full-size model under the real stack (zimagectl up: supervisord, the app's ranks, the monitor).

    python -m ops.lab.parallel_check --model-dir /tmp/zimage-full --compile off,jit

For each compile mode (off, jit, jit-graphs: compile_mode = "reduce-overhead", one GPU only), one
GPU then two: the stack up, `--n` sequential 1024² requests at 8 steps (different seeds; the first
of each shape is left out), the end-to-end and service latencies, the first seed's pixels kept;
then the PSNR of the two GPUs' image against one GPU's on the same seed.
With `--kill`, rank 1 is SIGKILLed after the two-GPU run and the time until the group serves again
is measured. `--attention diffusers,overlapped` runs the two-GPU column once per exchange
(parallel_attention), `--sample` samples where each rank's thread spends its time (ops/lab/sampler),
`--reference-run` times plain diffusers first. Requests go through one kept-alive client, seeds
re-rolled on one prompt, then as many with new prompts (the text encoder runs). One JSON line per
measurement; the last line is the table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from ops.lab.bench_app import psnr
from ops.lab.bench_reference import ensure_model_dir, load_reference, run_reference
from ops.lab.gpu_check import use_image_python
from ops.tempstack import REPO, wait_for

URL = "http://127.0.0.1:7860"
PROMPT = "a lighthouse on a cliff at dusk, waves, cinematic light"


def log(**row) -> None:
    print(json.dumps(row, default=str), flush=True)


def ctl(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZIMAGE_HOME=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *argv], env=env, capture_output=True, text=True, timeout=timeout
    )


def write_config(args, compile_mode: str, parallel: bool, attention: str = "diffusers") -> None:
    compile_lines = (
        'compile = "off"\n' if compile_mode == "off" else 'compile = "on"\ncompile_backend = "jit"\n'
    )
    if compile_mode == "jit-graphs":  # the blocks as CUDA graphs (one GPU only)
        compile_lines += 'compile_mode = "reduce-overhead"\n'
    (REPO / "zimage.toml").write_text(
        f'[app]\nmodel_dir = "{args.model_dir}"\ncompile_cache_dir = "{args.compile_cache}"\n'
        + compile_lines
        + (
            f'parallel = "context"\nparallel_degree = 2\nparallel_attention = "{attention}"\n'
            if parallel
            else ""
        )
        + (f'quantize = "{args.quantize}"\n' if args.quantize != "none" else "")
        + "request_timeout_s = 150\ndrain_timeout_s = 170\nui = false\n"
        "[monitor]\ninterval_s = 1.0\nwarmup_size = 512\nwarmup_steps = 2\n"
    )


# One keep-alive client, as a serving client holds one and as ops.lab.bench_app measures: a bare
# httpx.post() builds a client per call (its TLS context alone took ~18 ms here), which the first
# rounds of this tool counted into every end-to-end figure.
CLIENT = httpx.Client(timeout=300)


def generate(seed: int, size: int, prompt: str = PROMPT) -> tuple[float, dict, np.ndarray]:
    body = {"prompt": prompt, "width": size, "height": size, "seed": seed, "num_inference_steps": 8}
    started = time.perf_counter()
    r = CLIENT.post(URL + "/api/generate", json=body)
    wall = time.perf_counter() - started
    r.raise_for_status()
    data = r.json()
    png = CLIENT.get(URL + data["images"][0]["url"]).content
    return wall, data["timings"], np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def app_children() -> list[int]:
    sup = [
        sys.executable,
        "-m",
        "supervisor.supervisorctl",
        "-c",
        str(REPO / "supervisor" / "supervisord.conf"),
    ]
    pid = subprocess.run(sup + ["pid", "app"], capture_output=True, text=True).stdout.strip()
    if not pid.isdigit():
        return []
    return [p.pid for p in psutil.Process(int(pid)).children() if "app.follower" in " ".join(p.cmdline())]


SAMPLER = REPO / "ops" / "lab" / "sampler"


def start_sampling(label: str) -> Path:
    """The stack started after this samples its generating threads (ops/lab/sampler)."""
    out = Path("/tmp/zimage-samples") / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ["ZIMAGE_SAMPLE_DIR"] = str(out)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SAMPLER)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SAMPLER), *paths])
    return out


def sampled(out: Path, top: int = 25) -> list[dict]:
    """Each sampled process's share of samples by place: where a rank's CPU time went."""
    time.sleep(2.5)  # the sampler rewrites its file every 2 s
    rows = []
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text())
        n = max(1, data["samples"])

        def share(pairs):
            return [[round(100 * count / n, 1), where] for where, count in pairs[:top]]

        rows.append(
            {
                "process": " ".join(data["argv"])[-60:],
                "samples": data["samples"],
                "threads": data.get("threads"),
                "every_ms": data["every_ms"],
                "ours_pct": share(data["ours"]),
                "functions_pct": share(data["functions"]),
            }
        )
    return rows


def measure(args, compile_mode: str, parallel: bool, attention: str = "diffusers") -> dict:
    write_config(args, compile_mode, parallel, attention)
    label = (
        f"{'two' if parallel else 'one'}_gpu_{compile_mode}"
        + (f"_{args.quantize}" if args.quantize != "none" else "")
        + ("_overlapped" if parallel and attention == "overlapped" else "")
    )
    samples = start_sampling(label) if args.sample else None
    t0 = time.time()
    up = ctl("up", "--timeout", "420")
    log(event="up", config=label, rc=up.returncode, seconds=round(time.time() - t0, 1), out=up.stdout[-600:])
    try:
        if up.returncode != 0:
            log(event="app_log", tail=(REPO / "logs" / "app.log").read_text()[-4000:])
            return {}
        info = httpx.get(URL + "/api/info", timeout=10).json()
        log(event="info", config=label, notes=info.get("model", {}).get("notes"))
        generate(1000, args.size)  # a first request of the shape, left out
        walls, services, first = [], [], None
        stages: dict[str, list] = {"encode_s": [], "denoise_s": [], "decode_s": []}
        for i in range(args.n):
            wall, timings, pixels = generate(i, args.size)
            walls.append(wall)
            services.append(timings["generation_s"])
            for name, values in stages.items():  # where the time goes: only denoise is split
                if timings.get(name) is not None:
                    values.append(timings[name])
            if i == 0:
                first = pixels
        fresh = []  # each a prompt not seen before, so the text encoder runs (the rows above re-roll seeds)
        for i in range(args.n):
            wall, timings, _ = generate(i, args.size, f"{PROMPT}, variation {i} {label}")
            fresh.append((wall, timings.get("encode_s")))
        row = {
            "config": label,
            "end_to_end_s": round(statistics.median(walls), 3),
            "new_prompt_end_to_end_s": round(statistics.median(w for w, _ in fresh), 3),
            "new_prompt_encode_s": round(statistics.median(e or 0.0 for _, e in fresh), 4),
            "new_prompt_max_s": round(max(w for w, _ in fresh), 3),  # a new shape's first call
            "generation_s": round(statistics.median(services), 3),
            "min_end_to_end_s": round(min(walls), 3),
            "n": args.n,
            **{name: round(statistics.median(v), 4) for name, v in stages.items() if v},
        }
        log(event="latency", **row)
        if samples is not None:
            for process in sampled(samples):
                log(event="samples", config=label, **process)
        np.save(f"/tmp/parallel-{label}.npy", first)
        if parallel and args.kill:
            row["kill_heal_s"] = kill_rank(args.size)
        return row
    finally:
        down = ctl("down")
        log(event="down", rc=down.returncode)


def kill_rank(size: int) -> float:
    [rank1] = app_children()
    killed = time.monotonic()
    os.kill(rank1, signal.SIGKILL)

    def serving() -> bool:
        try:
            return httpx.get(URL + "/readyz", timeout=2).status_code == 200 and bool(app_children())
        except httpx.HTTPError:
            return False

    time.sleep(1)
    wait_for(serving, 600, 0.5, "group back")
    healed = round(time.monotonic() - killed, 1)
    wall, _, _ = generate(7, size)
    log(event="kill_rank1", healed_s=healed, next_request_s=round(wall, 3))
    return healed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--compile-cache", default="/tmp/zimage-bench/compile-cache")
    parser.add_argument("--compile", default="off", help="comma list of off, jit, jit-graphs")
    parser.add_argument("--reference", default=".bench/zimage_gpu_baseline.py")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--only", default="one,two")
    parser.add_argument("--quantize", default="none", help='app.quantize for both columns ("fp8": lossy)')
    parser.add_argument(
        "--attention", default="diffusers", help="comma list of parallel_attention for the two-GPU column"
    )
    parser.add_argument("--sample", action="store_true", help="sample where each rank's thread spends time")
    parser.add_argument(
        "--reference-run", action="store_true", help="time plain diffusers (the model card's snippet) first"
    )
    args = parser.parse_args(argv)
    built_s = ensure_model_dir(args.model_dir, args.reference)
    if built_s is not None:
        log(event="model_built", seconds=round(built_s, 1))
    if args.reference_run:  # in this process, before the stacks take the GPUs; freed after
        results: list = []
        run_reference(load_reference(args.reference), results, args.size, args.n, steps=8)
        log(**results[-1])
    use_image_python(REPO)
    table = []
    for mode in args.compile.split(","):
        rows = {}
        for which in args.only.split(","):
            if which == "one":
                rows["one"] = measure(args, mode, parallel=False)
                continue
            for attention in args.attention.split(","):
                rows[f"two-{attention}"] = measure(args, mode, parallel=True, attention=attention)
        for name, row in rows.items():
            if name != "one" and row and rows.get("one"):
                quality = psnr(
                    np.load(f"/tmp/parallel-{rows['one']['config']}.npy"),
                    np.load(f"/tmp/parallel-{row['config']}.npy"),
                )
                row["psnr_db_vs_one_gpu"] = round(quality, 1)
                row["speedup"] = round(rows["one"]["end_to_end_s"] / row["end_to_end_s"], 3)
        table += [r for r in rows.values() if r]
    log(event="table", rows=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
