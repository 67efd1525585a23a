"""zimagectl chaos FAULT: inject one fault into a running stack. App-side hooks (oom on CPU, leak,
slow) need `app.fault_injection = true` and use the admin token; the others act from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from ops.stack import Stack

HELP = {
    "hang": "SIGSTOP the app (a hang the process cannot report itself)",
    "crash": "SIGKILL the app",
    "oom": "GPU: fill device memory from another process until the app runs out; CPU: the app's OOM path",
    "leak": "grow the app's RSS by --megabytes",
    "slow": "stretch every denoising step by --seconds (progress continues); with --rank N only that "
    "rank of a context-parallel app (the group waits for it: a stall, not a stopped process)",
    "broken": "the next --count generations raise (not OOM, not CUDA): the engine's self-check finds it",
    "die-answering": "the app SIGKILLs itself as it answers its next generation (after the head, before "
    "the body is written): nothing may reach the client half-made",
    "log-rotate": "rotate logs/app.log the way logrotate does (rename, then supervisord reopens)",
    "kill-monitor": "SIGKILL the monitor (supervisord restarts it)",
    "receiver-down": "alert deliveries fail for --seconds",
    "monitor-stall": "a probe of the monitor never returns (its watchdog replaces it after loop_stall_s)",
    "monitor-fail": "every turn of the monitor's loop raises (its watchdog replaces it after loop_stall_s)",
    "clear": "undo app-side faults (slow, leak, pending oom, broken and die-answering)",
}
FAULTS = tuple(HELP)  # the choices of `zimagectl chaos`, in the order --help lists them


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chaos",
        help="inject a fault into the running stack",
        description="\n".join(f"{k:14} {v}" for k, v in HELP.items()),
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("fault", choices=FAULTS)
    p.add_argument(
        "--seconds", type=float, default=None, help="slow: per-step delay; receiver-down: duration"
    )
    p.add_argument("--rank", type=int, default=0, help="slow: the rank that sleeps (0: the app itself)")
    p.add_argument("--megabytes", type=int, default=1024, help="leak size")
    p.add_argument("--count", type=int, default=100, help="broken: how many generations fail (1-100)")
    p.add_argument("--fill", type=float, default=0.98, help="oom on GPU: fill the device to this fraction")
    p.add_argument("--hold", type=float, default=30.0, help="oom on GPU: hold the memory this long")
    p.add_argument("--cpu-path", action="store_true", help="oom: use the app's OOM path even with a GPU")
    p.set_defaults(func=lambda stack, args: run(stack, args.fault, args))


def app_fault(stack: Stack, body: dict) -> dict:
    r = httpx.post(stack.app_url + "/admin/fault", json=body, headers=stack.admin_headers(), timeout=120)
    if r.status_code == 404:
        raise SystemExit("fault injection is disabled: set [app] fault_injection = true and restart")
    r.raise_for_status()
    return r.json()


def rotate_log(stack: Stack, name: str = "app") -> str:
    """logrotate's create mode: shift the backups, rename the live file, tell supervisord (SIGUSR2)
    to reopen its logs, so new lines go to a fresh file with a new inode."""
    logs = stack.home / "logs"
    live = logs / f"{name}.log"
    rotated = logs / f"{name}.log.chaos-{time.strftime('%Y%m%d%H%M%S')}"
    os.rename(live, rotated)
    os.kill(stack.supervisor().pid(), signal.SIGUSR2)
    return str(rotated)


def gpu_fill(fill: float, hold: float, rate_gib_s: float = 0.0) -> subprocess.Popen:
    """A separate process that takes device memory until the device is `fill` full, then holds it.
    With a rate, it grows steadily (GiB/s), the way a leak or a neighbour's job does."""
    code = f"""
import time, torch
free, total = torch.cuda.mem_get_info()
target = int(total * {fill}) - (total - free)
blocks, chunk = [], 256 * 2**20
while target > chunk:
    try:
        blocks.append(torch.ones(chunk, dtype=torch.uint8, device="cuda")); target -= chunk
    except torch.OutOfMemoryError:
        break
    if {rate_gib_s} > 0:
        time.sleep(chunk / 2**30 / {rate_gib_s})
print(f"holding {{len(blocks) * chunk / 2**30:.1f}} GiB", flush=True)
time.sleep({hold})
"""
    return subprocess.Popen([sys.executable, "-c", code])


def run(stack: Stack, fault: str, args=None) -> int:
    client = stack.supervisor()
    seconds = getattr(args, "seconds", None)
    if fault == "hang":
        pid = client.process("app").pid
        os.kill(pid, signal.SIGSTOP)
        print(f"SIGSTOP sent to app pid {pid}")
    elif fault == "crash":
        pid = client.process("app").pid
        os.kill(pid, signal.SIGKILL)
        print(f"SIGKILL sent to app pid {pid}")
    elif fault == "kill-monitor":
        pid = client.process("monitor").pid
        os.kill(pid, signal.SIGKILL)
        print(f"SIGKILL sent to monitor pid {pid}")
    elif fault == "oom":
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
        if has_gpu and not getattr(args, "cpu_path", False):
            proc = gpu_fill(args.fill, args.hold)
            print(f"filling GPU memory to {args.fill:.0%} for {args.hold:.0f} s (pid {proc.pid})")
        else:
            print(json.dumps(app_fault(stack, {"kind": "oom"})))
            print("the next generation fails with the CUDA OOM error path")
    elif fault == "leak":
        print(json.dumps(app_fault(stack, {"kind": "leak", "megabytes": args.megabytes if args else 1024})))
    elif fault == "slow":
        body = {"kind": "slow", "seconds": seconds if seconds is not None else 1.0}
        print(json.dumps(app_fault(stack, {**body, "rank": getattr(args, "rank", 0)})))
    elif fault == "broken":
        print(json.dumps(app_fault(stack, {"kind": "broken", "count": getattr(args, "count", 100)})))
    elif fault == "die-answering":
        print(json.dumps(app_fault(stack, {"kind": "die_answering"})))
    elif fault == "clear":
        print(json.dumps(app_fault(stack, {"kind": "clear"})))
    elif fault == "log-rotate":
        print(f"rotated to {rotate_log(stack)}")
    elif fault in ("monitor-stall", "monitor-fail"):
        pid = client.process("monitor").pid
        key, effect = (
            ("probe_stall_pid", "its next probe never returns")
            if fault == "monitor-stall"
            else ("tick_fail_pid", "every turn of its loop raises")
        )
        (stack.home / "run" / "chaos.json").write_text(json.dumps({key: pid}))
        print(f"monitor pid {pid}: {effect} (needs app.fault_injection = true)")
    elif fault == "receiver-down":
        until = time.time() + (seconds if seconds is not None else 60.0)
        (stack.home / "run" / "chaos.json").write_text(json.dumps({"receiver_down_until": until}))
        print(
            f"alert deliveries fail until {time.strftime('%H:%M:%S', time.localtime(until))} "
            "(needs app.fault_injection = true)"
        )
    return 0
