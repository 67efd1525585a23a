"""Probes: read the world, each with a timeout. HTTP (live/ready + heartbeat), supervisord's view of
the program, psutil RSS of the app's process tree, NVML GPU memory, and the log follower."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil

from common.gpu import GpuReader
from common.jsonfile import read_dict
from common.maintenance import mark_status, owner_alive
from common.replicas import BALANCER_ALIVE_PATH
from common.supervisor_client import SupervisorClient, SupervisorUnavailable
from monitor.logwatch import LogFollower
from monitor.samples import HttpResult, Sample

log = logging.getLogger("monitor.probes")


def http_get(client: httpx.Client, url: str, timeout: float) -> HttpResult:
    started = time.perf_counter()
    try:
        response = client.get(url, timeout=timeout)
    except httpx.TimeoutException:
        return HttpResult(ok=False, latency_s=time.perf_counter() - started, error="timeout")
    except httpx.ConnectError:
        return HttpResult(ok=False, latency_s=time.perf_counter() - started, error="refused")
    except httpx.HTTPError as exc:
        return HttpResult(ok=False, latency_s=time.perf_counter() - started, error=exc.__class__.__name__)
    try:
        body = response.json()
    except ValueError:
        body = None
    return HttpResult(
        ok=response.status_code == 200,
        status=response.status_code,
        latency_s=time.perf_counter() - started,
        error=None if response.status_code == 200 else f"HTTP {response.status_code}",
        body=body if isinstance(body, dict) else None,
    )


def first_stopped(tree: list[psutil.Process]) -> Optional[int]:
    """The pid of the first process of `tree` in state T (the root first), or None."""
    for proc in tree:
        try:
            if proc.status() == psutil.STATUS_STOPPED:
                return proc.pid
        except psutil.Error:  # gone since the tree was listed
            continue
    return None


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


class Probes:
    def __init__(
        self,
        app_url: str,
        supervisor: SupervisorClient,
        program: str,
        gpu: GpuReader,
        follower: Optional[LogFollower],
        timeout_s: float,
        maintenance_file: Optional[Path] = None,
        chaos_file: Optional[Path] = None,
        peer_urls: tuple[str, ...] = (),
        stall_marker: Optional[Path] = None,
        balancer: Optional[tuple[str, str]] = None,
    ):
        self.app_url = app_url.rstrip("/")
        self.supervisor = supervisor
        self.program = program
        self.gpu = gpu
        self.follower = follower
        self.timeout_s = timeout_s
        self.maintenance_file = maintenance_file
        self.chaos_file = chaos_file  # only set when fault injection is enabled in the config
        self.peer_urls = tuple(u.rstrip("/") for u in peer_urls)  # the other replicas (rolling heal)
        # A fresh connection per probe: a keep-alive socket to a stopped process would hide a hang.
        self.http = httpx.Client(headers={"connection": "close"})
        self.latencies: dict[str, float] = {}
        self._voided_mark: Optional[float] = None  # the `until` of the last mark voided (told once)
        self.stall_marker = stall_marker
        self.balancer = balancer  # (public URL, supervisord program): replica 0's monitor only
        self.stalled_before = read_dict(stall_marker) if stall_marker else None

    def sample(self, now: float, wall: float) -> Sample:
        chaos = self._chaos() or {}
        if chaos.get("probe_stall_pid") == os.getpid():
            time.sleep(86400)  # fault injection: a probe that never returns, as into a wedged driver
        if chaos.get("tick_fail_pid") == os.getpid():  # fault injection: a bug met on every turn
            raise RuntimeError("every sample fails (injected fault: zimagectl chaos monitor-fail)")
        s = Sample(now=now, wall=wall, monitor_stalled=self.stalled_before)
        t0 = time.perf_counter()
        try:
            info = self.supervisor.process(self.program)
            s.program_state, s.pid, s.uptime_s = info.state, info.pid, float(info.uptime_s)
        except SupervisorUnavailable as exc:
            s.supervisor_ok = False
            log.debug("supervisord unavailable", extra={"error": str(exc)})
        except Exception as exc:  # a Fault (unknown program name): say so, keep probing the rest
            s.supervisor_ok = False
            log.warning("supervisord query failed", extra={"event": "probe_error", "error": str(exc)[:200]})
        self.latencies["supervisor"] = time.perf_counter() - t0

        if s.pid:
            tree = process_tree(s.pid)
            try:
                s.process_status = tree[0].status() if tree else None
            except psutil.Error:
                s.process_status = None
            # A stopped rank leaves the app answering while any generation would wait on it for
            # good: the whole tree counts (an idle group showed nothing until a request stalled).
            s.stopped_pid = first_stopped(tree)
            rss = 0
            for proc in tree:
                try:
                    rss += proc.memory_info().rss
                except psutil.Error:
                    pass
            s.rss_bytes = rss if tree else None
            pids = {p.pid for p in tree}
        else:
            pids = set()

        if s.process_status != "stopped":
            s.live = http_get(self.http, self.app_url + "/healthz", self.timeout_s)
            self.latencies["live"] = s.live.latency_s
            if s.live.ok:
                s.ready = http_get(self.http, self.app_url + "/readyz", self.timeout_s)
                self.latencies["ready"] = s.ready.latency_s
        # A stopped process (state T) is not probed: the probe would only burn its timeout, and a
        # pause is not a failed probe (detectors.detect_hang times the stop itself).

        t0 = time.perf_counter()
        if self.gpu.available:
            try:
                devices = self.gpu.sample()
                if devices:
                    d = devices[0]
                    s.gpu_used_bytes, s.gpu_total_bytes, s.gpu_name = d.used_bytes, d.total_bytes, d.name
                    if d.process_used_bytes:
                        s.gpu_app_bytes = sum(v for pid, v in d.process_used_bytes.items() if pid in pids)
            except Exception as exc:  # NVML hiccup: this tick has no GPU reading, next one may
                log.warning("NVML read failed", extra={"event": "probe_error", "error": str(exc)[:200]})
        self.latencies["gpu"] = time.perf_counter() - t0

        if self.follower is not None:
            s.log_events = self.follower.poll()
            s.log_position = self.follower.position
        if self.peer_urls:
            s.peers_total = len(self.peer_urls)
            s.peers_ready = self.peers_ready()
        if self.balancer is not None:
            url, program = self.balancer
            s.balancer_live = http_get(self.http, url + BALANCER_ALIVE_PATH, self.timeout_s)
            try:
                s.balancer_state = self.supervisor.process(program).state
            except Exception:  # supervisord down (its own finding) or no such program
                s.balancer_state = None
        return s

    def peers_ready(self) -> int:
        """How many of the other replicas answer /readyz 200 now (a short timeout: a stopped peer
        must not slow this replica's own watch)."""
        timeout = min(self.timeout_s, 0.5)
        return sum(1 for url in self.peer_urls if http_get(self.http, url + "/readyz", timeout).ok)

    def maintenance(self, wall: float) -> Optional[dict]:
        """An operator's maintenance window (zimagectl restart/down): observe, but do not heal. A
        mark whose writer is gone is void (common/maintenance.py): said once, then ignored."""
        data = read_dict(self.maintenance_file) if self.maintenance_file else None
        if data is None:
            return None
        in_force, why = mark_status(data, wall, owner_alive)
        if why == "owner gone" and self._voided_mark != data.get("until"):
            self._voided_mark = data.get("until")
            log.warning(
                "maintenance mark void: the command that set it is gone",
                extra={
                    "event": "maintenance_void",
                    "reason": str(data.get("reason"))[:80],
                    "owner_pid": (data.get("owner") or {}).get("pid"),
                    "seconds_left": round(data["until"] - wall, 1),
                },
            )
        return data if in_force else None

    def ack_stalled(self) -> None:
        """The stall of the monitor before is in the journal now (an incident): its marker can go."""
        if self.stalled_before is not None and self.stall_marker is not None:
            self.stall_marker.unlink(missing_ok=True)
        self.stalled_before = None

    def _chaos(self) -> Optional[dict]:
        """run/chaos.json, only with fault injection enabled (chaos_file is None otherwise)."""
        return read_dict(self.chaos_file) if self.chaos_file else None

    def receiver_down_until(self, wall: float) -> Optional[float]:
        """`zimagectl chaos receiver-down` (fault injection only): until when alerts cannot be delivered."""
        chaos = self._chaos()
        if chaos is None:
            return None
        try:
            return float(chaos.get("receiver_down_until", 0))
        except (TypeError, ValueError):
            return None

    def close(self) -> None:
        self.http.close()
