"""The real app (`python -m app`, tiny model) over real HTTP."""

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import sqlite3

import httpx
import pytest
from PIL import Image

from tests.helpers import AppProcess, wait_for

pytestmark = pytest.mark.integration
SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def app(start_app):
    return start_app("api", fault_injection="true", queue_size=1)


def post(app, body, **kw):
    return httpx.post(app.url + "/api/generate", json=body, timeout=kw.pop("timeout", 60), **kw)


def test_generate_returns_a_real_png_with_parameters(app):
    r = post(app, {"prompt": "a lighthouse", "seed": 42, **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 42 and body["request_id"] == r.headers["x-request-id"]
    timings = body["timings"]
    assert set(timings) == {
        "queue_wait_s",
        "generation_s",
        "encode_s",
        "denoise_s",
        "decode_s",
        "save_s",
        "total_s",
    }
    stages = timings["encode_s"] + timings["denoise_s"] + timings["decode_s"]
    assert 0 < stages <= timings["generation_s"] <= timings["total_s"]
    img = httpx.get(app.url + body["images"][0]["url"], timeout=10)
    assert img.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(img.content))
    assert png.size == (256, 256)
    params = json.loads(png.text["parameters"])
    assert params["seed"] == 42 and params["prompt"] == "a lighthouse"
    assert "lossy_options" not in params  # the default is the model's own computation


def test_a_lossy_opt_in_is_told_in_info_and_written_into_each_png(tmp_path):
    proc = AppProcess(tmp_path, step_cache_skips="2", warmup_size=128, warmup_steps=1).start().wait_ready()
    try:
        r = post(
            proc, {"prompt": "a lighthouse", "seed": 3, "width": 256, "height": 256, "num_inference_steps": 9}
        )
        assert r.status_code == 200, r.text
        png = Image.open(io.BytesIO(httpx.get(proc.url + r.json()["images"][0]["url"], timeout=10).content))
        assert json.loads(png.text["parameters"])["lossy_options"] == ["step cache (steps 6, 8 of 9 reused)"]
        info = httpx.get(proc.url + "/api/info", timeout=5).json()
        assert info["step_cache_skips"] == 2 and any("step cache" in note for note in info["notes"])
        metrics = httpx.get(proc.url + "/metrics", timeout=5).text
        assert 'zimage_step_cache_passes{kind="reused"} 2.0' in metrics  # steps 5 and 7 of the 9
        assert 'zimage_step_cache_passes{kind="computed"} 7.0' in metrics
    finally:
        proc.stop()


def test_base64_format_and_random_seed(app):
    r = post(app, {"prompt": "两只猫", "response_format": "base64", "num_images": 2, **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 <= body["seed"] < 2**32 and len(body["images"]) == 2
    png = Image.open(io.BytesIO(base64.b64decode(body["images"][1]["b64_png"])))
    assert png.size == (256, 256)


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"prompt": "x", "width": 1000}, "width 1000 is not a multiple of 64; try 1024"),
        ({"prompt": "x", "height": 8192}, "outside"),
        ({"prompt": ""}, "prompt is empty"),
        ({"width": 512}, "prompt is required"),
        ({"prompt": "x", "num_images": 5}, "num_images"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "steps": 9}, "steps is not a known field"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_bad_input_is_a_readable_422(app, body, needle):
    r = post(app, body)
    assert r.status_code == 422
    assert needle in r.json()["message"] and r.json()["error"] == "invalid_request"


def test_non_json_and_oversized_bodies(app):
    r = httpx.post(
        app.url + "/api/generate",
        content=b"\xff\xfenot json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "not valid JSON" in r.json()["message"]
    r = httpx.post(app.url + "/api/generate", content=b"x" * (2 * 2**20), timeout=10)
    assert r.status_code == 413


def test_probes_and_metrics(app):
    h = httpx.get(app.url + "/healthz", timeout=5).json()
    assert h["status"] == "ok" and "heartbeat" in h and h["heartbeat"]["generations"] >= 1
    assert httpx.get(app.url + "/readyz", timeout=5).json()["ready"] is True
    text = httpx.get(app.url + "/metrics", timeout=5).text
    for name in (
        "zimage_requests_total",
        "zimage_request_seconds_bucket",
        "zimage_queue_depth",
        "zimage_in_flight",
        "zimage_steps_per_second",
        "zimage_ready 1.0",
        'zimage_compile_backend{kind="none"} 1.0',
        'zimage_self_checks{kind="failed"} 0.0',
    ):  # (no compiling on the CPU)
        assert name in text
    info = httpx.get(app.url + "/api/info", timeout=5).json()
    assert info["demo_model"] is True and info["device"] == "cpu" and info["dtype"] == "float32"


def test_paths_outside_outputs_are_not_served(app):
    for path in (
        "/outputs/..%2F..%2Fpyproject.toml",
        "/outputs/../pyproject.toml",
        "/outputs/%2Fetc%2Fpasswd",
        "/outputs/x.png",
    ):
        assert httpx.get(app.url + path, timeout=5).status_code == 404


def test_admin_needs_the_token(app):
    assert httpx.post(app.url + "/admin/free-cache", timeout=5).status_code == 401
    r = httpx.post(app.url + "/admin/free-cache", timeout=5, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(
        app.url + "/admin/free-cache", timeout=5, headers={"authorization": f"Bearer {app.admin_token()}"}
    )
    assert r.status_code == 200 and r.json()["device"] == "cpu"


def test_injected_oom_is_a_507_and_service_continues(app):
    admin = {"authorization": f"Bearer {app.admin_token()}"}
    assert (
        httpx.post(app.url + "/admin/fault", json={"kind": "oom"}, headers=admin, timeout=5).status_code
        == 200
    )
    r = post(app, {"prompt": "x", **SMALL})
    assert r.status_code == 507 and r.json()["error"] == "out_of_memory" and "smaller" in r.json()["hint"]
    assert "CUDA out of memory" in app.log()  # the line the monitor's OOM detector reads
    assert post(app, {"prompt": "x", **SMALL}).status_code == 200


def test_a_locked_history_index_costs_the_request_nothing(app):
    """The index held by another writer past sqlite's wait (10 s): the request got a 500 although its
    images were saved. Now it gets them; the log tells the skipped row; the next one is indexed."""
    other = sqlite3.connect(str(app.tmp / "history.sqlite"), isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        r = post(app, {"prompt": "index locked", **SMALL})
    finally:
        other.close()  # (the transaction ends with it)
    assert r.status_code == 200, r.text
    png = httpx.get(app.url + r.json()["images"][0]["url"], timeout=10)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"event": "history_write_failed"' in app.log()
    after = post(app, {"prompt": "index free", **SMALL}).json()["request_id"]
    items = httpx.get(app.url + "/api/history?limit=5", timeout=5).json()["items"]
    assert items[0]["request_id"] == after and r.json()["request_id"] not in [i["request_id"] for i in items]


def test_full_queue_gives_503_with_retry_after(app):
    admin = {"authorization": f"Bearer {app.admin_token()}"}
    httpx.post(app.url + "/admin/fault", json={"kind": "slow", "seconds": 0.5}, headers=admin, timeout=5)
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, app, {"prompt": f"p{i}", **SMALL}) for i in range(4)]
            statuses = sorted(f.result().status_code for f in futures)
            rejected = [f.result() for f in futures if f.result().status_code == 503]
    finally:
        httpx.post(app.url + "/admin/fault", json={"kind": "clear"}, headers=admin, timeout=5)
    # queue_size=1: one running + one waiting are served, the rest are refused at once.
    assert statuses.count(200) == 2 and statuses.count(503) == 2, statuses
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "queue_full" for r in rejected)


def test_request_timeout_is_a_504(tmp_path):
    proc = (
        AppProcess(tmp_path, fault_injection="true", request_timeout_s="1", warmup_size=128, warmup_steps=1)
        .start()
        .wait_ready()
    )
    try:
        admin = {"authorization": f"Bearer {proc.admin_token()}"}
        httpx.post(proc.url + "/admin/fault", json={"kind": "slow", "seconds": 0.5}, headers=admin, timeout=5)
        r = post(proc, {"prompt": "x", **SMALL, "num_inference_steps": 10})
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        httpx.post(proc.url + "/admin/fault", json={"kind": "clear"}, headers=admin, timeout=5)
        wait_for(
            lambda: not httpx.get(proc.url + "/healthz").json()["heartbeat"]["busy"], 10, what="engine free"
        )
        assert post(proc, {"prompt": "x", **SMALL}).status_code == 200
    finally:
        proc.stop()


def test_api_token_guards_api_and_outputs(tmp_path):
    proc = (
        AppProcess(tmp_path, api_token="s3cret-api-token", warmup_size=128, warmup_steps=1)
        .start()
        .wait_ready()
    )
    try:
        assert post(proc, {"prompt": "x", **SMALL}).status_code == 401
        assert httpx.get(proc.url + "/api/info", timeout=5).status_code == 401
        r = post(proc, {"prompt": "x", **SMALL}, headers={"authorization": "Bearer s3cret-api-token"})
        assert r.status_code == 200
        url = proc.url + r.json()["images"][0]["url"]
        assert httpx.get(url, timeout=5).status_code == 401
        assert httpx.get(proc.url + "/healthz", timeout=5).status_code == 200  # probes stay open
        assert "s3cret-api-token" not in proc.log()
        assert proc.admin_token() not in proc.log()
    finally:
        proc.stop()


def test_readiness_flips_during_warmup_and_drain_and_sigterm_completes_in_flight(tmp_path):
    proc = AppProcess(tmp_path, fault_injection="true", warmup_size=256, warmup_steps=2).start()
    try:
        # While loading/warming: alive, not ready.
        seen = wait_for(lambda: httpx.get(proc.url + "/healthz", timeout=2).json(), 60, what="liveness")
        assert seen["state"] in ("loading", "warming", "ready")
        if seen["state"] != "ready":
            assert httpx.get(proc.url + "/readyz", timeout=2).status_code == 503
        proc.wait_ready()
        admin = {"authorization": f"Bearer {proc.admin_token()}"}
        httpx.post(proc.url + "/admin/fault", json={"kind": "slow", "seconds": 0.3}, headers=admin, timeout=5)
        with cf.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, proc, {"prompt": "finish me", **SMALL, "num_inference_steps": 8})
            wait_for(lambda: httpx.get(proc.url + "/healthz").json()["heartbeat"]["busy"], 10, 0.05, "busy")
            os.kill(proc.proc.pid, signal.SIGTERM)
            wait_for(
                lambda: httpx.get(proc.url + "/readyz", timeout=2).status_code == 503, 5, 0.05, "not ready"
            )
            refused = post(proc, {"prompt": "too late", **SMALL})
            assert refused.status_code == 503 and refused.json()["error"] == "draining"
            done = in_flight.result(60)
        assert done.status_code == 200, done.text
        assert proc.proc.wait(30) == 0
        assert '"event": "drain_done"' in proc.log()
    finally:
        proc.stop()
