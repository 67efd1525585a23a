"""The operator's maintenance mark: held while its writer runs and until its deadline; void at once
when the writer is gone (a `zimagectl restart` killed with its terminal); kept to its deadline when
the monitor cannot tell (another pid namespace, an old mark without an owner)."""

import json
import os
import subprocess
import sys
import time

from common.jsonfile import read_dict as read_mark
from common.maintenance import mark_status, owner_alive, this_process, write_mark


def test_a_mark_holds_while_its_writer_runs_and_until_its_deadline(tmp_path):
    path = tmp_path / "run" / "maintenance"
    write_mark(path, 60, "zimagectl restart", now=1000.0)
    data = read_mark(path)
    assert data["reason"] == "zimagectl restart" and data["owner"]["pid"] == os.getpid()
    assert mark_status(data, 1059.0, owner_alive) == (True, "in force")
    assert mark_status(data, 1060.0, owner_alive) == (False, "expired")
    assert [p.name for p in path.parent.iterdir()] == ["maintenance"]  # no temp file left


def test_the_mark_of_a_command_that_died_is_void_at_once(tmp_path):
    path = tmp_path / "maintenance"
    code = (
        "import sys; from pathlib import Path; from common.maintenance import write_mark; "
        "write_mark(Path(sys.argv[1]), 900, 'zimagectl restart')"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=os.getcwd())
    data = read_mark(path)
    assert data["until"] > time.time() + 800  # far from its deadline
    assert owner_alive(data["owner"]) is False
    assert mark_status(data, time.time(), owner_alive) == (False, "owner gone")


def test_a_reused_pid_is_not_the_writer(tmp_path):
    me = this_process()
    assert owner_alive(me) is True
    assert owner_alive({**me, "started": me["started"] - 3600}) is False


def test_when_the_monitor_cannot_tell_the_deadline_holds(tmp_path):
    me = this_process()
    elsewhere = {**me, "pidns": "pid:[1]"}  # written in another pid namespace (a container)
    assert owner_alive(elsewhere) is None
    assert owner_alive(None) is None and owner_alive({"pid": "7"}) is None
    assert owner_alive({**me, "started": None}) is None
    # Another user's process may be hidden from this one (/proc with hidepid); root sees them all.
    assert owner_alive({**me, "uid": os.getuid() + 1}) is (True if os.getuid() == 0 else None)
    old_mark = {"until": 2000.0, "reason": "zimagectl down"}  # written before marks had owners
    assert mark_status(old_mark, 1999.0, owner_alive) == (True, "in force")
    assert mark_status({**old_mark, "owner": elsewhere}, 1999.0, owner_alive) == (True, "in force")


def test_a_mark_that_cannot_be_read_is_no_mark(tmp_path):
    path = tmp_path / "maintenance"
    assert read_mark(path) is None
    path.write_text("{half")
    assert read_mark(path) is None
    path.write_text(json.dumps([1, 2]))
    assert read_mark(path) is None
    assert mark_status({"until": "soon"}, 0.0, owner_alive) == (False, "unreadable")
