"""The whole stack on a GPU machine: supervisord + app (full-size model) + monitor with real NVML.

    python -m ops.gpu_check --model-dir /tmp/zimage-full --out DIR

Brings the stack up with zimagectl, prints NVML readings next to torch's, then lets another
process fill GPU memory steadily and reports when the monitor calls it a precursor (before the
threshold) and what it decided; then SIGSTOPs the app and times the heal; then takes it down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ops.tempstack import REPO, wait_for


def log(**row) -> None:
    print(json.dumps(row, default=str), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--compile-cache", default="/tmp/zimage-bench/compile-cache")
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--reference", default=".bench/zimage_gpu_baseline.py")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # (a missing one used to fail the log copy and skip `down`)
    if not (Path(args.model_dir) / "model_index.json").exists():
        from ops.bench import build_model_dir, load_reference

        build_model_dir(load_reference(args.reference), Path(args.model_dir), [])
    home = REPO
    venv_python = home / ".venv" / "bin" / "python"
    if venv_python.is_symlink() or not venv_python.exists():  # no venv there: point at the image's python
        # A wrapper, not a symlink: a symlinked venv python would look for pyvenv.cfg next to the
        # link and lose the image's site-packages.
        venv_python.parent.mkdir(parents=True, exist_ok=True)
        venv_python.unlink(missing_ok=True)
        venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        venv_python.chmod(0o755)
    (home / "zimage.toml").write_text(
        f'[app]\nmodel_dir = "{args.model_dir}"\ncompile_cache_dir = "{args.compile_cache}"\n'
        'fault_injection = true\nui = true\n'
        '[monitor]\ninterval_s = 1.0\nvram_threshold = 0.90\nvram_trend_window_s = 20\n'
        'vram_trend_horizon_s = 60\nvram_escalate_after_s = 15\nwarmup_size = 1024\nwarmup_steps = 2\n')
    env = dict(os.environ, ZIMAGE_HOME=str(home))
    ctl = [sys.executable, "-m", "ops.cli"]
    t0 = time.time()
    up = subprocess.run(ctl + ["up", "--timeout", "400"], env=env, capture_output=True, text=True)
    log(event="up", rc=up.returncode, seconds=round(time.time() - t0, 1), out=up.stdout[-1500:])
    state_file = home / "run" / "monitor-state.json"
    filler = None
    try:
        if up.returncode != 0:
            return 1
        status = subprocess.run(ctl + ["status"], env=env, capture_output=True, text=True)
        print(status.stdout, flush=True)
        from common.gpu import open_gpu_reader
        import torch

        reader = open_gpu_reader()
        free, total = torch.cuda.mem_get_info()
        samples = [s.as_dict() for s in reader.sample()]
        def current_app_pid() -> int:
            return int(subprocess.run([str(home / ".venv/bin/python"), "-m", "supervisor.supervisorctl", "-c",
                                       str(home / "supervisor/supervisord.conf"), "pid", "app"],
                                      capture_output=True, text=True, env=env).stdout.strip() or 0)

        app_pid = current_app_pid()
        log(event="nvml", reader=reader.reason, samples=samples, torch_used=total - free, torch_total=total,
            app_pid=app_pid)
        # VRAM pressure from a neighbour, growing 2 GiB/s towards 97 %.
        from ops.chaos import gpu_fill

        started = time.time()
        filler = gpu_fill(0.97, hold=20, rate_gib_s=2.0)
        seen = None
        crossed_at = None
        while time.time() - started < 75:
            state = json.loads(state_file.read_text())
            gpu = state["sample"].get("gpu") or {}
            frac = (gpu.get("used_bytes") or 0) / (gpu.get("total_bytes") or 1)
            if crossed_at is None and frac >= 0.90:
                crossed_at = time.time() - started
            incident = [i for i in state["incidents_open"] if i["kind"] == "vram_pressure"]
            if incident and seen is None:
                seen = time.time() - started
                log(event="vram_incident", after_s=round(seen, 1), used_fraction=round(frac, 3),
                    reason=incident[0]["reason"], evidence=incident[0]["evidence"])
            if seen is not None and crossed_at is not None and time.time() - started > seen + 20:
                break
            time.sleep(0.5)
        log(event="vram_threshold_crossed", after_s=crossed_at, precursor_first=seen is not None and (
            crossed_at is None or seen < crossed_at), decision=json.loads(state_file.read_text())["decision"])
        filler.kill()
        filler.wait()
        filler = None
        # A hang on the GPU stack: SIGSTOP → kill → restart → ready and warm.
        restarts_so_far = len(json.loads(state_file.read_text())["restarts"])
        log(event="restarts_during_vram_pressure", count=restarts_so_far)
        pid = current_app_pid()
        t_hang = time.time()
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: any(r["kind"] == "hang" for r in json.loads(state_file.read_text())["restarts"]),
                 300, 0.5, "hang healed")
        restart = [r for r in json.loads(state_file.read_text())["restarts"] if r["kind"] == "hang"][0]
        log(event="hang_healed", total_s=round(time.time() - t_hang, 1), restart=restart)
        status = subprocess.run(ctl + ["status"], env=env, capture_output=True, text=True)
        print(status.stdout, flush=True)
    finally:
        if filler is not None:
            filler.kill()
            filler.wait()
        for name in ("app.log", "monitor.log", "supervisord.log"):
            src = home / "logs" / name
            if src.exists():
                shutil.copy(src, Path(args.out) / name)
        if state_file.exists():
            shutil.copy(state_file, Path(args.out) / "monitor-state.json")
        down = subprocess.run(ctl + ["down"], env=env, capture_output=True, text=True)
        log(event="down", rc=down.returncode, out=down.stdout[-300:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
