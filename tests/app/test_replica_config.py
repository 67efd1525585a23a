"""The replica layout as each process reads it, the supervisor files of one app and of N kept in
step, and HAProxy's config as HAProxy itself parses it."""

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from app.config import load_settings
from common.contract import load_app_contract
from common.replicas import layout
from monitor.config import load_monitor_settings
from ops.balancer import render
from ops.stack import Stack

REPO = Path(__file__).resolve().parents[2]
SUPERVISOR = REPO / "supervisor"


def env_for(tmp_path, replica=None, **app):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[app]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in app.items()))
    env = {"ZIMAGE_CONFIG": str(cfg), "ZIMAGE_HOME": str(tmp_path)}
    if replica is not None:
        env["ZIMAGE_REPLICA"] = str(replica)
    return env


def test_one_replica_is_the_single_app_layout(tmp_path):
    (only,) = layout(1, 7860, 7870)
    assert (only.program, only.port, str(only.log), only.index) == ("app", 7860, "logs/app.log", None)
    env = env_for(tmp_path)
    assert load_settings(env).port == 7860 and load_monitor_settings(env).program == "app"


def test_each_replica_finds_its_port_program_log_and_files(tmp_path):
    env = env_for(tmp_path, replica=1, replicas=2, port=9000, replica_base_port=9100)
    assert load_settings(env).port == 9101 and load_app_contract(env).local_url.endswith(":9101")
    mon = load_monitor_settings(env)
    assert mon.program == "app:app-1" and mon.app_log == tmp_path / "logs" / "app-1.log"
    assert mon.journal_file == tmp_path / "run" / "replica-1" / "monitor-journal.json"
    assert mon.maintenance_file.parent == tmp_path / "run" / "replica-1"
    assert mon.service_name.endswith("/app-1") and not mon.watch_capacity and mon.balancer_url is None
    first = load_monitor_settings(env_for(tmp_path, replica=0, replicas=2, port=9000, host="0.0.0.0"))
    assert first.watch_capacity and first.balancer_url == "http://127.0.0.1:9000"  # HAProxy's port
    assert load_monitor_settings(env_for(tmp_path)).balancer_url is None  # one app: no balancer


def _program(path: Path) -> dict:
    parser = configparser.RawConfigParser()
    parser.read(path)
    (section,) = [s for s in parser.sections() if s.startswith("program:")]
    return dict(parser.items(section))


@pytest.mark.parametrize(
    "single, replicas", [("app.conf", "app-replicas.conf"), ("monitor.conf", "monitor-replicas.conf")]
)
def test_the_replica_programs_are_the_single_programs_in_a_group(single, replicas):
    one, many = _program(SUPERVISOR / single), _program(SUPERVISOR / replicas)
    differ = {k for k in one.keys() | many.keys() if one.get(k) != many.get(k)}
    # only what makes N of them: the count, the names, the replica's env and its own log
    assert differ == {"numprocs", "process_name", "environment", "stdout_logfile"}
    assert 'ZIMAGE_REPLICA="%(process_num)d"' in many["environment"]
    env_one, env_many = _env(one), _env(many)
    for program, env in ((one, env_one), (many, env_many)):
        # where the program writes itself once supervisord is gone (common/parent.py): its own log
        assert env.pop("ZIMAGE_LOG") == program["stdout_logfile"]
    assert list(env_many.items())[: len(env_one)] == list(env_one.items())


def _env(program: dict) -> dict:
    pairs = (item.split("=", 1) for item in program["environment"].split(","))
    return {key: value.strip('"') for key, value in pairs}


def test_both_supervisord_files_include_the_same_base():
    for name in ("supervisord.conf", "supervisord-replicas.conf"):
        parser = configparser.RawConfigParser()
        parser.read(SUPERVISOR / name)
        files = parser.get("include", "files").split()
        assert files[0] == "base.conf" and all((SUPERVISOR / f).is_file() for f in files)


@pytest.mark.skipif(not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")), reason="no haproxy")
def test_haproxy_accepts_the_generated_config(tmp_path):
    stack = Stack.load(env_for(tmp_path, replicas=3, port=9000, replica_base_port=9100))
    text = render(stack)
    for line in (
        "option httpchk GET /readyz",
        "retry-on conn-failure empty-response junk-response response-timeout 503",
        "option redispatch 1",
        "balance leastconn",
        "server app-2 127.0.0.1:9102",
        "use-server app-2 if { path_beg /api/jobs/r2- }",
        "bind 127.0.0.1:9000",
        "observe layer4 error-limit 1 on-error mark-down",
        "http-reuse never",  # a refused connection takes it out at once
        "http-error status 503 content-type application/json",  # HAProxy's own 503 in the app's shape
        "tune.bufsize 1064960",  # a 1 MiB JSON body (an image-to-image request) fits: retried too
        "option dontlog-normal",  # abnormal sessions only, with their termination state
    ):
        assert line in text
    (tmp_path / "run").mkdir()
    (tmp_path / "haproxy.cfg").write_text(text)
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
