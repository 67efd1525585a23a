"""A client that closes its connection before its images are ready (it gave up, its tab closed, a
balancer's timeout) gets its job dropped: a queued job never runs, a running one stops at its next
step, and the ones behind it do not wait for images nobody will read. The real app over real sockets,
its steps stretched by the slow fault so that each generation takes seconds."""

import json
import threading
import time

import httpx
import pytest

from tests.helpers import post_and_leave

pytestmark = pytest.mark.integration
STEP_S = 1.5  # each step of every generation, through the slow fault
STEPS = 2


@pytest.fixture(scope="module")
def app(start_app):
    return start_app("client-gone", fault_injection=True)


@pytest.fixture
def slow(app):
    app.fault("slow", seconds=STEP_S)
    yield
    app.fault("clear")


def body(size: int, prompt: str) -> dict:
    return {"prompt": prompt, "width": size, "height": size, "num_inference_steps": STEPS}


def post_in_background(app, request: dict, answers: dict, key: str) -> threading.Thread:
    def run():
        answers[key] = httpx.post(app.url + "/api/generate", json=request, timeout=120)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def generated(app, prompt_sizes: dict) -> set:
    """Which of the requests (by size) the log says were generated."""
    lines = [json.loads(line) for line in app.log().splitlines() if '"event": "generated"' in line]
    return {name for name, size in prompt_sizes.items() if any(e["width"] == size for e in lines)}


def access_lines(app, status: int) -> list:
    return [
        line
        for line in app.log().splitlines()
        if '"event": "http"' in line and '"/api/generate"' in line and f'"status": {status},' in line
    ]


def test_a_queued_job_whose_client_left_never_runs(app, slow):
    """A runs (3 s), B waits behind it and its client leaves, C waits behind B. Before, B's images
    were made for nobody and C waited for them too (about 6 s in the queue); now B is dropped."""
    answers: dict = {}
    a = post_in_background(app, body(256, "a runs"), answers, "a")
    time.sleep(0.5)
    post_and_leave(app.port, body(320, "b leaves"), stay_s=0.5)
    c = post_in_background(app, body(384, "c waits"), answers, "c")
    a.join(60)
    c.join(60)
    assert answers["a"].status_code == 200 and answers["c"].status_code == 200, answers
    assert generated(app, {"a": 256, "b": 320, "c": 384}) == {"a", "c"}
    c_waited = answers["c"].json()["timings"]["queue_wait_s"]
    assert c_waited < STEPS * STEP_S + 1.0, f"c waited {c_waited} s: it waited for b's images too"
    log = app.log()
    assert '"event": "client_gone"' in log and len(access_lines(app, 499)) >= 1
    metrics = httpx.get(app.url + "/metrics").text
    assert 'zimage_requests_total{status="client_closed_request"}' in metrics


def test_a_running_job_whose_client_left_stops_at_its_next_step(app, slow):
    """D's client leaves during D's first step: D stops when that step ends, and E, sent right
    after, waits for one step of D, not two."""
    before = len(access_lines(app, 499))
    answers: dict = {}
    leaving = threading.Thread(target=post_and_leave, args=(app.port, body(448, "d leaves"), 0.5))
    leaving.start()
    time.sleep(0.3)
    e = post_in_background(app, body(512, "e waits"), answers, "e")
    leaving.join(30)
    e.join(60)
    assert answers["e"].status_code == 200, answers["e"].text
    assert generated(app, {"d": 448, "e": 512}) == {"e"}
    e_waited = answers["e"].json()["timings"]["queue_wait_s"]
    assert e_waited < STEP_S + 0.7, f"e waited {e_waited} s: d ran both its steps for nobody"
    assert len(access_lines(app, 499)) == before + 1


def test_a_client_that_stays_is_not_taken_for_gone(app):
    """The watch on the connection must not end a request whose client is still there, nor one
    sent on a kept-alive connection after another (its receive is the next request's, not a close)."""
    with httpx.Client(base_url=app.url, timeout=60) as client:
        for n in range(3):
            r = client.post("/api/generate", json=body(256, f"stays {n}"))
            assert r.status_code == 200, r.text
            assert len(r.json()["images"]) == 1
