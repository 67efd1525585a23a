"""The running stack as an operator sees it: where its files are, how to reach supervisord and the
app, and the waits `zimagectl` needs (each with a deadline)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from app.config import AppSettings, load_settings
from common.configfile import home_dir
from common.maintenance import write_mark
from common.replicas import REPLICAS_ENV, Replica, layout, replica_count
from common.supervisor_client import SupervisorClient, SupervisorUnavailable
from common.tokenfile import bearer_headers, read_token
from monitor.config import MonitorSettings, for_replica, load_monitor_settings


@dataclass
class Stack:
    home: Path
    app: AppSettings
    monitor: MonitorSettings

    @classmethod
    def load(cls, env=None) -> "Stack":
        env = os.environ if env is None else env
        return cls(home=home_dir(env), app=load_settings(env), monitor=load_monitor_settings(env))

    @property
    def replicas(self) -> list[Replica]:
        return layout(replica_count(self.app.replicas), self.app.port, self.app.replica_base_port)

    @property
    def replicated(self) -> bool:
        return len(self.replicas) > 1

    @property
    def conf(self) -> Path:
        name = "supervisord-replicas.conf" if self.replicated else "supervisord.conf"
        return self.home / "supervisor" / name

    def programs(self) -> list[str]:
        """supervisord's process names (getAllProcessInfo's `name`), balancer first."""
        if not self.replicated:
            return ["app", "monitor"]
        n = len(self.replicas)
        return ["haproxy"] + [f"app-{i}" for i in range(n)] + [f"monitor-{i}" for i in range(n)]

    def replica_url(self, replica: Replica) -> str:
        host = self.app.local_url.rsplit(":", 1)[0]
        return f"{host}:{replica.port}"

    def monitor_for(self, replica: Replica) -> MonitorSettings:
        return self.monitor if replica.index is None else for_replica(self.monitor, replica)

    @property
    def app_url(self) -> str:
        return self.monitor.app_url or self.app.local_url

    def supervisor(self, timeout: float = 5.0) -> SupervisorClient:
        return SupervisorClient(self.monitor.supervisor_socket, timeout)

    def admin_headers(self) -> dict:
        return bearer_headers(self.app.admin_token or read_token(self.app.admin_token_file))

    def supervisord_bin(self) -> str:
        candidate = Path(sys.executable).parent / "supervisord"
        return str(candidate) if candidate.exists() else "supervisord"

    def start_supervisord(self) -> None:
        for sub in ("run", "logs"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, ZIMAGE_HOME=str(self.home), **{REPLICAS_ENV: str(len(self.replicas))})
        # HAProxy is a Debian package in /usr/sbin, which a user's PATH may lack.
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"])
        if self.replicated:
            from ops.balancer import write_config

            write_config(self)
        # supervisord daemonizes itself (nodaemon is off): this returns once it has forked.
        subprocess.run(
            [self.supervisord_bin(), "-c", str(self.conf)],
            check=True,
            env=env,
            cwd=self.home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )

    def set_maintenance(self, seconds: float, reason: str, replica: Optional[Replica] = None) -> None:
        """Tell the monitor(s) a stop or a pid change is planned: observe, do not heal. Every
        replica's monitor, or only `replica`'s."""
        for r in [replica] if replica else self.replicas:
            write_mark(self.monitor_for(r).maintenance_file, seconds, reason)

    def clear_maintenance(self, replica: Optional[Replica] = None) -> None:
        for r in [replica] if replica else self.replicas:
            self.monitor_for(r).maintenance_file.unlink(missing_ok=True)

    def readyz(self, timeout: float = 2.0, url: Optional[str] = None) -> Optional[dict]:
        try:
            r = httpx.get((url or self.app_url) + "/readyz", timeout=timeout)
            return {"status": r.status_code, **r.json()}
        except (httpx.HTTPError, ValueError):
            return None

    def healthz(self, timeout: float = 2.0, url: Optional[str] = None) -> Optional[dict]:
        try:
            return httpx.get((url or self.app_url) + "/healthz", timeout=timeout).json()
        except (httpx.HTTPError, ValueError):
            return None


def program_names(client: SupervisorClient) -> dict[str, str]:
    """Each process's name → the name XML-RPC takes ("app", or "app:app-0" in a group)."""
    try:
        return {p.name: p.full_name for p in client.processes()}
    except SupervisorUnavailable:
        return {}


def program_states(client: SupervisorClient) -> dict[str, str]:
    try:
        return {p.name: p.state for p in client.processes()}
    except SupervisorUnavailable:
        return {}
