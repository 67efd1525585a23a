"""What the stack around the engine adds to a launch-bound step, side by side in one stack's life.

    python -m ops.lab.stack_noise --model-dir /tmp/zimage-full --size 512 --floor

At 512² one H200 is launch-bound (22 ms of kernels in a 25 ms step), the regime each rank of a
two-GPU image is in; there the whole stack's step measured 29–52 ms against the pipeline loop's
25 ms alone (docs/PERFORMANCE.md). This brings the one-GPU stack up once (`zimagectl up`, jit) and
alternates phases: as deployed (the monitor probing and sampling every second), then with the
monitor stopped (`supervisorctl stop monitor`), `--rounds` times. Per phase: the denoising step
from each response's own timings, and what every thread of the app and every other process on the
machine spent of the CPU meanwhile (/proc; nothing is injected into the app), the engine thread's
involuntary switches, the machine's steal time, and per request GPU 0's SM clock, power and
clock-event reasons (NVML, polled every 20 ms from this process: the one load the tool adds).
`--floor` first runs the pipeline loop alone (ops.lab.cp_profile one-pipe) in this call; `--ui`
repeats the phases with the UI on (needs gradio). One JSON line per phase; the last line is the
summary. docs/PERFORMANCE.md has what it found.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil

from ops.lab.bench_reference import ensure_model_dir
from ops.lab.gpu_check import use_image_python
from ops.lab.parallel_check import PROMPT, ctl, generate, log, write_config
from ops.tempstack import REPO

SUPERVISORCTL = [
    sys.executable,
    "-m",
    "supervisor.supervisorctl",
    "-c",
    str(REPO / "supervisor" / "supervisord.conf"),
]


def supervisorctl(*argv: str) -> str:
    return subprocess.run(
        SUPERVISORCTL + list(argv), capture_output=True, text=True, timeout=120
    ).stdout.strip()


def cpu_by_thread(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of `pid`: (its name, CPU seconds so far)."""
    rows = {}
    for thread in psutil.Process(pid).threads():
        try:
            with open(f"/proc/{pid}/task/{thread.id}/comm") as f:
                name = f.read().strip()
        except OSError:
            name = "?"
        rows[thread.id] = (name, thread.user_time + thread.system_time)
    return rows


def involuntary_switches(pid: int) -> dict[int, int]:
    """Each thread's involuntary context switches so far: how often something else took its core."""
    rows = {}
    for thread in psutil.Process(pid).threads():
        try:
            with open(f"/proc/{pid}/task/{thread.id}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        rows[thread.id] = int(line.split()[1])
        except OSError:
            pass
    return rows


class GpuClocks:
    """GPU 0's SM clock, power and clock-event reasons, sampled every 20 ms in a thread of this
    process (not the app's), summarised per request: whether a slow step is the GPU slowing down
    (clocks, power cap) or its host. Absent without NVML."""

    def __init__(self):
        self.rows: list[tuple[int, float, int]] = []
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no GPU here (a dry run)
            self.nv = None
            return
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        nv, handle = self.nv, self.handle
        while not self.stop.wait(0.02):
            try:
                reasons = nv.nvmlDeviceGetCurrentClocksEventReasons(handle)
            except Exception:
                reasons = -1
            self.rows.append(
                (
                    nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM),
                    nv.nvmlDeviceGetPowerUsage(handle) / 1000,
                    reasons,
                )
            )

    def take(self) -> dict:
        """The samples since the last call: mean SM MHz, mean watts, every reason seen (bitmask)."""
        rows, self.rows = self.rows, []
        if not rows:
            return {}
        reasons = 0
        for _, _, r in rows:
            reasons |= max(r, 0)
        return {
            "sm_mhz": round(statistics.mean(r[0] for r in rows)),
            "watts": round(statistics.mean(r[1] for r in rows)),
            "reasons": hex(reasons),
        }


def cpu_by_process() -> dict[int, tuple[str, float]]:
    rows = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        what = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])[-70:]
        rows[proc.pid] = (what, times.user + times.system)
    return rows


def spent(before: dict, after: dict, top: int) -> list:
    """The largest CPU seconds spent between two readings, by key, as [seconds, name, key]."""
    deltas = [
        [round(after[k][1] - before.get(k, (None, 0.0))[1], 3), after[k][0], k]
        for k in after
        if after[k][1] - before.get(k, (None, 0.0))[1] > 0.005
    ]
    return sorted(deltas, reverse=True)[:top]


