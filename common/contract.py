"""What the monitor needs to know of the app's settings, read from the same [app] section without
importing app/ (the two processes share only common/), and the timeout chain both must respect."""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.configfile import REPO_ROOT, ConfigError, load_section, resolve_under
from common.replicas import Replica, layout, replica_count, replica_index

APP_PROGRAM_CONF = REPO_ROOT / "supervisor" / "app.conf"


class AppContract(BaseModel):
    """The [app] keys the monitor uses; every other key of the section is the app's business."""

    model_config = ConfigDict(extra="ignore")

    home: Path = Path(".")
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    api_token: Optional[str] = None
    admin_token: Optional[str] = None
    admin_token_file: Path = Path("run/admin.token")
    fault_injection: bool = False
    request_timeout_s: float = Field(120.0, gt=0)
    drain_timeout_s: float = Field(150.0, ge=0)
    replicas: Union[int, Literal["auto"]] = 1
    replica_base_port: int = Field(7870, ge=1, le=65535)
    replica: Optional[int] = None  # this process's replica (ZIMAGE_REPLICA), None in a single-app stack
    public_port: Optional[int] = None  # app.port as configured: the balancer's, once `port` is a replica's

    @field_validator("api_token", "admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value):
        return value or None

    @model_validator(mode="after")
    def _paths(self):
        self.admin_token_file = resolve_under(self.home, self.admin_token_file)
        return self

    def replica_set(self) -> list[Replica]:
        return layout(replica_count(self.replicas), self.port, self.replica_base_port)

    @property
    def local_url(self) -> str:
        """Where a process on this host reaches the app (a wildcard bind is reached on loopback)."""
        return f"http://{self._local_host}:{self.port}"

    @property
    def public_url(self) -> str:
        """Where a process on this host reaches the stack's public port (HAProxy's, with replicas)."""
        return f"http://{self._local_host}:{self.public_port or self.port}"

    @property
    def _local_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


def load_app_contract(env: Mapping[str, str] | None = None) -> AppContract:
    """The [app] keys; in a replica (ZIMAGE_REPLICA set) `port` is that replica's own."""
    env = os.environ if env is None else env
    contract = load_section(AppContract, "app", env)
    index = replica_index(env)
    contract.public_port = contract.port
    if index is not None:
        contract.replica, contract.port = index, contract.replica_base_port + index
    return contract


def supervisor_stopwaitsecs(conf: Path = APP_PROGRAM_CONF) -> Optional[float]:
    """The app program's stopwaitsecs in supervisor/app.conf (None when the file is not there)."""
    parser = configparser.RawConfigParser()
    if not parser.read(conf):
        return None
    for section in parser.sections():
        if section.startswith("program:") and parser.has_option(section, "stopwaitsecs"):
            return float(parser.get(section, "stopwaitsecs"))
    return None


def check_timeout_chain(
    request_timeout_s: float,
    drain_timeout_s: float,
    stopwaitsecs: Optional[float],
    monitor_stop_timeout_s: Optional[float] = None,
) -> None:
    """request_timeout_s ≤ drain_timeout_s < supervisord stopwaitsecs < monitor stop_timeout_s: a drain
    lets the longest request finish, supervisord lets the drain finish before its SIGKILL, and the
    monitor waits for supervisord. A bad mix is one ConfigError line naming the link that breaks."""
    links = [("app.request_timeout_s", request_timeout_s, "app.drain_timeout_s", drain_timeout_s, False)]
    if stopwaitsecs is not None:
        links.append(
            (
                "app.drain_timeout_s",
                drain_timeout_s,
                "supervisord stopwaitsecs (supervisor/app.conf)",
                stopwaitsecs,
                True,
            )
        )
        if monitor_stop_timeout_s is not None:
            links.append(
                (
                    "supervisord stopwaitsecs (supervisor/app.conf)",
                    stopwaitsecs,
                    "monitor.stop_timeout_s",
                    monitor_stop_timeout_s,
                    True,
                )
            )
    for low_name, low, high_name, high, strict in links:
        if low > high or (strict and low == high):
            sign = "<" if strict else "≤"
            raise ConfigError(
                f"invalid timeouts: {low_name} ({low:g} s) must be {sign} {high_name} ({high:g} s), "
                "or a stop cuts a generation short"
            )
