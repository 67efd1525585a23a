"""Jobs over real HTTP on the tiny model: every step in order on the event stream, cancel of a
queued and of a running job, queue positions under 8 clients, and history across a restart."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.helpers import AppProcess, wait_for

pytestmark = pytest.mark.integration
BODY = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_inference_steps": 6, "seed": 3}


@pytest.fixture(scope="module")
def app(start_app):
    return start_app("jobs", fault_injection="true", queue_size=16, min_size=64)


def slow_steps(app, seconds: float) -> None:
    if seconds:
        app.fault("slow", seconds=seconds)
    else:
        app.fault("clear")


def events(app, job_id: str, timeout: float = 60) -> list[tuple[str, dict]]:
    out = []
    with httpx.stream("GET", f"{app.url}/api/jobs/{job_id}/events", timeout=timeout) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def test_the_event_stream_shows_every_step_in_order_then_the_result(app):
    created = httpx.post(app.url + "/api/jobs", json=BODY, timeout=10)
    assert created.status_code == 202 and created.headers["location"].endswith(created.json()["job_id"])
    stream = events(app, created.json()["job_id"])
    names = [n for n, _ in stream]
    assert [d["step"] for n, d in stream if n == "step"] == [1, 2, 3, 4, 5, 6]
    assert names[-1] == "done" and names.index("step") < len(names) - 1
    result = stream[-1][1]["result"]
    assert result["seed"] == 3 and len(result["images"]) == 1
    png = httpx.get(app.url + result["images"][0]["url"], timeout=10)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    final = httpx.get(f"{app.url}/api/jobs/{created.json()['job_id']}").json()
    assert final["state"] == "done" and final["step"] == 6 and final["eta_s"] is None


def test_cancel_a_queued_job_and_a_running_one_and_the_engine_moves_on(app):
    slow_steps(app, 0.4)
    try:
        running = httpx.post(app.url + "/api/jobs", json={**BODY, "num_inference_steps": 20}).json()["job_id"]
        queued = httpx.post(app.url + "/api/jobs", json=BODY).json()["job_id"]
        wait_for(
            lambda: httpx.get(f"{app.url}/api/jobs/{running}").json()["step"] >= 1, 30, what="first step"
        )
        view = httpx.get(f"{app.url}/api/jobs/{queued}").json()
        assert view["state"] == "queued" and view["queue_position"] == 0 and view["eta_s"] > 0

        gone = httpx.delete(f"{app.url}/api/jobs/{queued}").json()
        assert gone["was"] == "queued" and gone["state"] == "cancelled" and gone["queue_position"] is None

        started = time.monotonic()
        stopped = httpx.delete(f"{app.url}/api/jobs/{running}", timeout=30).json()
        assert stopped["was"] == "running" and stopped["state"] == "cancelled"
        assert stopped["step"] < 20 and time.monotonic() - started < 0.4 * 3  # within about a step
        assert httpx.get(app.url + "/healthz").json()["heartbeat"]["busy"] is False
    finally:
        slow_steps(app, 0)
    nxt = httpx.post(app.url + "/api/jobs", json=BODY).json()["job_id"]
    assert events(app, nxt)[-1][0] == "done"  # the next job runs


def test_queue_positions_under_eight_concurrent_clients(app):
    """Eight clients post at once behind a long job: each gets its own place in line, and its ETA
    counts the steps of every job ahead of it and what the running one has left. (The long job in
    front keeps the line still while it is read: a slow machine must not see it move on.)"""
    queued_body = {**BODY, "num_inference_steps": 12}
    slow_steps(app, 0.2)
    try:
        long = httpx.post(app.url + "/api/jobs", json={**BODY, "num_inference_steps": 40}).json()["job_id"]
        wait_for(lambda: httpx.get(f"{app.url}/api/jobs/{long}").json()["state"] == "running", 30, what="run")
        with cf.ThreadPoolExecutor(8) as pool:
            created = list(
                pool.map(
                    lambda _: httpx.post(app.url + "/api/jobs", json=queued_body, timeout=10).json(), range(8)
                )
            )
        # A few slow steps first: the ETA comes from the measured step time, which must have settled.
        wait_for(lambda: httpx.get(f"{app.url}/api/jobs/{long}").json()["step"] >= 4, 30, what="steps")
        views = [httpx.get(f"{app.url}/api/jobs/{c['job_id']}").json() for c in created]
        front = httpx.get(f"{app.url}/api/jobs/{long}").json()
        assert front["state"] == "running" and front["step"] <= 30, front  # still in front: the line held
        assert all(v["state"] == "queued" for v in views), views
        queued = sorted(views, key=lambda v: v["queue_position"])
        assert [v["queue_position"] for v in queued] == list(range(8))
        # Every step is at least the injected 0.2 s: the first in line waits for what is left of the
        # long job (R ≤ 36 steps, ≥ 10) and its own 12; the last for R + 7 × 12 + 12, ≥ 2.75× the
        # first. Each read prices the steps at the step time measured then, which a busy machine
        # moves by tens of percent between reads: the ratio is checked, with room for that.
        etas = [v["eta_s"] for v in queued]
        assert etas[0] >= 0.9 * (10 + 12) * 0.2, etas
        assert etas[-1] > 1.5 * etas[0], etas
        assert httpx.delete(f"{app.url}/api/jobs/{long}", timeout=30).json()["state"] == "cancelled"
    finally:
        slow_steps(app, 0)
    for c in created:
        wait_for(
            lambda: httpx.get(f"{app.url}/api/jobs/{c['job_id']}").json()["state"] == "done", 60, what="done"
        )


def test_history_survives_a_restart_and_is_rebuilt_from_the_pngs(tmp_path):
    proc = AppProcess(tmp_path, warmup_size=128, warmup_steps=1, min_size=64).start().wait_ready()
    try:
        made = httpx.post(
            proc.url + "/api/generate", json={**BODY, "prompt": "remember me"}, timeout=60
        ).json()
        first = httpx.get(proc.url + "/api/history").json()["items"][0]
        assert first["request_id"] == made["request_id"] and first["parameters"]["prompt"] == "remember me"
    finally:
        proc.stop()
    for index_lost in (False, True):
        if index_lost:
            for f in tmp_path.glob("history.sqlite*"):
                f.unlink()
        proc = AppProcess(tmp_path, warmup_size=128, warmup_steps=1, min_size=64).start().wait_ready()
        try:
            items = httpx.get(proc.url + "/api/history?limit=5").json()["items"]
            assert [i["request_id"] for i in items] == [made["request_id"]], index_lost
            assert items[0]["parameters"]["seed"] == 3 and items[0]["images"] == [
                made["images"][0]["filename"]
            ]
        finally:
            proc.stop()