def phase(label: str, app_pid: int, args, seed0: int, clocks: GpuClocks) -> dict:
    threads0, procs0, t0 = cpu_by_thread(app_pid), cpu_by_process(), time.monotonic()
    switches0, machine0 = involuntary_switches(app_pid), psutil.cpu_times()
    steps_ms, walls = [], []
    gpu, engine_cpu_ms = [], []
    engine = args.engine_tid  # the thread that ran the left-out requests
    steal_ms = []  # per request: the hypervisor's time away from this machine's CPUs, all of them
    for i in range(args.n):
        before = getattr(psutil.cpu_times(), "steal", 0.0)
        clocks.take()
        engine_before = cpu_by_thread(app_pid).get(engine, ("", 0.0))[1]
        wall, timings, _ = generate(seed0 + i, args.size, PROMPT)
        gpu.append(clocks.take())
        engine_cpu_ms.append(round(1000 * (cpu_by_thread(app_pid).get(engine, ("", 0.0))[1] - engine_before)))
        steal_ms.append(round(1000 * (getattr(psutil.cpu_times(), "steal", 0.0) - before)))
        walls.append(wall)
        steps_ms.append(1000 * timings["denoise_s"] / 8)
    seconds = time.monotonic() - t0
    switches, machine = involuntary_switches(app_pid), psutil.cpu_times()
    threads = cpu_by_thread(app_pid)
    row = {
        "phase": label,
        "step_ms_median": round(statistics.median(steps_ms), 2),
        "step_ms_min": round(min(steps_ms), 2),
        "step_ms_max": round(max(steps_ms), 2),
        "end_to_end_s_median": round(statistics.median(walls), 3),
        "seconds": round(seconds, 1),
        "app_threads_cpu_s": spent(threads0, threads, args.top),
        "processes_cpu_s": spent(procs0, cpu_by_process(), args.top),
        # the busiest thread (the engine's) preempted, and the hypervisor's share of the machine
        "engine_involuntary_switches": switches.get(engine, 0) - switches0.get(engine, 0),
        "machine_steal_s": round(getattr(machine, "steal", 0.0) - getattr(machine0, "steal", 0.0), 3),
        "machine_busy_s": round(sum(machine) - machine.idle - sum(machine0) + machine0.idle, 2),
        "steps_ms": [round(s, 1) for s in steps_ms],
        "steal_ms": steal_ms,
        "engine_cpu_ms": engine_cpu_ms,  # the engine thread's, per request
        "gpu": gpu,
    }
    log(event="phase", **row)
    return row


def stack_phases(args, ui: bool) -> list[dict]:
    """One stack's life: up, the shape's first requests left out, the phases alternated, down."""
    write_config(args, "jit", parallel=False)
    if ui:  # as deployed by default: Gradio's queue and its loops in the same process
        config = REPO / "zimage.toml"
        config.write_text(config.read_text().replace("ui = false", "ui = true"))
    t0 = time.time()
    up = ctl("up", "--timeout", "420")
    log(event="up", ui=ui, rc=up.returncode, seconds=round(time.time() - t0, 1))
    rows = []
    try:
        if up.returncode:
            log(event="app_log", tail=(REPO / "logs" / "app.log").read_text()[-4000:])
            return rows
        app_pid = int(supervisorctl("pid", "app"))
        clocks = GpuClocks()
        threads0 = cpu_by_thread(app_pid)
        for i in range(3):  # the shape's first requests, left out
            generate(900 + i, args.size)
        threads = cpu_by_thread(app_pid)
        args.engine_tid = max(threads, key=lambda t: threads[t][1] - threads0.get(t, ("", 0.0))[1])
        suffix = ", UI on" if ui else ""
        for r in range(args.rounds):
            rows.append(phase("as deployed" + suffix, app_pid, args, 100 * r, clocks))
            log(event="monitor", stop=supervisorctl("stop", "monitor"))
            rows.append(phase("monitor stopped" + suffix, app_pid, args, 100 * r + 50, clocks))
            log(event="monitor", start=supervisorctl("start", "monitor"))
            time.sleep(3)  # its first probes and samples
    finally:
        log(event="down", rc=ctl("down").returncode)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--compile-cache", default="/tmp/zimage-bench/compile-cache")
    parser.add_argument("--reference", default=".bench/zimage_gpu_baseline.py")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n", type=int, default=10, help="requests per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--ui", action="store_true", help="then the same with the UI on (the default)")
    parser.add_argument("--floor", action="store_true", help="the pipeline loop alone first (cp_profile)")
    args = parser.parse_args(argv)
    args.quantize = "none"  # write_config's field
    built_s = ensure_model_dir(args.model_dir, args.reference)
    if built_s is not None:
        log(event="model_built", seconds=round(built_s, 1))
    if args.floor:  # the GPU is free until the stack starts
        variants = ["--variants", "one-pipe,one-pipe", "--size", str(args.size), "--rounds", "10"]
        floor = subprocess.run(
            [sys.executable, "-m", "ops.lab.cp_profile", *variants],
            capture_output=True,
            text=True,
            timeout=400,
        )
        for line in floor.stdout.splitlines()[-6:]:
            print(line, flush=True)
        if floor.returncode:
            log(event="floor_failed", stderr=floor.stderr[-2000:])
    use_image_python(REPO)
    rows = []
    for ui in (False, True) if args.ui else (False,):
        rows += stack_phases(args, ui)
    summary: dict[str, list] = {}
    for row in rows:
        summary.setdefault(row["phase"], []).append(row["step_ms_median"])
    log(event="summary", size=args.size, n=args.n, step_ms_median_by_phase=summary, cpus=os.cpu_count())
    return 0


if __name__ == "__main__":
    sys.exit(main())
