"""supervisord's XML-RPC interface over its unix socket, through supervisor's own transport, with a
timeout on every call (supervisor's transport has none: a wedged supervisord must not wedge us)."""

from __future__ import annotations

import socket
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection


class _TimeoutUnixConnection(UnixStreamHTTPConnection):
    def __init__(self, socketfile: str, timeout: float):
        super().__init__("localhost")
        self.socketfile = socketfile
        self._timeout = timeout

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self._timeout)
        self.sock.connect(self.socketfile)


class _TimeoutTransport(SupervisorTransport):
    def __init__(self, socket_path: str, timeout: float):
        super().__init__(None, None, "unix://" + socket_path)
        self._get_connection = lambda: _TimeoutUnixConnection(socket_path, timeout)


class SupervisorUnavailable(Exception):
    """supervisord does not answer on its socket (not started, or wedged)."""


@dataclass
class ProcessInfo:
    name: str
    state: str  # RUNNING, STARTING, STOPPED, BACKOFF, EXITED, FATAL, STOPPING, UNKNOWN
    pid: int
    start: int  # epoch seconds of the last start
    now: int
    exitstatus: int
    description: str
    group: str = ""

    @property
    def full_name(self) -> str:
        """The name XML-RPC takes: "app", or "app:app-0" for a process of a numprocs group."""
        return self.name if self.group in ("", self.name) else f"{self.group}:{self.name}"

    @property
    def uptime_s(self) -> int:
        return max(0, self.now - self.start) if self.state == "RUNNING" else 0


class SupervisorClient:
    def __init__(self, socket_path: Path, timeout: float = 5.0):
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _proxy(self):
        return xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=_TimeoutTransport(str(self.socket_path), self.timeout)
        )

    def _call(self, method: str, *args):
        try:
            target = self._proxy()
            for part in method.split("."):
                target = getattr(target, part)
            return target(*args)
        except xmlrpc.client.Fault:
            raise
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorUnavailable(f"supervisord not answering on {self.socket_path}: {exc}") from None

    def is_running(self) -> bool:
        try:
            return self._call("supervisor.getState")["statename"] == "RUNNING"
        except SupervisorUnavailable:
            return False

    def state(self) -> str:
        return self._call("supervisor.getState")["statename"]

    def pid(self) -> int:
        return self._call("supervisor.getPID")

    def identity(self) -> str:
        """ "pid:start time" of this supervisord: unique across restarts even where the pid repeats
        (PID 1 of a container). "" when it does not answer."""
        import psutil

        try:
            pid = self.pid()
            return f"{pid}:{psutil.Process(pid).create_time():.2f}"
        except (SupervisorUnavailable, psutil.Error):
            return ""

    @staticmethod
    def _info(raw: dict) -> ProcessInfo:
        return ProcessInfo(
            name=raw["name"],
            state=raw["statename"],
            pid=raw["pid"],
            start=raw["start"],
            now=raw["now"],
            exitstatus=raw["exitstatus"],
            description=raw["description"],
            group=raw.get("group", ""),
        )

    def process(self, name: str) -> ProcessInfo:
        return self._info(self._call("supervisor.getProcessInfo", name))

    def processes(self) -> list[ProcessInfo]:
        return [self._info(raw) for raw in self._call("supervisor.getAllProcessInfo")]

    def start(self, name: str, wait: bool = False) -> bool:
        try:
            return self._call("supervisor.startProcess", name, wait)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" in fault.faultString:
                return True
            raise

    def stop(self, name: str, wait: bool = True) -> bool:
        """Sends the program's stopsignal (TERM: the app drains) and, with wait, returns once stopped.
        The socket timeout must exceed stopwaitsecs for a waited stop; callers pass a client for that."""
        try:
            return self._call("supervisor.stopProcess", name, wait)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" in fault.faultString:
                return True
            raise

    def config(self, name: str) -> dict:
        """The program's settings as supervisord parsed them (stopsignal, stopwaitsecs, startsecs,
        log files and rotation, killasgroup, ...): what it will really do, not what a file says."""
        for entry in self._call("supervisor.getAllConfigInfo"):
            if entry["name"] == name:
                return entry
        raise KeyError(name)

    def signal(self, name: str, signal_name: str) -> bool:
        return self._call("supervisor.signalProcess", name, signal_name)

    def shutdown(self) -> bool:
        return self._call("supervisor.shutdown")
