"""A supervisord that dies takes its programs along (common/parent.py), and `zimagectl up` sees what
is left of it gone, and a port another program holds, before it starts (ops/leftovers.py). Real
processes; the whole path with a real supervisord is tests/integration/test_supervisor.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from common.parent import write_to_own_log
from ops import leftovers
from tests.helpers import wait_for

PY = sys.executable

# Writes a line when SIGTERM comes, then exits; says when its handler is on (ARG.ready); never exits
# by itself within the test.
ON_TERM = (
    "import signal, sys, time\n"
    "def on(*_):\n"
    "    open(sys.argv[1], 'w').write('terminated'); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, on)\n"
    "open(sys.argv[1] + '.ready', 'w').close()\n"
    "time.sleep(60)\n"
)


def test_the_program_gets_its_stop_signal_when_its_parent_dies(tmp_path):
    marker = tmp_path / "marker"
    # parent: starts the program through common.parent's exec path, says its pid, then waits
    parent = subprocess.Popen(
        [
            PY,
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([{PY!r}, '-m', 'common.parent', 'TERM', {PY!r}, '-c', {ON_TERM!r}, "
            f"{str(marker)!r}])\n"
            "print(p.pid, flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    program = int(parent.stdout.readline())
    wait_for((tmp_path / "marker.ready").exists, 30, 0.05, "the program past exec, its handler on")
    assert not marker.exists()
    parent.kill()
    parent.wait()
    wait_for(marker.exists, 15, 0.05, "the program told of its parent's death")
    assert marker.read_text() == "terminated"
    wait_for(lambda: not psutil.pid_exists(program) or _zombie(program), 10, 0.05, "the program gone")


def test_a_parent_gone_before_the_request_sends_the_signal_at_once():
    code = "import os, signal, time\nfrom common.parent import die_with_parent\n"
    code += "die_with_parent(signal.SIGTERM, parent=os.getppid() + 1)\ntime.sleep(30)\n"
    done = subprocess.run([PY, "-c", code], timeout=20)
    assert done.returncode == -signal.SIGTERM


def test_an_orphan_writes_its_last_words_to_its_log_file_once_its_pipe_is_gone(tmp_path):
    """The program's stdout is a pipe whose reader dies (as supervisord's does): once orphaned, it
    points stdout and stderr at ZIMAGE_LOG and what it says next is there; not orphaned, it is not."""
    log = tmp_path / "app.log"
    log.write_text("a line supervisord wrote\n")
    program = (
        "import os, signal, sys, time\n"
        "from common.parent import die_with_parent, orphaned, write_to_own_log\n"
        "signal.signal(signal.SIGTERM, lambda *_: None)\n"
        "die_with_parent(signal.SIGTERM)\n"
        "print('not orphaned yet', orphaned(), flush=True)\n"
        "while not orphaned(): time.sleep(0.05)\n"
        "assert write_to_own_log()\n"
        "print('last words', flush=True); print('and on stderr', file=sys.stderr, flush=True)\n"
    )
    # its parent: reads its stdout (the pipe), says the line it read, then dies
    parent = subprocess.Popen(
        [
            PY,
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([{PY!r}, '-c', {program!r}], stdout=subprocess.PIPE, text=True)\n"
            "print(p.pid, p.stdout.readline().strip(), flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "ZIMAGE_LOG": str(log)},
        text=True,
    )
    _, first = parent.stdout.readline().split(" ", 1)
    assert first.strip() == "not orphaned yet False"
    parent.kill()
    parent.wait()
    wait_for(lambda: "and on stderr" in log.read_text(), 15, 0.05, "the orphan's last words in its log")
    assert log.read_text() == "a line supervisord wrote\nlast words\nand on stderr\n"
    assert not write_to_own_log(env={})  # no ZIMAGE_LOG (not run by our supervisord): nothing to do


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _sleeper(env: dict, seconds: float = 60) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k not in ("SUPERVISOR_ENABLED", "ZIMAGE_HOME")}
    return subprocess.Popen(["sleep", str(seconds)], env={**base, **env}, start_new_session=True)


def test_left_over_processes_are_this_homes_supervisord_children_only(tmp_path):
    home, other = tmp_path / "home", tmp_path / "other"
    home.mkdir()
    other.mkdir()
    (tmp_path / "link").symlink_to(home)
    ours = _sleeper({"SUPERVISOR_ENABLED": "1", "ZIMAGE_HOME": str(home)})
    via_link = _sleeper({"SUPERVISOR_ENABLED": "1", "ZIMAGE_HOME": str(tmp_path / "link")})
    others = [
        _sleeper({"SUPERVISOR_ENABLED": "1", "ZIMAGE_HOME": str(other)}),  # another stack's
        _sleeper({"ZIMAGE_HOME": str(home)}),  # an operator's shell, not supervisord's
    ]
    try:
        found = {p.pid for p in leftovers.find(home)}
        assert found == {ours.pid, via_link.pid}
        assert "sleep 60" in leftovers.describe(leftovers.find(home))
    finally:
        for proc in [ours, via_link, *others]:
            proc.kill()
            proc.wait()


def test_up_waits_for_what_exits_and_kills_what_stays_past_the_bound(tmp_path):
    env = {"SUPERVISOR_ENABLED": "1", "ZIMAGE_HOME": str(tmp_path)}
    said: list[str] = []
    quick = _sleeper(env, 0.5)  # a drain that ends by itself
    leftovers.see_gone(tmp_path, 20, said.append)
    assert _zombie(quick.pid) and "waiting up to 20 s" in said[0] and said[-1] == "they have exited"

    said.clear()
    stuck = _sleeper(env)  # a drain that never ends: its group is killed after the bound
    started = time.monotonic()
    leftovers.see_gone(tmp_path, 1.0, said.append)
    # (psutil reaped it: its status is not Popen's to read)
    assert _zombie(stuck.pid) and time.monotonic() - started < 8
    assert said[-1].startswith("still running after 1 s, killed: pid")
    said.clear()
    leftovers.see_gone(tmp_path, 1.0, said.append)
    assert said == []  # nothing left: not a word


def test_a_port_held_by_another_program_is_told():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        assert leftovers.taken_ports("127.0.0.1", [port, free]) == [port]
    assert leftovers.taken_ports("127.0.0.1", [port]) == []
