"""A real supervisord with the repo's own config files, in a temp home, driven by zimagectl."""

import concurrent.futures as cf
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.config import load_settings
from common.supervisor_client import SupervisorClient
from ops import leftovers
from ops.tempstack import StackHome, wait_ready
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = StackHome(tmp_path_factory.mktemp("sup"), app={"fault_injection": True})
    try:
        s.up()
        yield s
    finally:
        s.stop()


def test_up_brings_app_and_monitor_running_over_a_private_socket(stack):
    out = stack.supervisorctl("status").stdout
    assert "app" in out and "monitor" in out and out.count("RUNNING") == 2, out
    sock = stack.home / "run" / "supervisor.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o700
    assert "inet_http_server" not in (stack.conf.read_text().replace(";[inet_http_server]", ""))
    assert stack.ready()
    status = stack.ctl("status")
    assert status.returncode == 0 and "engine=ready" in status.stdout and "budget" in status.stdout


def test_default_bind_is_loopback(stack):
    conns = psutil.Process(stack.pid()).net_connections(kind="inet")
    listening = [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)


def test_app_log_and_rotation_settings_are_what_supervisord_runs(stack):
    """Asked of the running supervisord (getAllConfigInfo), not grepped from our own file: what it
    parsed is what it will do at a stop, a crash and a full log."""
    assert '"event": "ready"' in stack.log("app")
    client = SupervisorClient(stack.home / "run" / "supervisor.sock")
    app, settings = client.config("app"), load_settings({"ZIMAGE_CONFIG": str(stack.home / "zimage.toml")})
    assert Path(app["stdout_logfile"]).resolve() == (stack.home / "logs" / "app.log").resolve()
    assert app["redirect_stderr"]
    assert app["stdout_logfile_maxbytes"] == 20 * 2**20 and app["stdout_logfile_backups"] == 5
    assert app["stopsignal"] == signal.SIGTERM and app["killasgroup"]
    assert app["startsecs"] == 10 and app["startretries"] == 3
    # the stop timeout outlasts a drain, which outlasts one generation
    assert app["stopwaitsecs"] > settings.drain_timeout_s >= settings.request_timeout_s
    monitor = client.config("monitor")
    assert Path(monitor["stdout_logfile"]).resolve().parent == (stack.home / "logs").resolve()


def test_killed_app_is_restarted_by_supervisord(stack):
    old = stack.pid()
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (p := stack.pid()) and p != old and p, 30, what="new app pid")
    wait_ready(stack)
    assert new != old


def while_a_request_runs(stack, step_s: float, steps: int, prompt: str, act):
    """A generation slowed to step_s a step, in flight while `act()` runs; returns its response and
    what act returned."""
    admin = stack.admin_headers()
    httpx.post(stack.url + "/admin/fault", json={"kind": "slow", "seconds": step_s}, headers=admin, timeout=5)
    body = {"prompt": prompt, "width": 128, "height": 128, "num_inference_steps": steps}
    with cf.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, stack.url + "/api/generate", json=body, timeout=60)
        wait_for(lambda: httpx.get(stack.url + "/healthz").json()["heartbeat"]["busy"], 10, 0.05, "busy")
        acted = act()
        return in_flight.result(60), acted


def test_restart_is_graceful_a_request_in_flight_completes(stack):
    old = stack.pid()
    response, result = while_a_request_runs(
        stack, 0.4, 8, "finish me first", lambda: stack.ctl("restart", "--timeout", "120")
    )
    assert response.status_code == 200, response.text
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warm-up ok" in result.stdout
    assert stack.pid() != old and stack.ready()
    # the monitor saw a planned restart, not an incident
    assert stack.restarts() == [] and stack.state()["unexpected_restarts_in_window"] <= 1


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_supervisord_takes_its_programs_along_and_up_starts_afresh(stack):
    """supervisord SIGKILLed under a request: the kernel tells its programs (their parent died). The app
    drains (the request in flight completes) and exits, the monitor exits; `zimagectl up`, run at
    once, waits for them and starts one fresh app and one monitor. Before, both ran on unsupervised:
    the new app could not bind the port, `up` said "ready" from the old one's /readyz, and two
    monitors healed one app through the new supervisord's socket."""
    wait_ready(stack)
    old_app, old_monitor = stack.pid(), stack.pid("monitor")

    def kill_supervisord_then_up():
        os.kill(stack.supervisord_pid(), signal.SIGKILL)
        return stack.ctl("up", "--timeout", "120")

    response, result = while_a_request_runs(
        stack, 0.5, 12, "outlive my supervisord", kill_supervisord_then_up
    )
    assert response.status_code == 200, response.text
    assert result.returncode == 0, result.stdout + result.stderr
    assert "supervisord is gone but" in result.stdout and "they have exited" in result.stdout, result.stdout
    assert not _alive(old_app) and not _alive(old_monitor)
    # Their pipes went with supervisord; they wrote their ends to their log files themselves.
    old_lines = [json.loads(line) for line in stack.log("app").splitlines() if f'"pid": {old_app},' in line]
    events = [line.get("event") for line in old_lines]
    assert "orphaned" in events and "drain_done" in events and "stopped" in events, events[-8:]
    assert f'"pid": {old_monitor}, "logger": "monitor", "msg": "supervisord is gone' in stack.log("monitor")
    ours = {p.pid for p in leftovers.find(stack.home)}  # every process a supervisord of this home runs
    assert ours == {stack.pid(), stack.pid("monitor")} and old_app not in ours, ours
    body = {"prompt": "served by the new set", "width": 128, "height": 128, "num_inference_steps": 2}
    assert httpx.post(stack.url + "/api/generate", json=body, timeout=60).status_code == 200


def test_after_a_killed_supervisord_status_names_what_is_left_and_down_waits_for_it(stack):
    wait_ready(stack)
    app = stack.pid()

    def kill_supervisord_then_status_and_down():
        os.kill(stack.supervisord_pid(), signal.SIGKILL)
        return stack.ctl("status"), stack.ctl("down")

    response, (status, down) = while_a_request_runs(
        stack, 0.5, 12, "still draining", kill_supervisord_then_status_and_down
    )
    assert "not running" in status.stdout and "left running by a supervisord that died" in status.stdout
    assert f"pid {app} " in status.stdout, status.stdout
    assert down.returncode == 0 and "they have exited" in down.stdout, down.stdout
    assert response.status_code == 200 and not _alive(app) and leftovers.find(stack.home) == []
    assert stack.ctl("up").returncode == 0  # (the module's stack, back for what follows)


def test_up_refuses_a_port_another_program_holds(tmp_path):
    s = StackHome(tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", s.port))
        held.listen()
        result = s.ctl("up", "--timeout", "30")
    assert result.returncode == 1 and f"port(s) [{s.port}] already in use" in result.stdout, result.stdout
    assert not (s.home / "run" / "supervisor.sock").exists()  # nothing was started


def test_down_leaves_no_process_behind(tmp_path):
    s = StackHome(tmp_path)
    try:
        s.up()
        sup = s.supervisord_pid()
        tree = [sup] + s.child_pids(sup)
        assert len(tree) >= 3
        started = time.monotonic()
        result = s.ctl("down")
        assert result.returncode == 0, result.stdout
        assert time.monotonic() - started < 60
        alive = [
            p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        assert alive == []
        assert not (s.home / "run" / "supervisor.sock").exists()
    finally:
        s.stop()
