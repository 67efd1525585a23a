"""Actions: do what the policy decided. Free the app's cache, drain and restart gracefully, kill and
restart a hung process, start a FATAL one; every restart ends with a checked warm-up request.
Every wait here has a deadline; `should_stop` lets a SIGTERM to the monitor cut a wait short."""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx
from PIL import Image

from common.polling import poll_until
from common.supervisor_client import SupervisorClient, SupervisorUnavailable
from common.tokenfile import bearer_headers, read_token
from monitor.rolling import HealSlot

log = logging.getLogger("monitor.actions")


@dataclass
class WarmupResult:
    ok: bool
    seconds: float
    ready_after_s: float
    error: Optional[str] = None

    def note(self) -> str:
        if self.ok:
            return f"ready after {self.ready_after_s:.1f} s, warm-up image in {self.seconds:.2f} s"
        return f"warm-up failed: {self.error}"


@dataclass
class ActionResult:
    action: str
    ok: bool
    seconds: float
    detail: str = ""
    warmup: Optional[WarmupResult] = None
    old_pid: int = 0
    new_pid: int = 0
    extra: dict = field(default_factory=dict)
    deferred: bool = False  # not carried out: another replica is down or healing (monitor/rolling.py)


class Actions:
    def __init__(
        self,
        app_url: str,
        supervisor: SupervisorClient,
        program: str,
        admin_token_file: Path,
        admin_token: Optional[str],
        api_token: Optional[str],
        cfg,
        should_stop: Callable[[], bool] = lambda: False,
        heal_slot: Optional[HealSlot] = None,
    ):
        self.app_url = app_url.rstrip("/")
        self.supervisor = supervisor
        self.program = program
        self.admin_token_file = admin_token_file
        self.admin_token = admin_token
        self.api_token = api_token
        self.cfg = cfg
        self.should_stop = should_stop
        self.heal_slot = heal_slot  # replicas only: one heal at a time, never the last serving one
        # Called while an action waits (drain, stop, readiness, warm-up): the loop folds what came
        # meanwhile (an alert delivered) into its journal, so a monitor killed mid-action does not
        # send that alert again.
        self.idle: Callable[[], None] = lambda: None

    def _pause(self, seconds: float) -> None:
        self.idle()
        time.sleep(seconds)

    def _admin_token(self) -> Optional[str]:
        return self.admin_token or read_token(self.admin_token_file)

    def _admin_headers(self) -> dict:
        return bearer_headers(self._admin_token())

    # ---- tier 1 ------------------------------------------------------------------------------
    def free_cache(self) -> ActionResult:
        started = time.perf_counter()
        try:
            r = httpx.post(
                self.app_url + "/admin/free-cache",
                headers=self._admin_headers(),
                timeout=self.cfg.probe_timeout_s * 4,
            )
            ok = r.status_code == 200
            return ActionResult(
                "free_cache",
                ok,
                time.perf_counter() - started,
                detail=str(r.json() if ok else f"HTTP {r.status_code}"),
            )
        except httpx.HTTPError as exc:
            return ActionResult(
                "free_cache", False, time.perf_counter() - started, detail=exc.__class__.__name__
            )

    # ---- tier 2: drain, then a graceful restart ------------------------------------------------
    def graceful_restart(self) -> ActionResult:
        started = time.perf_counter()
        old_pid = self._pid()
        try:
            drained = self._drain()
        except BaseException:
            # Interrupted before the stop (an operator's Ctrl-C on zimagectl restart): nothing was
            # restarted, so the app serves again instead of staying drained with nobody to finish.
            self._set_drain(False)
            raise
        self.supervisor.stop(self.program, wait=False)  # TERM: the app drains what is left and exits 0
        stopped = self._wait_state({"STOPPED", "EXITED", "FATAL"}, self.cfg.stop_timeout_s)
        if not stopped:
            self._kill_group(old_pid)
            self._wait_state({"STOPPED", "EXITED", "FATAL"}, 15)
        return self._start_and_warm(
            "restart",
            started,
            old_pid,
            f"drained={drained}" + ("" if stopped else ", stop timed out: killed"),
        )

    def _set_drain(self, enable: bool) -> bool:
        try:
            httpx.post(
                self.app_url + "/admin/drain",
                json={"enable": enable},
                headers=self._admin_headers(),
                timeout=self.cfg.probe_timeout_s * 2,
            )
            return True
        except httpx.HTTPError:
            return False

    def _drain(self) -> bool:
        """Readiness off (a balancer stops sending work), then wait for in-flight work to finish."""
        if not self._set_drain(True):
            return False

        def drained() -> Optional[str]:
            if self.should_stop():
                return "stopping"
            try:
                body = httpx.get(self.app_url + "/healthz", timeout=self.cfg.probe_timeout_s).json()
            except (httpx.HTTPError, ValueError):
                return "unanswered"
            idle = body.get("in_flight", 0) == 0 and not body.get("heartbeat", {}).get("busy")
            return "drained" if idle else None

        return poll_until(drained, self.cfg.drain_wait_s, 0.2, sleep=self._pause) == "drained"

    # ---- tier 3: kill (a stopped or wedged process cannot drain) ----------------------------------
    def kill_restart(self) -> ActionResult:
        started = time.perf_counter()
        old_pid = self._pid()
        try:
            # stop first so supervisord expects the exit (no autorestart race), then KILL the group:
            # the TERM it sent stays pending in a stopped process, KILL does not.
            self.supervisor.stop(self.program, wait=False)
        except SupervisorUnavailable:
            raise
        except Exception as exc:
            log.warning("stopProcess failed before kill", extra={"error": str(exc)[:200]})
        self._kill_group(old_pid)
        self._wait_state({"STOPPED", "EXITED", "FATAL"}, 15)
        return self._start_and_warm("kill", started, old_pid, f"killed pid {old_pid}")

    def start(self) -> ActionResult:
        state = self._state()
        return self._start_and_warm("start", time.perf_counter(), 0, f"started from {state}")

    # ---- one entry for the loop, and the roll-forward of an interrupted action --------------------
    def run(self, action: str, target_pid: int, resumed: bool) -> ActionResult:
        if self.heal_slot is None or action == "free_cache":
            return self._run(action, target_pid, resumed)
        # A resumed action already took this replica down (or began to): finish it, no re-check.
        with self.heal_slot.hold(action, self._pause, check=not resumed) as refused:
            if refused:
                log.warning(
                    "action deferred (rolling heal)",
                    extra={"event": "action_deferred", "action": action, "why": refused},
                )
                return ActionResult(action, False, 0.0, detail=f"deferred: {refused}", deferred=True)
            return self._run(action, target_pid, resumed)

    def _run(self, action: str, target_pid: int, resumed: bool) -> ActionResult:
        if resumed:
            return self.roll_forward(action, target_pid)
        return {
            "free_cache": self.free_cache,
            "restart": self.graceful_restart,
            "kill": self.kill_restart,
            "start": self.start,
        }[action]()

    def roll_forward(self, action: str, target_pid: int) -> ActionResult:
        """Finish what a monitor that died mid-action began, from what supervisord says now: an app
        still stopping is waited for (then killed), a stopped one is started, a new process is
        warmed up and checked, and the process the action was aimed at, still running, gets the
        action again. Whatever the point of death, the app ends up running and checked."""
        started = time.perf_counter()
        state, pid = self._state(), self._pid()
        if state == "STOPPING":
            if not self._wait_state({"STOPPED", "EXITED", "FATAL"}, self.cfg.stop_timeout_s):
                self._kill_group(pid)
                self._wait_state({"STOPPED", "EXITED", "FATAL"}, 15)
            state = self._state()
        if state in ("STOPPED", "EXITED", "FATAL", "BACKOFF"):
            return self._start_and_warm(action, started, target_pid, f"rolled forward: started from {state}")
        if state in ("RUNNING", "STARTING") and pid and pid == target_pid and action != "start":
            log.warning(
                "rolled forward: the interrupted action never reached the app; running it again",
                extra={"event": "resume_again", "action": action, "pid": pid},
            )
            return self.run(action, target_pid, resumed=False)
        warm = self.warm_up()
        return ActionResult(
            action,
            warm.ok,
            time.perf_counter() - started,
            detail=f"rolled forward: the app was {state}, checked it",
            warmup=warm,
            old_pid=target_pid,
            new_pid=self._pid(),
        )

    def _kill_group(self, pid: int) -> None:
        if not pid:
            return
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)  # supervisord makes each program a group leader
        except (ProcessLookupError, PermissionError):
            try:
                self.supervisor.signal(self.program, "KILL")
            except Exception:
                pass

    # ---- shared ----------------------------------------------------------------------------------
    def _pid(self) -> int:
        try:
            return self.supervisor.process(self.program).pid
        except Exception:
            return 0

    def _state(self) -> str:
        try:
            return self.supervisor.process(self.program).state
        except Exception:
            return "UNKNOWN"

    def _wait_state(self, states: set[str], timeout: float) -> bool:
        def reached() -> bool:
            return self.supervisor.process(self.program).state in states

        return bool(poll_until(reached, timeout, 0.1, ignore=(SupervisorUnavailable,), sleep=self._pause))

    def _start_and_warm(self, action: str, started: float, old_pid: int, detail: str) -> ActionResult:
        if self._state() == "BACKOFF":
            # supervisord is between its own retries; startProcess refuses a BACKOFF program.
            self.supervisor.stop(self.program, wait=True)
        self.supervisor.start(self.program, wait=False)
        warm = self.warm_up()
        new_pid = self._pid()
        log.warning(
            "app %s done",
            action,
            extra={
                "event": "restart_done",
                "action": action,
                "old_pid": old_pid,
                "new_pid": new_pid,
                "warmup_ok": warm.ok,
                "warmup_s": round(warm.seconds, 3),
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        return ActionResult(
            action,
            warm.ok,
            time.perf_counter() - started,
            detail=detail,
            warmup=warm,
            old_pid=old_pid,
            new_pid=new_pid,
        )

    def warm_up(self) -> WarmupResult:
        """Wait for readiness, send one small generation, check it really returns an image."""
        t0 = time.perf_counter()

        def ready_or_given_up() -> Optional[str]:
            if self.should_stop():
                return "stopping"
            try:
                if httpx.get(self.app_url + "/readyz", timeout=self.cfg.probe_timeout_s).status_code == 200:
                    return "ready"
            except httpx.HTTPError:
                pass
            try:
                if self.supervisor.process(self.program).state == "FATAL":
                    return "fatal"
            except Exception:
                pass
            return None

        ready = (
            poll_until(ready_or_given_up, self.cfg.warmup_ready_timeout_s, 0.2, sleep=self._pause) == "ready"
        )
        ready_after = time.perf_counter() - t0
        if not ready:
            return WarmupResult(
                False, 0.0, ready_after, f"not ready within {self.cfg.warmup_ready_timeout_s:.0f} s"
            )
        size = self.cfg.warmup_size
        body = {
            "prompt": "warm-up check: a lighthouse on a cliff",
            "width": size,
            "height": size,
            "num_inference_steps": self.cfg.warmup_steps,
            "seed": 1,
            "response_format": "base64",
        }
        headers = bearer_headers(self.api_token)
        headers["x-request-id"] = "monitor-warmup"
        admin = self._admin_token()
        if admin:
            headers["x-admin-token"] = admin  # priority lane: the check is not starved by user traffic
        t1 = time.perf_counter()
        deadline = time.monotonic() + self.cfg.warmup_timeout_s
        while True:
            try:
                r = httpx.post(
                    self.app_url + "/api/generate",
                    json=body,
                    headers=headers,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except httpx.HTTPError as exc:
                return WarmupResult(False, time.perf_counter() - t1, ready_after, exc.__class__.__name__)
            # A busy server says so with 503 + Retry-After: honour it, within the warm-up deadline.
            retry = r.headers.get("retry-after")
            if (
                r.status_code == 503
                and retry
                and time.monotonic() + min(float(retry), 2.0) < deadline
                and not self.should_stop()
            ):
                self._pause(min(float(retry), 2.0))
                continue
            break
        seconds = time.perf_counter() - t1
        if r.status_code != 200:
            return WarmupResult(False, seconds, ready_after, f"HTTP {r.status_code}: {r.text[:200]}")
        try:
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64_png"])))
            if image.size != (size, size):
                return WarmupResult(
                    False, seconds, ready_after, f"image is {image.size}, expected {size}x{size}"
                )
        except Exception as exc:
            return WarmupResult(False, seconds, ready_after, f"no valid image in the response ({exc})")
        return WarmupResult(True, seconds, ready_after)
