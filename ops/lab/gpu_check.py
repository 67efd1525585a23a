"""The whole stack on a GPU machine: supervisord + app (full-size model) + monitor with real NVML.

    python -m ops.lab.gpu_check --model-dir /tmp/zimage-full --out DIR

Brings the stack up with zimagectl, prints NVML readings next to torch's, then lets another
process fill GPU memory steadily and reports when the monitor calls it a precursor (before the
threshold) and what it decided; then SIGSTOPs the app and times the heal; then stretches one
denoising step to minutes (a stall: alive, answering, no progress) and times its detection; then
runs a 2048², 4-image generation the warm-up never saw and checks that it is not called a stall;
then takes it down. `--phases` picks among vram, hang, stall, bigshape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ops.lab.bench_reference import ensure_model_dir
from ops.tempstack import REPO, wait_for


def log(**row) -> None:
    print(json.dumps(row, default=str), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--compile-cache", default="/tmp/zimage-bench/compile-cache")
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--reference", default=".bench/zimage_gpu_baseline.py")
    parser.add_argument("--phases", default="vram,hang,stall,bigshape")
    parser.add_argument(
        "--compile", default="auto", help="app.compile (off: a first start without building packages)"
    )
    parser.add_argument("--bigshape-steps", type=int, default=25)
    parser.add_argument("--ui", default="true", help="app.web.ui (false: no gradio needed on the machine)")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    Path(args.out).mkdir(
        parents=True, exist_ok=True
    )  # (a missing one used to fail the log copy and skip `down`)
    ensure_model_dir(args.model_dir, args.reference)
    home = REPO
    use_image_python(home)
    (home / "zimage.toml").write_text(
        f'[app]\nmodel_dir = "{args.model_dir}"\ncompile_cache_dir = "{args.compile_cache}"\n'
        f'compile = "{args.compile}"\nrequest_timeout_s = 150\ndrain_timeout_s = 170\n'
        f"fault_injection = true\nui = {args.ui}\n"
        "[monitor]\ninterval_s = 1.0\nvram_threshold = 0.90\nvram_trend_window_s = 20\n"
        "vram_trend_horizon_s = 60\nvram_escalate_after_s = 15\nwarmup_size = 1024\nwarmup_steps = 2\n"
    )
    env = dict(os.environ, ZIMAGE_HOME=str(home))
    ctl = [sys.executable, "-m", "ops.cli"]
    (home / "run" / "monitor-journal.json").unlink(missing_ok=True)  # a run on a warm machine starts clean
    t0 = time.time()
    up = subprocess.run(ctl + ["up", "--timeout", "400"], env=env, capture_output=True, text=True)
    log(event="up", rc=up.returncode, seconds=round(time.time() - t0, 1), out=up.stdout[-1500:])
    state_file = home / "run" / "monitor-state.json"
    try:
        if up.returncode != 0:
            return 1
        status = subprocess.run(ctl + ["status"], env=env, capture_output=True, text=True)
        print(status.stdout, flush=True)
        import torch

        from common.gpu import open_gpu_reader

        reader = open_gpu_reader()
        free, total = torch.cuda.mem_get_info()
        samples = [s.as_dict() for s in reader.sample()]

        def current_app_pid() -> int:
            return int(
                subprocess.run(
                    [
                        str(home / ".venv/bin/python"),
                        "-m",
                        "supervisor.supervisorctl",
                        "-c",
                        str(home / "supervisor/supervisord.conf"),
                        "pid",
                        "app",
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                ).stdout.strip()
                or 0
            )

        app_pid = current_app_pid()
        log(
            event="nvml",
            reader=reader.reason,
            samples=samples,
            torch_used=total - free,
            torch_total=total,
            app_pid=app_pid,
        )
        if "vram" in phases:
            vram_phase(state_file)
        if "hang" in phases:
            hang_phase(state_file, current_app_pid)
        if "stall" in phases:
            stall_phase(home, state_file, current_app_pid)
        if "bigshape" in phases:
            bigshape_phase(home, state_file, args.bigshape_steps)
        status = subprocess.run(ctl + ["status"], env=env, capture_output=True, text=True)
        print(status.stdout, flush=True)
    finally:
        for name in ("app.log", "monitor.log", "supervisord.log"):
            src = home / "logs" / name
            if src.exists():
                shutil.copy(src, Path(args.out) / name)
        if state_file.exists():
            shutil.copy(state_file, Path(args.out) / "monitor-state.json")
        down = subprocess.run(ctl + ["down"], env=env, capture_output=True, text=True)
        log(event="down", rc=down.returncode, out=down.stdout[-300:])
    return 0


def use_image_python(home: Path) -> None:
    """The supervisor files start `.venv/bin/python`; a GPU machine has no venv, only its image's
    Python. A wrapper, not a symlink: a symlinked venv python would look for pyvenv.cfg next to the
    link and lose the image's site-packages."""
    venv_python = home / ".venv" / "bin" / "python"
    if Path(sys.prefix).resolve() == (home / ".venv").resolve():
        return  # run from the venv itself (a dry run here): a wrapper would exec itself forever
    if venv_python.is_symlink() or not venv_python.exists():
        venv_python.parent.mkdir(parents=True, exist_ok=True)
        venv_python.unlink(missing_ok=True)
        venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        venv_python.chmod(0o755)


def _state(state_file: Path) -> dict:
    return json.loads(state_file.read_text())


