"""zimagectl drill: inject every fault into a real, temporary stack (supervisord + app + monitor on
the tiny model) while a load generator runs, and print one table. Writes docs/RELIABILITY.md.

Each row: was the fault detected (and how fast), how long until the app was ready and warm again,
what happened to the requests sent meanwhile, which alerts reached the webhook receiver, and
whether anything was restarted that should not have been."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import httpx

from ops.drill_report import Row, table, write_report
from ops.load import LoadGenerator
from ops.tempstack import REPO, StackHome, WebhookReceiver, wait_for

SECRET = "drill-webhook-secret"


class Drill:
    """replicas = 1: the whole drill on one app. replicas = 2: two apps behind HAProxy, the faults
    that hit an app (hang, crash, OOM, leak, slow steps) injected into replica 0 under load through
    the balancer; the monitor's own crash-safety rows are the single stack's (one monitor per replica
    is the same monitor)."""

    def __init__(self, root: Path, log: Callable[[str], None] = print, replicas: int = 1):
        self.log = log
        self.receiver = WebhookReceiver()
        self.replicas = replicas
        self.stack = StackHome(
            root,
            replicas=replicas,
            app={"fault_injection": True, "queue_size": 2},
            monitor={
                "webhooks": self.receiver.url,
                "webhook_secret": SECRET,
                "rss_limit_mb": 1800,
                "webhook_backoff_s": 0.5,
                "webhook_backoff_max_s": 2,
            },
        )
        self.rows: list[Row] = []
        # The app the faults hit, and where its monitor keeps its state.
        self.program = "app:app-0" if replicas > 1 else "app"
        self.state_file = root / "run" / ("replica-0" if replicas > 1 else "") / "monitor-state.json"

    def target_url(self) -> str:
        return self.stack.replica_url(0) if self.replicas > 1 else self.stack.url

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def restarts(self) -> list[dict]:
        return self.state().get("restarts", [])

    def target_pid(self) -> int:
        return self.stack.pid(self.program)

    # ---- helpers -------------------------------------------------------------------------------
    def admin(self, body: dict) -> None:
        r = httpx.post(
            self.target_url() + "/admin/fault", json=body, headers=self.stack.admin_headers(), timeout=60
        )
        r.raise_for_status()

    def alerts_since(self, index: int, kind: Optional[str] = None) -> list[dict]:
        return [r for r in self.receiver.requests[index:] if kind is None or r["json"].get("kind") == kind]

    def _ready(self) -> bool:
        try:
            return httpx.get(self.target_url() + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def run_fault(
        self,
        name: str,
        expected: str,
        inject: Callable[[], None],
        kind: Optional[str],
        restart: bool,
        window_s: float = 6.0,
        note: str = "",
        observe: Optional[Callable[[float, int], tuple]] = None,
    ) -> Row:
        """Inject under load; wait for detection and recovery; count what the load saw.
        `observe(t0, restarts_before)` replaces the alert-based detection where alerts cannot tell
        (returns detected, detection_s, recovered_s)."""
        row = Row(fault=name, expected=expected, notes=note)
        restarts_before = len(self.restarts())
        alerts_before = len(self.receiver.requests)
        load = LoadGenerator(self.stack.url, concurrency=4, deadline_s=30).start()
        time.sleep(1.0)
        t0 = time.time()
        inject()
        try:
            if observe is not None:
                row.detected, row.detection_s, row.recovered_s = observe(t0, restarts_before)
            elif kind:
                firing = wait_for(
                    lambda: [
                        a for a in self.alerts_since(alerts_before, kind) if a["json"]["status"] == "firing"
                    ],
                    30,
                    0.1,
                    f"{kind} firing",
                )
                row.detected, row.detection_s = "yes", firing[0]["at"] - t0
                wait_for(
                    lambda: [
                        a for a in self.alerts_since(alerts_before, kind) if a["json"]["status"] == "resolved"
                    ],
                    90,
                    0.2,
                    f"{kind} resolved",
                )
            else:
                time.sleep(window_s)
            if restart and observe is None:
                entry = wait_for(lambda: self.restarts()[restarts_before:], 60, 0.2, "restart entry")[0]
                row.recovered_s = entry["at"] - t0
                if not entry["ok"]:
                    row.notes += f" warm-up: {entry['warmup']}"
            elif observe is None:
                wait_for(self._ready, 60, 0.1, "ready")
                row.recovered_s = time.time() - t0 if kind else None
        except AssertionError as exc:
            row.notes += f" TIMEOUT: {exc}"
        finally:
            row.load = load.stop().summary()
        new_restarts = self.restarts()[restarts_before:]
        row.false_restarts = sum(1 for r in new_restarts if not restart or (kind and r["kind"] != kind))
        sent = self.alerts_since(alerts_before)
        fired = sum(1 for a in sent if a["json"]["status"] == "firing")
        resolved = sum(1 for a in sent if a["json"]["status"] == "resolved")
        row.alerts = f"{fired}/{resolved}"
        from monitor.alert_payloads import verify

        row.signed = all(verify(a["body"], SECRET, a["headers"].get("x-signature-256", "")) for a in sent)
        if not row.signed:
            row.notes += " UNSIGNED ALERT"
        wait_for(self._ready, 60, 0.2, "ready before the next fault")
        time.sleep(1.5)  # let incidents settle so the next row starts clean
        self.rows.append(row)
        self.log("  " + " | ".join(row.cells()))
        return row

    # ---- the faults ----------------------------------------------------------------------------
    def run(self) -> list[Row]:
        started = time.monotonic()
        self.log(f"drill: starting a temporary stack in {self.stack.home}")
        self.stack.up()
        s = self.stack
        self.run_fault(
            "hang (SIGSTOP)",
            "kill + restart",
            lambda: os.kill(self.target_pid(), signal.SIGSTOP),
            "hang",
            True,
        )
        self.run_fault(
            "crash (SIGKILL)",
            "supervisord restarts, alert",
            lambda: os.kill(self.target_pid(), signal.SIGKILL),
            "crash",
            False,
        )
        if self.replicas > 1:
            # Killed at the worst moment: the server has the head of an answer, not yet its body.
            self.run_fault(
                "killed answering",
                "supervisord restarts, alert",
                lambda: self.admin({"kind": "die_answering"}),
                "crash",
                False,
                note="after the head, before the body: nothing sent, retried on replica 1",
            )
        self.run_fault(
            "oom (CPU path)",
            "graceful restart",
            lambda: self.admin({"kind": "oom"}),
            "oom_in_log",
            True,
            note="one request gets 507" if self.replicas == 1 else "503 from replica 0, retried on replica 1",
        )
        # Every generation raises (what broken CUDA graphs do): the engine's self-check fails, it
        # calls itself unhealthy and the monitor replaces it. Clients get 503 + Retry-After, never 500.
        self.run_fault(
            "broken engine",
            "self-check, restart",
            lambda: self.admin({"kind": "broken", "count": 100}),
            "engine_unhealthy",
            True,
            note="503 + Retry-After, never 500" if self.replicas == 1 else "503s retried on replica 1",
        )
        rss_mb = (self.state().get("sample") or {}).get("rss_bytes", 600 * 2**20) / 2**20
        self.run_fault(
            "leak",
            "graceful restart",
            lambda: self.admin({"kind": "leak", "megabytes": int(1800 - rss_mb + 300)}),
            "memory_limit",
            True,
        )
        slow = self.run_fault(
            "slow steps",
            "no restart",
            lambda: self.admin({"kind": "slow", "seconds": 0.4}),
            None,
            False,
            window_s=8.0,
            note="long but progressing: nothing to heal",
        )
        slow.detected = "n/a"
        self.admin({"kind": "clear"})
        if self.replicas > 1:
            self.log(f"drill: done in {time.monotonic() - started:.0f} s")
            return self.rows

        def rotate_then_oom():
            from ops.chaos import rotate_log
            from ops.stack import Stack

            rotate_log(Stack.load(s.env))
            time.sleep(0.5)
            self.admin({"kind": "oom"})

        self.run_fault("log-rotate (+oom)", "OOM in the new file found", rotate_then_oom, "oom_in_log", True)

        monitor_pid = s.pid("monitor")

        def monitor_back(t0, _before):
            # supervisord restarts it; it is back when it writes its state file again.
            wait_for(lambda: s.pid("monitor") not in (0, monitor_pid), 30, 0.05, "new monitor pid")
            back_s = time.time() - t0
            wait_for(
                lambda: s.state().get("monitor_started_at", 0) > t0 and s.state()["updated_at"] > t0,
                30,
                0.1,
                "monitor state updated",
            )
            time.sleep(4)  # it watches a healthy app: it must not restart it
            return "yes", back_s, None

        row = self.run_fault(
            "kill-monitor",
            "monitor back, no app restart",
            lambda: os.kill(monitor_pid, signal.SIGKILL),
            None,
            False,
            observe=monitor_back,
        )
        row.notes = f"monitor pid {monitor_pid} → {s.pid('monitor')}"

        def receiver_down_then_hang():
            (s.home / "run" / "chaos.json").write_text(json.dumps({"receiver_down_until": time.time() + 12}))
            time.sleep(1.2)
            os.kill(s.pid(), signal.SIGSTOP)

        def healed_by_restart_record(t0, before):
            # No alert can arrive, so detection is read from the monitor's own restart record.
            entry = wait_for(lambda: s.restarts()[before:], 60, 0.2, "hang restart")[0]
            return (
                ("yes" if entry["kind"] == "hang" else "no"),
                entry["at"] - entry["seconds"] - t0,
                entry["at"] - t0,
            )

        sent_before = len(self.receiver.requests)
        row = self.run_fault(
            "receiver-down (+hang)",
            "healed anyway, alerts after",
            receiver_down_then_hang,
            "hang",
            True,
            observe=healed_by_restart_record,
        )
        failed = wait_for(
            lambda: s.state().get("alerts", {}).get("failed_attempts", 0),
            30,
            0.2,
            "failed deliveries counted",
        )
        # The outbox keeps them: once the receiver is back, the hang's firing and resolved arrive, once each.
        wait_for(
            lambda: len(self.alerts_since(sent_before, "hang")) >= 2 and s.state()["alerts"]["outbox"] == 0,
            60,
            0.2,
            "alerts delivered after the outage",
        )
        statuses = [a["json"]["status"] for a in self.alerts_since(sent_before, "hang")]
        row.alerts = f"{statuses.count('firing')}/{statuses.count('resolved')}"
        row.notes = (
            f"failed attempts while down: {failed}; both alerts delivered from the outbox once it was back"
        )

        # Dies with the app stopped for a kill-restart: the next monitor reads the journal and starts it.
        def hang_then_kill_monitor():
            victim = s.pid("monitor")
            os.kill(s.pid(), signal.SIGSTOP)

            def killer():
                def mid_action():
                    journal = json.loads((s.home / "run" / "monitor-journal.json").read_text())
                    return journal.get("pending") and "RUNNING" not in s.supervisorctl("status", "app").stdout

                try:
                    wait_for(mid_action, 30, 0.01, "the kill-restart under way")
                    os.kill(victim, signal.SIGKILL)
                except (AssertionError, OSError, ValueError):
                    pass

            threading.Thread(target=killer, daemon=True).start()

        row = self.run_fault(
            "monitor killed mid-restart (+hang)",
            "rolled forward, one incident",
            hang_then_kill_monitor,
            "hang",
            True,
        )
        resumes = s.log("monitor").count('"event": "resume"')
        row.notes = f"actions rolled forward by a new monitor so far: {resumes}"

        # A line an earlier process wrote (its pid in the JSON): history, never a restart of this one.
        def stale_line():
            line = {
                "level": "error",
                "pid": 1,
                "msg": "torch.OutOfMemoryError: CUDA out of memory (old process)",
            }
            with open(s.home / "logs" / "app.log", "a") as fh:
                fh.write(json.dumps(line) + "\n")

        row = self.run_fault(
            "stale line of an earlier process", "history, no restart", stale_line, None, False
        )
        row.detected = "history" if '"event": "log_history"' in s.log("monitor") else "no"
        self.log(f"drill: done in {time.monotonic() - started:.0f} s")
        return self.rows

    def close(self) -> None:
        self.stack.stop()
        self.receiver.stop()


def main(args) -> int:
    root = Path(tempfile.mkdtemp(prefix="zimage-drill-"))
    drill = Drill(root, replicas=getattr(args, "replicas", 1))
    started = time.monotonic()
    try:
        rows = drill.run()
    finally:
        drill.close()
    seconds = time.monotonic() - started
    print()
    print(table(rows))
    if not getattr(args, "no_write", False):
        out = REPO / "docs" / "RELIABILITY.md"
        write_report(rows, seconds, out, drill.replicas)
        print(f"\nwritten to {out}")
    bad = [
        r
        for r in rows
        if r.detected not in ("yes", "n/a", "history")
        or r.false_restarts
        or r.load.get("lost")
        or r.load.get("server_errors")
        or r.load.get("unclear")
        # behind the balancer the promise is stronger: no refused or reset connection either
        or (drill.replicas > 1 and (r.load.get("refused") or r.load.get("reset")))
    ]
    return 1 if bad else 0


def add_parser(sub) -> None:
    p = sub.add_parser("drill", help="inject every fault into a temporary stack under load; print the table")
    p.add_argument("--no-write", action="store_true", help="do not update docs/RELIABILITY.md")
    p.add_argument(
        "--replicas", type=int, default=1, choices=(1, 2), help="2: two apps behind HAProxy, faults in one"
    )
    p.set_defaults(func=lambda _stack, args: main(args))
