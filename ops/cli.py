"""zimagectl: the operator's commands on top of supervisord's XML-RPC and the app's endpoints.

zimagectl up          start supervisord (if needed) and wait until the app is ready and warm
zimagectl down        graceful stop: monitor, then app (drains), then supervisord
zimagectl status      supervisord + app readiness/busy/queue + GPU + monitor incidents and budget
zimagectl restart     graceful restart of the app, waits for ready and a checked warm-up
zimagectl logs [app|monitor|supervisord] [-f] [-n N]
zimagectl warmup      send one warm-up generation and check the image
zimagectl chaos FAULT inject a fault into the running stack (see `zimagectl chaos -h`)
zimagectl drill       the fault-injection drill against a temporary stack, with its table
zimagectl bench       the performance benchmark table
zimagectl drift       how far the lossy opt-ins move an image from the default (same seed)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from common.configfile import ConfigError
from common.polling import poll_until
from common.supervisor_client import SupervisorUnavailable
from ops import leftovers
from ops.balancer import all_in_pool
from ops.stack import Stack, program_names, program_states


def say(message: str) -> None:
    print(message, flush=True)


def cmd_up(stack: Stack, args) -> int:
    client = stack.supervisor()
    if client.is_running():
        say(f"supervisord already running (pid {client.pid()})")
        for name, full in program_names(client).items():
            if program_states(client).get(name) not in ("RUNNING", "STARTING"):
                say(f"starting {name}")
                client.start(full, wait=False)
    else:
        # A supervisord that died left its programs stopping (common/parent.py): see them gone, and
        # refuse a port someone else holds, rather than say "ready" from another server's /readyz.
        if not leftovers.clear_the_way(stack, say):
            return 1
        say(f"starting supervisord -c {stack.conf}")
        try:
            stack.start_supervisord()
        except Exception as exc:
            say(f"error: supervisord did not start: {exc}")
            return 1
        if not poll_until(client.is_running, 20, 0.25):
            say(
                f"error: supervisord not answering on {stack.monitor.supervisor_socket}; "
                "see logs/supervisord.log"
            )
            return 1
    started = time.monotonic()
    last = [""]

    def progress():
        states = program_states(client)
        health = stack.healthz()
        line = (
            f"  {time.monotonic() - started:5.1f}s  app={states.get('app', '?')}"
            f"  monitor={states.get('monitor', '?')}  engine={(health or {}).get('state', 'not answering')}"
        )
        if line.split("s ", 1)[1] != last[0]:
            say(line)
            last[0] = line.split("s ", 1)[1]
        if states.get("app") == "FATAL":
            raise SystemExit("error: app is FATAL (crashed at start); see: zimagectl logs app")

    # Ready means all: every app answers /readyz, supervisord counts each started (startsecs), and
    # with replicas HAProxy routes to each (its checks need a rise after the app is ready: until
    # then a client at the public port could get HAProxy's 503, the replica tests saw it).
    ready = poll_until(
        lambda: (
            all((stack.readyz(url=stack.replica_url(r)) or {}).get("ready") for r in stack.replicas)
            and all(program_states(client).get(n) == "RUNNING" for n in stack.programs())
            and (not stack.replicated or all_in_pool(stack))
        ),
        args.timeout,
        progress=progress,
        progress_every=1.0,
    )
    if not ready:
        say(f"error: app not ready after {args.timeout:.0f} s; see: zimagectl logs app")
        return 1
    info = stack.readyz() or {}
    say(
        f"ready in {time.monotonic() - started:.1f} s (warm-up {info.get('warmup_seconds')} s): "
        f"{stack.app_url}/"
    )
    # An operator's up is a fresh start: restarts before it no longer count.
    for name in [p for p in stack.programs() if p.startswith("monitor")]:
        reset_monitor_budget(client, name if name == "monitor" else f"monitor:{name}")
    if stack.app.is_demo_model:
        say("note: serving the built-in DEMO model (random weights); set app.model_dir for Z-Image-Turbo")
    return 0


def cmd_down(stack: Stack, args) -> int:
    client = stack.supervisor()
    if not client.is_running():
        say("supervisord is not running")
        leftovers.see_gone(stack.home, args.timeout, say)  # what a supervisord that died left stopping
        return 0
    stack.set_maintenance(args.timeout + 30, "zimagectl down")
    slow = stack.supervisor(timeout=args.timeout + 10)
    # The monitors first, so they do not "heal" the planned stop; the apps drain together; the
    # balancer last, so nothing in flight loses its way out.
    groups = ("monitor", "app", "haproxy") if stack.replicated else ("monitor", "app")
    for name in groups:
        say(f"stopping {name}{' (draining in-flight requests)' if name == 'app' else ''}")
        try:
            slow.stop(f"{name}:*" if stack.replicated else name, wait=True)
        except Exception as exc:
            say(f"  {name}: {exc}")
    pid = client.pid()
    say("stopping supervisord")
    client.shutdown()
    gone = poll_until(lambda: not _alive(pid), 30, 0.25)
    stack.clear_maintenance()
    say("stopped" if gone else f"warning: supervisord pid {pid} still alive")
    return 0 if gone else 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cmd_status(stack: Stack, args) -> int:
    from monitor.status import read_state

    client = stack.supervisor()
    report: dict = {"home": str(stack.home), "url": stack.app_url}
    try:
        report["supervisord"] = {"state": client.state(), "pid": client.pid()}
        report["programs"] = {
            p.name: {"state": p.state, "pid": p.pid, "uptime_s": p.uptime_s} for p in client.processes()
        }
    except SupervisorUnavailable:
        report["supervisord"] = {"state": "not running"}
        left = leftovers.find(stack.home)
        if left:  # a supervisord that died: its programs stop by themselves (common/parent.py)
            report["supervisord"]["left_running"] = leftovers.describe(left)
    health, ready = stack.healthz(), stack.readyz()
    if health:
        hb = health.get("heartbeat", {})
        report["app"] = {
            "engine": health.get("state"),
            "ready": bool(ready and ready.get("ready")),
            "draining": health.get("draining"),
            "busy": hb.get("busy"),
            "steps": f"{hb.get('steps_done')}/{hb.get('steps_total')}",
            "queue_waiting": health.get("queue_waiting"),
            "in_flight": health.get("in_flight"),
            "jobs": health.get("jobs"),
        }
    else:
        report["app"] = {"engine": "not answering"}
    state = None if stack.replicated else read_state(stack.monitor.state_file)  # (per replica below)
    if state:
        report["monitor"] = {
            "updated_s_ago": round(time.time() - state["updated_at"], 1),
            "incidents_open": [
                f"{i['kind']} ({i['severity']}): {i['reason']}" for i in state["incidents_open"]
            ],
            "decision": state.get("decision"),
            "pending_action": state.get("pending_action"),
            "budget": state["budget"],
            "restarts": state["restarts"][-3:],
            "gpu_reader": state.get("gpu_reader"),
            "alerts": state.get("alerts"),
        }
        gpu = (state.get("sample") or {}).get("gpu")
        if gpu:
            report["gpu"] = {
                "name": gpu["name"],
                "used_gib": round(gpu["used_bytes"] / 2**30, 2),
                "total_gib": round(gpu["total_bytes"] / 2**30, 2),
                "app_gib": None if gpu["app_bytes"] is None else round(gpu["app_bytes"] / 2**30, 2),
            }
        rss = (state.get("sample") or {}).get("rss_bytes")
        if rss:
            report["app"]["rss_mib"] = round(rss / 2**20)
    if stack.replicated:
        from ops.replica_ops import print_replicas, replica_report

        report["replicas"] = replica_report(stack)
        report["app"]["ready"] = any(r["ready"] for r in report["replicas"])
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _print_status(report)
        if stack.replicated:
            print_replicas(report["replicas"], say)
    ok = report.get("app", {}).get("ready") and not (state or {}).get("budget", {}).get("circuit_open")
    return 0 if ok else 3


def _print_status(r: dict) -> None:
    say(f"zimage-serve  {r['home']}  {r['url']}")
    say(f"supervisord   {r['supervisord'].get('state')}  pid {r['supervisord'].get('pid', '-')}")
    if r["supervisord"].get("left_running"):
        say(f"  left running by a supervisord that died (stopping): {r['supervisord']['left_running']}")
    for name, p in r.get("programs", {}).items():
        say(f"  {name:<10}  {p['state']:<9} pid {p['pid']:<7} up {p['uptime_s']} s")
    a = r.get("app", {})
    say(
        f"app           engine={a.get('engine')} ready={a.get('ready')} draining={a.get('draining')} "
        f"busy={a.get('busy')} steps={a.get('steps')} queue={a.get('queue_waiting')} "
        f"in_flight={a.get('in_flight')} rss={a.get('rss_mib', '?')} MiB"
    )
    if a.get("jobs"):
        say(f"jobs          queued={a['jobs'].get('queued')} running={a['jobs'].get('running')}")
    if "gpu" in r:
        g = r["gpu"]
        say(f"gpu           {g['name']}: {g['used_gib']}/{g['total_gib']} GiB used (app {g['app_gib']} GiB)")
    m = r.get("monitor")
    if "replicas" in r:
        return
    if not m:
        say("monitor       no state file yet")
        return
    b = m["budget"]
    circuit = "OPEN: auto-restart STOPPED (zimagectl restart resets)" if b["circuit_open"] else "closed"
    say(f"monitor       updated {m['updated_s_ago']} s ago, gpu reader: {m['gpu_reader']}")
    say(f"  budget      {b['left']}/{b['limit']} restarts left per {b['window_s']:.0f} s, circuit {circuit}")
    for line in m["incidents_open"] or ["none"]:
        say(f"  incident    {line}")
    for rs in m["restarts"]:
        say(
            f"  restart     {time.strftime('%H:%M:%S', time.localtime(rs['at']))} "
            f"{rs['action']} for {rs['kind']}: {rs['warmup']}"
        )


def _actions(stack: Stack, **cfg_overrides):
    """The monitor's own actions (drain, graceful restart, checked warm-up), for an operator's hand."""
    from monitor.actions import Actions

    return Actions(
        stack.app_url,
        stack.supervisor(),
        "app",
        stack.app.admin_token_file,
        stack.app.admin_token,
        stack.app.api_token,
        stack.monitor.model_copy(update=cfg_overrides),
    )


def cmd_restart(stack: Stack, args) -> int:
    client = stack.supervisor()
    if not client.is_running():
        say("supervisord is not running: use zimagectl up")
        return 1
    if stack.replicated:
        from ops.replica_ops import pick, rolling_restart

        try:
            targets = pick(stack, args.target)
        except ValueError as exc:
            say(f"error: {exc}")
            return 2
        ok = rolling_restart(stack, targets, args.timeout, say)
        for i in range(len(stack.replicas)):
            reset_monitor_budget(client, f"monitor:monitor-{i}")
        return 0 if ok else 1
    stack.set_maintenance(args.timeout + 30, "zimagectl restart")
    try:
        say("draining (readiness off, in-flight requests finish), then stopping and starting the app")
        result = _actions(stack, warmup_ready_timeout_s=args.timeout).graceful_restart()
    finally:
        stack.clear_maintenance()
    say(f"restarted in {result.seconds:.1f} s: pid {result.old_pid} → {result.new_pid} ({result.detail})")
    warm = result.warmup
    say(("warm-up ok: " if result.ok else "warm-up FAILED: ") + (warm.note() if warm else result.detail))
    reset_monitor_budget(client)  # an operator's restart also closes the monitor's circuit if it had given up
    return 0 if result.ok else 1


def reset_monitor_budget(client, name: str = "monitor") -> None:
    """SIGHUP: the monitor forgets its restarts in the window and closes its circuit (its journal keeps
    them across its own restarts, not across an operator's hand)."""
    try:
        client.signal(name, "HUP")
    except Exception:
        pass


def cmd_warmup(stack: Stack, args) -> int:
    result = _actions(stack).warm_up()
    say(("warm-up ok: " if result.ok else "warm-up FAILED: ") + result.note())
    return 0 if result.ok else 1


def cmd_logs(stack: Stack, args) -> int:
    path = stack.home / "logs" / f"{args.program}.log"
    if not path.exists():
        say(f"no log yet at {path}")
        return 1
    with open(path, "rb") as fh:
        lines = fh.readlines()[-args.lines :]
        sys.stdout.write(b"".join(lines).decode(errors="replace"))
        sys.stdout.flush()
        if not args.follow:
            return 0
        inode = os.fstat(fh.fileno()).st_ino
        try:
            while True:
                chunk = fh.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
                    if path.exists() and os.stat(path).st_ino != inode:  # rotated
                        fh.close()
                        fh = open(path, "rb")
                        inode = os.fstat(fh.fileno()).st_ino
        except KeyboardInterrupt:
            return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimagectl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start the stack and wait until ready")
    p.add_argument("--timeout", type=float, default=900)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the stack gracefully")
    p.add_argument("--timeout", type=float, default=200)
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="one view of supervisord, the app and the monitor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("restart", help="graceful restart of the app, then a checked warm-up")
    p.add_argument("target", nargs="?", help="with replicas: app:N restarts one; none: all, one at a time")
    p.add_argument("--timeout", type=float, default=900)
    p.set_defaults(func=cmd_restart)
    p = sub.add_parser("logs", help="show a program's log")
    p.add_argument("program", nargs="?", default="app", choices=["app", "monitor", "supervisord"])
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("warmup", help="send a warm-up generation and check the image")
    p.set_defaults(func=cmd_warmup)
    # Listed for --help; main() hands its arguments to ops.lab.bench untouched (argparse mangles a
    # REMAINDER of options).
    sub.add_parser("bench", add_help=False, help="the performance table (zimagectl bench --help)")
    sub.add_parser(
        "drift", add_help=False, help="the lossy opt-ins' drift from the default (zimagectl drift --help)"
    )
    from ops import chaos, drill

    chaos.add_parser(sub)
    drill.add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # needs no running stack
        from ops.lab import bench

        return bench.main(argv[1:])
    if argv[:1] == ["drift"]:  # loads a pipeline in-process; needs no running stack
        from ops.lab import drift

        return drift.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        stack = Stack.load()
    except ConfigError as exc:
        say(f"zimagectl: {exc}")
        return 2
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return args.func(stack, args)


if __name__ == "__main__":
    sys.exit(main())
