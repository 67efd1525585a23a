"""Replicas on a multi-GPU machine: throughput of one app against one per GPU behind HAProxy, side
by side in one run, then a SIGSTOP of one replica under load (the heal, and what clients saw).

    python -m ops.lab.replica_check --model-dir /tmp/zimage-full --replicas 2 --seconds 60

Each configuration is brought up with zimagectl on the full-size model, driven through the public
port by 2 clients per replica (one generating, one waiting: every GPU busy), and taken down. One
JSON line per measurement; the last line is the table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ops.lab.bench_reference import ensure_model_dir
from ops.lab.gpu_check import use_image_python
from ops.load import LoadGenerator
from ops.tempstack import REPO, wait_for


def log(**row) -> None:
    print(json.dumps(row, default=str), flush=True)


def write_config(home: Path, args, replicas: int) -> None:
    (home / "zimage.toml").write_text(
        f'[app]\nmodel_dir = "{args.model_dir}"\ncompile_cache_dir = "{args.compile_cache}"\n'
        f'compile = "{args.compile}"\nreplicas = {replicas}\nrequest_timeout_s = 150\n'
        "drain_timeout_s = 170\nui = false\nqueue_size = 4\n"
        "[monitor]\ninterval_s = 1.0\nwarmup_size = 512\nwarmup_steps = 2\n"
    )


def ctl(home: Path, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZIMAGE_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *argv], env=env, capture_output=True, text=True, timeout=timeout
    )


def drive(url: str, clients: int, seconds: float, size: int, fault=None) -> dict:
    body = {
        "prompt": "a lighthouse on a cliff at dusk, waves, cinematic light",
        "width": size,
        "height": size,
    }
    gen = LoadGenerator(url, concurrency=clients, body=body, deadline_s=300).start()
    started = time.monotonic()
    if fault:
        time.sleep(seconds / 4)
        fault()
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    stats = gen.stop().summary()
    elapsed = time.monotonic() - started
    stats["seconds"] = round(elapsed, 1)
    stats["images_per_hour"] = round(stats["ok"] / elapsed * 3600)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--compile-cache", default="/tmp/zimage-bench/compile-cache")
    parser.add_argument("--compile", default="off")
    parser.add_argument("--reference", default=".bench/zimage_gpu_baseline.py")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--phases", default="one,many,stop")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    ensure_model_dir(args.model_dir, args.reference)
    home = REPO
    use_image_python(home)
    rows = {}
    for label, n in (("one", 1), ("many", args.replicas)):
        if label not in phases and not (label == "many" and "stop" in phases):
            continue
        write_config(home, args, n)
        for f in (home / "run").glob("**/monitor-journal.json"):
            f.unlink()
        t0 = time.time()
        up = ctl(home, "up", "--timeout", "600")
        log(
            event="up", replicas=n, rc=up.returncode, seconds=round(time.time() - t0, 1), out=up.stdout[-800:]
        )
        try:
            if up.returncode != 0:
                return 1
            url = f"http://127.0.0.1:{7860}"
            drive(url, 2 * n, 15, args.size)  # the first requests of each shape
            if label in phases:
                rows[label] = drive(url, 2 * n, args.seconds, args.size)
                log(event="throughput", replicas=n, **rows[label])
            if label == "many" and "stop" in phases:
                rows["stop"] = stop_phase(home, url, n, args)
        finally:
            print(ctl(home, "status").stdout, flush=True)
            down = ctl(home, "down")
            log(event="down", rc=down.returncode)
    if "one" in rows and "many" in rows:
        ratio = rows["many"]["images_per_hour"] / max(1, rows["one"]["images_per_hour"])
        log(
            event="table",
            one=rows["one"]["images_per_hour"],
            many=rows["many"]["images_per_hour"],
            ratio=round(ratio, 3),
        )
    return 0


def stop_phase(home: Path, url: str, n: int, args) -> dict:
    """SIGSTOP replica 1 a quarter into the load; its monitor kills and restarts it."""
    sup = [
        sys.executable,
        "-m",
        "supervisor.supervisorctl",
        "-c",
        str(home / "supervisor" / "supervisord-replicas.conf"),
    ]
    pid = int(subprocess.run(sup + ["pid", "app:app-1"], capture_output=True, text=True).stdout.strip() or 0)
    marks = {}

    def fault():
        marks["stopped_at"] = time.monotonic()
        os.kill(pid, signal.SIGSTOP)

    stats = drive(url, 2 * n, args.seconds, args.size, fault)

    def replaced():
        out = subprocess.run(sup + ["pid", "app:app-1"], capture_output=True, text=True).stdout.strip()
        return out.isdigit() and int(out) not in (0, pid)

    wait_for(replaced, 300, 0.5, "app-1 replaced")
    state = json.loads((home / "run" / "replica-1" / "monitor-state.json").read_text())
    stats["restarts"] = state.get("restarts", [])[-1:]
    log(event="sigstop_one_replica", **stats)
    return stats


if __name__ == "__main__":
    sys.exit(main())
