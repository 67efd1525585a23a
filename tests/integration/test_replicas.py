"""Two replicas of the tiny model behind a real HAProxy, under a real supervisord with one monitor
per replica: a replica killed, hung or restarted under load costs the clients nothing, and the
pool never has both replicas out at once; a wedged or killed HAProxy is paged or restarted without
touching the replicas."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from ops.load import LoadGenerator
from ops.tempstack import StackHome, wait_for
from tests.helpers import post_and_leave

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")), reason="no haproxy"
    ),
]
BODY = {"prompt": "replicas: a red fox in snow", "width": 128, "height": 128, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = StackHome(
        tmp_path_factory.mktemp("replicas"),
        replicas=2,
        app={"fault_injection": True, "queue_size": 8},
        monitor={"hang_stopped_s": 2.0, "restart_budget": 20},
    )
    try:
        s.up()
        yield s
    finally:
        s.stop()


class PoolWatch:
    """HAProxy's view of the replicas every 100 ms, from its stats on loopback."""

    def __init__(self, stack: StackHome):
        self.stack = stack
        self.samples: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(pool_states(self.stack))
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def both_out(self) -> list[dict]:
        return [s for s in self.samples if s and not any(v.startswith("UP") for v in s.values())]

    def saw_out(self, label: str) -> bool:
        return any(not s.get(label, "UP").startswith("UP") for s in self.samples)


def stack_stats_port(stack: StackHome) -> int:
    text = (stack.home / "zimage.toml").read_text()
    return int(text.split("balancer_stats_port = ")[1].split()[0])


def pool_states(stack: StackHome) -> dict[str, str]:
    """HAProxy's view of each replica ("UP", "DOWN 1/2", ...), from its stats CSV on loopback."""
    rows = httpx.get(f"http://127.0.0.1:{stack_stats_port(stack)}/stats;csv", timeout=1).text.splitlines()
    states = {}
    for row in rows[1:]:
        cells = row.split(",")
        if cells[0] == "replicas" and cells[1].startswith("app-"):
            states[cells[1]] = cells[17]
    return states


def pid_of(stack: StackHome, index: int) -> int:
    return stack.pid(f"app:app-{index}")


def all_ready(stack: StackHome) -> bool:
    """Both apps ready, and both back in HAProxy's pool (its checks rise after the app is ready: a
    test that starts in between sees one replica out before its fault, and both out after it)."""
    if not all(httpx.get(stack.replica_url(i) + "/readyz", timeout=1).status_code == 200 for i in range(2)):
        return False
    states = pool_states(stack)
    return len(states) == 2 and all(s.startswith("UP") for s in states.values())


def under_load(stack: StackHome, fault, settle_s: float = 4.0, body: dict = BODY) -> dict:
    """Four clients through the balancer while `fault` runs; returns the load's buckets."""
    gen = LoadGenerator(stack.url, concurrency=4, body=body, deadline_s=60).start()
    time.sleep(1.5)
    fault()
    time.sleep(settle_s)
    stats = gen.stop().summary()
    assert stats["ok"] > 0, stats
    return stats


def assert_no_client_visible_errors(stats: dict, stack: StackHome) -> None:
    bad = {k: stats[k] for k in ("refused", "reset", "lost", "server_errors", "unclear") if stats[k]}
    statuses = {int(k): v for k, v in stats["statuses"].items() if int(k) != 200}
    # (HAProxy logs each abnormal session with its termination state: what tells a reset's cause)
    haproxy = stack.log("haproxy")[-6000:]
    assert not bad and set(statuses) <= {503}, f"{stats}\n--- haproxy ---\n{haproxy}\n{stack.logs()[-3000:]}"


def test_the_balancer_spreads_requests_and_status_shows_each_replica(stack):
    served = set()
    for _ in range(6):
        r = httpx.post(stack.url + "/api/generate", json=BODY, timeout=30)
        assert r.status_code == 200, r.text
        served.add(r.headers.get("set-cookie", "").split(";")[0])
    assert served == {"zimage_replica=app-0", "zimage_replica=app-1"}
    out = stack.ctl("status").stdout
    assert "app-0" in out and "app-1" in out and out.count("balancer=UP") == 2, out


