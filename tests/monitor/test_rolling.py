"""The rolling heal, in the pure core and in the slot that serialises heals across monitors."""

import dataclasses
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from monitor import core
from monitor.policy import PolicyState, decide
from monitor.rolling import HealSlot
from tests.monitor.factories import cfg, sample
from tests.monitor.test_core import T0, C, Run
from tests.monitor.test_policy import finding


def with_peers(s, ready: int, total: int = 1):
    return dataclasses.replace(s, peers_ready=ready, peers_total=total)


def test_a_serving_replica_is_not_taken_down_while_a_peer_is_out():
    d = decide([finding(kind="leak", action="restart")], PolicyState(), 0, cfg(), serving=True, peers_down=1)
    assert d.action == "wait" and "rolling heal" in d.reason
    # once the peer is back, the same finding restarts it
    assert (
        decide([finding(kind="leak", action="restart")], PolicyState(), 0, cfg(), serving=True).action
        == "restart"
    )


def test_a_replica_that_does_not_serve_is_healed_at_once_whatever_its_peers():
    d = decide([finding()], PolicyState(), 0, cfg(), serving=False, peers_down=1)
    assert d.action == "kill"


def test_the_core_holds_a_restart_while_the_peer_is_down_and_acts_when_it_is_back():
    run = Run()
    leak = dict(live="unhealthy")  # the engine reports itself unhealthy but /readyz still says 200
    for t in range(3):
        run.observe(with_peers(sample(t, **leak), ready=0))
    assert run.actions == [] and "rolling heal" in run.state.last_decision["reason"]
    run.observe(with_peers(sample(3, **leak), ready=1))
    assert [a.action for a in run.actions] == ["restart"]


def test_a_deferred_action_gives_back_its_budget_and_is_decided_again():
    run = Run()
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    assert [a.action for a in run.actions] == ["kill"]
    left = run.state.policy.budget_left(T0 + 6, C)
    run.feed(core.ActionDone("kill", False, 0.0, detail="deferred: peer down", deferred=True), T0 + 6)
    assert run.state.pending is None and not run.state.expect_new_pid
    assert run.state.policy.budget_left(T0 + 6, C) == left + 1
    assert run.events("deferred") and run.alerts() == [("hang", "firing")]
    run.observe(sample(7, status="stopped"))
    assert [a.action for a in run.actions] == ["kill", "kill"]


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def _server(status: int) -> tuple[ThreadingHTTPServer, str]:
    handler = type("H", (_Ready,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_the_slot_refuses_to_take_down_the_last_serving_replica(tmp_path):
    me, me_url = _server(200)
    up, up_url = _server(200)
    down, down_url = _server(503)
    try:
        slot = HealSlot(tmp_path / "heal.lock", me_url, (up_url, down_url), wait_s=1)
        with slot.hold("restart", time.sleep) as refused:
            assert refused and down_url in refused
        with slot.hold("start", time.sleep) as refused:  # starting a stopped replica takes none down
            assert refused is None
        slot_ok = HealSlot(tmp_path / "heal.lock", me_url, (up_url,), wait_s=1)
        with slot_ok.hold("kill", time.sleep) as refused:
            assert refused is None
    finally:
        for s in (me, up, down):
            s.shutdown()


def test_one_heal_at_a_time_and_a_dead_holder_frees_the_slot(tmp_path):
    lock = tmp_path / "heal.lock"
    slot = HealSlot(lock, "http://127.0.0.1:1", (), wait_s=0.5)
    with slot.hold("restart", time.sleep) as first:
        assert first is None
        with HealSlot(lock, "http://127.0.0.1:1", (), wait_s=0.5).hold("restart", time.sleep) as second:
            assert second and "still runs" in second
    pid = os.fork()
    if pid == 0:  # a monitor that takes the slot and dies holding it
        import fcntl

        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os._exit(0)
    os.waitpid(pid, 0)
    with slot.hold("restart", time.sleep) as after:
        assert after is None