def vram_phase(state_file: Path) -> None:
    """VRAM pressure from a neighbour, growing 2 GiB/s towards 97 %."""
    from ops.chaos import gpu_fill

    started = time.time()
    filler = gpu_fill(0.97, hold=20, rate_gib_s=2.0)
    try:
        seen = None
        crossed_at = None
        while time.time() - started < 75:
            state = _state(state_file)
            gpu = state["sample"].get("gpu") or {}
            frac = (gpu.get("used_bytes") or 0) / (gpu.get("total_bytes") or 1)
            if crossed_at is None and frac >= 0.90:
                crossed_at = time.time() - started
            incident = [i for i in state["incidents_open"] if i["kind"] == "vram_pressure"]
            if incident and seen is None:
                seen = time.time() - started
                log(
                    event="vram_incident",
                    after_s=round(seen, 1),
                    used_fraction=round(frac, 3),
                    reason=incident[0]["reason"],
                    evidence=incident[0]["evidence"],
                )
            if seen is not None and crossed_at is not None and time.time() - started > seen + 20:
                break
            time.sleep(0.5)
        log(
            event="vram_threshold_crossed",
            after_s=crossed_at,
            precursor_first=seen is not None and (crossed_at is None or seen < crossed_at),
            decision=_state(state_file)["decision"],
        )
    finally:
        filler.kill()
        filler.wait()
    log(event="restarts_during_vram_pressure", count=len(_state(state_file)["restarts"]))


def hang_phase(state_file: Path, current_app_pid) -> None:
    """A hang on the GPU stack: SIGSTOP → kill → restart → ready and warm."""
    before = len(_state(state_file)["restarts"])
    t_hang = time.time()
    os.kill(current_app_pid(), signal.SIGSTOP)
    wait_for(
        lambda: any(r["kind"] == "hang" for r in _state(state_file)["restarts"][before:]),
        300,
        0.5,
        "hang healed",
    )
    restart = [r for r in _state(state_file)["restarts"][before:] if r["kind"] == "hang"][0]
    log(event="hang_healed", total_s=round(time.time() - t_hang, 1), restart=restart)


def _post_in_background(home: Path, body: dict, results: list) -> threading.Thread:
    import httpx

    from common.contract import load_app_contract

    url = load_app_contract({"ZIMAGE_HOME": str(home)}).local_url

    def run():
        started = time.time()
        try:
            r = httpx.post(url + "/api/generate", json=body, timeout=400)
            results.append(
                {
                    "status": r.status_code,
                    "seconds": round(time.time() - started, 2),
                    "body": r.json()
                    if r.headers.get("content-type", "").startswith("application/json")
                    else r.text[:300],
                }
            )
        except Exception as exc:
            results.append({"error": f"{exc.__class__.__name__}: {exc}"[:300]})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def stall_phase(home: Path, state_file: Path, current_app_pid) -> None:
    """One denoising step stretched to 2 minutes on a warm app: alive, answering, no progress. The
    figure: seconds from the request to the monitor's hang incident (target ≤ 10 s + the encode)."""
    import httpx

    from common.contract import load_app_contract

    app = load_app_contract({"ZIMAGE_HOME": str(home)})
    admin = {"authorization": "Bearer " + (home / "run" / "admin.token").read_text().strip()}
    wait_for(lambda: httpx.get(app.local_url + "/readyz", timeout=2).status_code == 200, 120, 0.5, "ready")
    before, old = len(_state(state_file)["restarts"]), current_app_pid()
    httpx.post(
        app.local_url + "/admin/fault", json={"kind": "slow", "seconds": 120}, headers=admin, timeout=10
    )
    results: list = []
    t0 = time.time()
    _post_in_background(
        home,
        {"prompt": "a stall", "width": 1024, "height": 1024, "num_inference_steps": 8, "seed": 1},
        results,
    )
    incident = wait_for(
        lambda: [
            i
            for i in _state(state_file)["incidents_open"] + _state(state_file)["incidents_recent"]
            if i["kind"] == "hang" and i["started_at"] >= t0
        ],
        120,
        0.2,
        "stall detected",
    )[0]
    log(
        event="stall_detected",
        after_s=round(incident["started_at"] - t0, 2),
        reason=incident["reason"],
        evidence=incident["evidence"],
    )
    wait_for(lambda: _state(state_file)["restarts"][before:], 300, 0.5, "stall healed")
    wait_for(
        lambda: httpx.get(app.local_url + "/readyz", timeout=2).status_code == 200, 300, 0.5, "ready again"
    )
    log(
        event="stall_healed",
        total_s=round(time.time() - t0, 1),
        restart=_state(state_file)["restarts"][before],
        new_pid=current_app_pid(),
        old_pid=old,
        client=results,
    )


def bigshape_phase(home: Path, state_file: Path, steps: int) -> None:
    """A 2048², 4-image generation (a shape the warm-up never ran): long steps, not a stall."""
    before = len(_state(state_file)["restarts"])
    results: list = []
    thread = _post_in_background(
        home,
        {
            "prompt": "a large batch",
            "width": 2048,
            "height": 2048,
            "num_images": 4,
            "num_inference_steps": steps,
            "seed": 2,
        },
        results,
    )
    bounds = []
    while thread.is_alive():
        hb = (_state(state_file)["sample"] or {}).get("heartbeat") or {}
        if hb.get("busy") and hb.get("stage"):
            bounds.append((hb["stage"], hb.get("stage_slowest_s")))
        time.sleep(1.0)
    thread.join()
    restarts = _state(state_file)["restarts"][before:]
    log(
        event="bigshape",
        result=results,
        restarts=restarts,
        false_positive=bool(restarts),
        stage_slowest_seen=sorted(set(bounds), key=str)[:12],
    )


if __name__ == "__main__":
    sys.exit(main())