def test_admin_routes_are_refused_at_the_balancer(stack):
    r = httpx.post(stack.url + "/admin/free-cache", headers=stack.admin_headers(), timeout=5)
    assert r.status_code == 403
    # each replica still takes them directly (the monitor's lever)
    assert httpx.post(
        stack.replica_url(0) + "/admin/free-cache", headers=stack.admin_headers(), timeout=5
    ).is_success


def test_a_replica_killed_under_load_costs_the_clients_nothing(stack):
    old = pid_of(stack, 0)
    with PoolWatch(stack) as watch:
        stats = under_load(stack, lambda: os.kill(old, signal.SIGKILL), settle_s=6)
        wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready again")
    assert pid_of(stack, 0) != old
    assert_no_client_visible_errors(stats, stack)
    assert watch.saw_out("app-0") and not watch.both_out(), stack.log("haproxy")[-5000:]


def test_a_replica_killed_as_it_answers_costs_the_clients_nothing(stack):
    """The worst moment to be killed: the server has the head of a generation's answer and not yet
    its body (the fault hook SIGKILLs the app there). A head alone would reach the client and could
    not be retried (CI once saw "peer closed connection without sending complete message body"); the
    answer leaves whole or not at all (app.web.whole_answer), so HAProxy sees an empty answer and
    sends the request again to the other replica."""
    wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready")
    old = pid_of(stack, 0)

    def die_answering():
        r = httpx.post(
            stack.replica_url(0) + "/admin/fault",
            json={"kind": "die_answering"},
            headers=stack.admin_headers(),
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["die_answering_pending"] == 1, r.text

    stats = under_load(stack, die_answering, settle_s=6)
    wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready again")
    assert pid_of(stack, 0) != old, "replica 0 answered no generation after the fault was set"
    assert_no_client_visible_errors(stats, stack)
    assert "+1" in stack.log("haproxy"), "no request was sent again"  # HAProxy logs a retried session


def image_to_image_body() -> dict:
    """An image-to-image request of ~330 KB (its base64 noise image): far over HAProxy's default
    16 KiB buffer, which is the largest request it can retry."""
    noise = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return {**BODY, "init_image": base64.b64encode(buffer.getvalue()).decode(), "strength": 0.5}


def test_a_replica_killed_under_image_to_image_load_costs_the_clients_nothing(stack):
    """The requests that were on the killed replica are retried on the other one, big bodies too."""
    body = image_to_image_body()
    assert len(json.dumps(body)) > 300_000
    old = pid_of(stack, 1)
    with PoolWatch(stack):
        stats = under_load(stack, lambda: os.kill(old, signal.SIGKILL), settle_s=6, body=body)
        wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready again")
    assert pid_of(stack, 1) != old
    assert_no_client_visible_errors(stats, stack)


def test_a_hung_replica_is_healed_by_its_monitor_while_the_other_serves(stack):
    old = pid_of(stack, 1)
    with PoolWatch(stack) as watch:
        stats = under_load(stack, lambda: os.kill(old, signal.SIGSTOP), settle_s=12)
        wait_for(
            lambda: pid_of(stack, 1) not in (0, old) and all_ready(stack),
            stack.within(60),
            0.2,
            "app-1 replaced",
        )
    assert_no_client_visible_errors(stats, stack)
    assert watch.saw_out("app-1") and not watch.both_out()
    assert '"kind": "hang"' in stack.log("monitor-1") and "app:app-1" in stack.log("monitor-1")


def test_a_rolling_restart_under_load_takes_one_replica_at_a_time(stack):
    olds = [pid_of(stack, 0), pid_of(stack, 1)]
    gen = LoadGenerator(stack.url, concurrency=4, body=BODY, deadline_s=60).start()
    with PoolWatch(stack) as watch:
        time.sleep(1)
        result = stack.ctl("restart", "--timeout", "120")
        time.sleep(1)
    stats = gen.stop().summary()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "app-0: back in the pool" in result.stdout and "app-1: back in the pool" in result.stdout
    assert [pid_of(stack, 0), pid_of(stack, 1)] != olds and 0 not in (pid_of(stack, 0), pid_of(stack, 1))
    assert_no_client_visible_errors(stats, stack)
    assert watch.saw_out("app-0") and watch.saw_out("app-1") and not watch.both_out()
    # and no monitor took the planned stops for an incident
    assert "incident_open" not in stack.log("monitor-0").split("restart budget reset")[-1]


def test_restart_of_one_replica_by_name(stack):
    olds = [pid_of(stack, 0), pid_of(stack, 1)]
    result = stack.ctl("restart", "app:1", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    assert pid_of(stack, 0) == olds[0] and pid_of(stack, 1) not in (0, olds[1])
    assert stack.ctl("restart", "app:7").returncode == 2


def test_an_oom_in_one_replica_is_retried_on_the_other_and_healed(stack):
    old = pid_of(stack, 0)

    def oom():
        r = httpx.post(
            stack.replica_url(0) + "/admin/fault",
            json={"kind": "oom", "count": 1},
            headers=stack.admin_headers(),
            timeout=5,
        )
        assert r.status_code == 200, r.text

    with PoolWatch(stack) as watch:
        stats = under_load(stack, oom, settle_s=8)
        wait_for(
            lambda: pid_of(stack, 0) not in (0, old) and all_ready(stack),
            stack.within(90),
            0.2,
            "app-0 restarted",
        )
    assert_no_client_visible_errors(stats, stack)
    assert not watch.both_out()
    assert '"kind": "oom_in_log"' in stack.log("monitor-0")


def test_a_client_that_leaves_frees_its_replica(stack):
    """option abortonclose: HAProxy passes a client's close on to the replica, which drops the job
    (without it, the replica made the images for nobody and logged a 200)."""

    def slow(seconds: float) -> None:
        for index in range(2):
            r = httpx.post(
                stack.replica_url(index) + "/admin/fault",
                json={"kind": "slow" if seconds else "clear", "seconds": seconds},
                headers=stack.admin_headers(),
                timeout=5,
            )
            assert r.status_code == 200, r.text

    def gone() -> list:
        return [line for line in stack.logs().splitlines() if '"event": "client_gone"' in line]

    before = len(gone())
    slow(2.0)
    try:
        post_and_leave(stack.port, {**BODY, "width": 192, "height": 192}, stay_s=0.5)
        wait_for(lambda: len(gone()) > before, 10, 0.1, "the replica told that the client left")
        time.sleep(2 * 2.0 + 1)  # the two slow steps it would have run
    finally:
        slow(0)
    made = [line for line in stack.logs().splitlines() if '"generated"' in line and '"width": 192,' in line]
    assert made == [], made


def test_jobs_are_followed_through_the_balancer_without_a_cookie(stack):
    """A job lives in the replica that took it; its id routes every later call there."""
    wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready")
    ids: list[str] = []
    for _ in range(20):  # one at a time, until both replicas took some (the balancer decides which)
        r = httpx.post(stack.url + "/api/jobs", json=BODY, timeout=10)
        assert r.status_code == 202, (r.status_code, r.text)
        job_id = r.json()["job_id"]
        ids.append(job_id)
        wait_for(
            lambda: httpx.get(f"{stack.url}/api/jobs/{job_id}", timeout=5).json()["state"] == "done",
            60,
            0.1,
            f"job {job_id} done",
        )
        if {i.split("-")[0] for i in ids} == {"r0", "r1"}:
            break
    assert {i.split("-")[0] for i in ids} == {"r0", "r1"}, ids
    for job_id in ids:  # each still answers through the balancer, from the replica that holds it
        assert httpx.get(f"{stack.url}/api/jobs/{job_id}", timeout=5).json()["state"] == "done"


def test_a_burst_of_jobs_fills_both_replicas_before_any_is_refused(stack):
    """POST /api/jobs answers at once, so leastconn sees two idle replicas; a replica whose queue is
    full answers 503 and HAProxy retries on the other. Once per-replica capacity (1 running + 8
    queued) is passed, the overflow lands on the other replica; what is refused is refused clearly.
    One client with the sticky cookie: a full replica still hands the request over."""
    from concurrent.futures import ThreadPoolExecutor

    wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready")
    body = {**BODY, "width": 256, "height": 256, "num_inference_steps": 8}
    with httpx.Client(cookies={"zimage_replica": "app-0"}) as client:

        def post(_):
            r = client.post(stack.url + "/api/jobs", json=body, timeout=30)
            return r.status_code, r.json(), r.headers

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(post, range(24)))
    accepted = [data["job_id"][:3] for status, data, _ in results if status == 202]
    refused = [(data, headers) for status, data, headers in results if status != 202]
    assert {"r0-", "r1-"} <= set(accepted) and len(accepted) > 9, accepted
    assert all(d.get("error") == "queue_full" and "retry-after" in h for d, h in refused), refused


def test_a_wedged_balancer_is_paged_once_for_the_pool_and_resolves(stack):
    """Every replica healthy, and no client gets through: HAProxy stopped (SIGSTOP to its group: the
    master and its worker). No replica's own probes see that; replica 0's monitor probes the public
    port and pages balancer_down, once for the pool, and resolves it when HAProxy answers again.
    Nothing is restarted: dropping the connections in flight is the operator's call."""
    wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready")
    pids = [pid_of(stack, 0), pid_of(stack, 1)]
    seen = [len(stack.log("monitor-0")), len(stack.log("monitor-1"))]
    group = os.getpgid(stack.pid("haproxy"))
    os.killpg(group, signal.SIGSTOP)
    try:
        wait_for(
            lambda: '"kind": "balancer_down"' in stack.log("monitor-0")[seen[0] :], 30, 0.2, "balancer_down"
        )
    finally:
        os.killpg(group, signal.SIGCONT)
    opened = [line for line in stack.log("monitor-0")[seen[0] :].splitlines() if "incident opened" in line]
    assert any("the balancer has not answered" in line for line in opened), opened
    wait_for(
        lambda: any(
            '"event": "incident_resolved"' in line and "balancer_down" in line
            for line in stack.log("monitor-0")[seen[0] :].splitlines()
        ),
        30,
        0.2,
        "balancer_down resolved",
    )
    assert "balancer_down" not in stack.log("monitor-1")[seen[1] :]  # paged once, not per replica
    assert [pid_of(stack, 0), pid_of(stack, 1)] == pids
    assert httpx.get(stack.url + "/healthz", timeout=5).status_code == 200
    assert httpx.get(stack.url + "/balancer/alive", timeout=5).status_code == 200  # HAProxy's own


@pytest.mark.parametrize("process", ["master", "worker"])
def test_a_killed_balancer_is_back_within_seconds_and_the_replicas_are_untouched(stack, process):
    """HAProxy SIGKILLed: its master, or its one worker (the master then exits too: exit-on-failure).
    supervisord starts it again (autorestart), no old worker is left holding the public port, the
    port answers again within seconds, and no replica was restarted for it."""
    wait_for(lambda: all_ready(stack), stack.within(60), 0.2, "both replicas ready")
    pids = [pid_of(stack, 0), pid_of(stack, 1)]
    master = stack.pid("haproxy")
    [worker] = psutil.Process(master).children()

    def back() -> bool:
        try:
            alive = httpx.get(stack.url + "/balancer/alive", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
        return alive and stack.pid("haproxy") not in (0, master)

    os.kill(master if process == "master" else worker.pid, signal.SIGKILL)
    wait_for(back, 15, 0.05, "HAProxy restarted by supervisord")
    assert not psutil.pid_exists(worker.pid) or psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE
    assert httpx.post(stack.url + "/api/generate", json=BODY, timeout=60).status_code == 200
    assert [pid_of(stack, 0), pid_of(stack, 1)] == pids
