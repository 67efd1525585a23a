"""The running stack as an operator sees it: where its files are, how to reach supervisord and the
app, and the waits `zimagectl` needs (each with a deadline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from app.config import AppSettings, load_settings
from common.configfile import home_dir
from common.supervisor_client import SupervisorClient, SupervisorUnavailable
from common.tokenfile import bearer_headers, read_token
from monitor.config import MonitorSettings, load_monitor_settings


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
    def conf(self) -> Path:
        return self.home / "supervisor" / "supervisord.conf"

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
        env = dict(os.environ, ZIMAGE_HOME=str(self.home))
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

    def set_maintenance(self, seconds: float, reason: str) -> None:
        path = self.monitor.maintenance_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"until": time.time() + seconds, "reason": reason}))

    def clear_maintenance(self) -> None:
        self.monitor.maintenance_file.unlink(missing_ok=True)

    def readyz(self, timeout: float = 2.0) -> Optional[dict]:
        try:
            r = httpx.get(self.app_url + "/readyz", timeout=timeout)
            return {"status": r.status_code, **r.json()}
        except (httpx.HTTPError, ValueError):
            return None

    def healthz(self, timeout: float = 2.0) -> Optional[dict]:
        try:
            return httpx.get(self.app_url + "/healthz", timeout=timeout).json()
        except (httpx.HTTPError, ValueError):
            return None


def program_states(client: SupervisorClient) -> dict[str, str]:
    try:
        return {p.name: p.state for p in client.processes()}
    except SupervisorUnavailable:
        return {}
