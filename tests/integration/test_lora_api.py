"""LoRAs over real HTTP on the tiny model (`python -m app`, lora_dir with files made by peft): listed,
merged for the request that names them and only for it, recorded in the PNG, and every bad name,
file or field a 422 with its reason."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.lora_files import make_foreign_lora, make_lora

pytestmark = pytest.mark.integration
BASE = {"prompt": "a paper boat on a pond", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def app(start_app, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-files")
    make_lora(root, "ink", seed=1, magnitude=0.2)
    make_foreign_lora(root, "sdxl-style")
    return start_app("lora", min_size=64, lora_dir=root)


def post(app, body):
    return httpx.post(
        app.url + "/api/generate", json={**BASE, **body, "response_format": "base64"}, timeout=60
    )


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["images"][0]["b64_png"])
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def listing(app) -> dict:
    r = httpx.get(app.url + "/api/loras", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_files_are_listed(app):
    data = listing(app)
    assert data["enabled"] is True and data["max_per_request"] == 3
    assert [(f["name"], f["size_bytes"] > 0) for f in data["loras"]] == [("ink", True), ("sdxl-style", True)]


def test_a_lora_changes_its_request_only_and_is_recorded_in_the_png(app):
    plain = pixels(post(app, {}))
    r = post(app, {"loras": [{"name": "ink", "scale": 1.0}]})
    styled = pixels(r)
    assert np.abs(styled - plain).mean() > 1.0  # the LoRA did change the picture
    again = pixels(post(app, {}))
    assert np.array_equal(again, plain)  # and the model's own weights came back, bit for bit
    assert np.array_equal(pixels(post(app, {"loras": [{"name": "ink"}]})), styled)  # scale 1 by default
    png = httpx.get(app.url + f"/outputs/{r.json()['images'][0]['filename']}", timeout=10).content
    with Image.open(io.BytesIO(png)) as image:
        params = json.loads(image.text["parameters"])
    assert params["loras"] == [{"name": "ink", "scale": 1.0}]
    state = listing(app)
    assert [f["loaded"] for f in state["loras"]] == [True, False]
    assert state["merged_now"] == [["ink", 1.0]] and state["memory_bytes"] > 0
    info = httpx.get(app.url + "/api/info", timeout=10).json()
    assert info["loras"]["loaded"] == ["ink"] and info["loras"]["merges"] >= 2


def test_a_lora_at_scale_zero_is_the_model_itself(app):
    assert np.array_equal(
        pixels(post(app, {"loras": [{"name": "ink", "scale": 0.0}]})), pixels(post(app, {}))
    )


def error_of(r, status=422) -> dict:
    assert r.status_code == status, r.text
    return r.json()


def test_an_unknown_name_is_a_422_that_lists_what_there_is(app):
    body = error_of(post(app, {"loras": [{"name": "nope"}]}))
    assert body["error"] == "unknown_lora" and "nope" in body["message"]
    assert "ink" in body["hint"] and "sdxl-style" in body["hint"]
    body = error_of(post(app, {"loras": [{"name": "../../etc/passwd"}]}))
    assert body["error"] == "unknown_lora"


def test_a_lora_for_another_model_is_a_422_naming_its_keys_and_the_next_request_is_served(app):
    body = error_of(post(app, {"loras": [{"name": "sdxl-style"}]}))
    assert body["error"] == "invalid_lora"
    assert "does not fit this model" in body["message"] and "down_blocks.0.proj_in.lora_A" in body["message"]
    pixels(post(app, {"loras": [{"name": "ink"}]}))
    assert httpx.get(app.url + "/readyz", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "loras, words",
    [
        ([{"name": "ink"}] * 2, "twice"),
        ([{"name": f"l{i}"} for i in range(4)], "at most 3"),
        ([{"name": "ink", "scale": 10}], "less than or equal to 4"),
        ([{"name": "ink", "scale": "NaN"}], "finite number"),
        ([{"name": "ink", "weight": 1}], "weight"),
        ([{"name": ""}], "at least 1 character"),
        ("ink", "valid list"),
    ],
)
def test_malformed_lora_fields_are_422_with_the_reason(app, loras, words):
    body = error_of(post(app, {"loras": loras}))
    assert words in json.dumps(body), body


def test_a_job_with_a_lora_gives_the_same_image_as_the_direct_route(app):
    r = httpx.post(app.url + "/api/jobs", json={**BASE, "loras": [{"name": "ink"}]}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    for _ in range(300):
        view = httpx.get(app.url + f"/api/jobs/{job_id}", timeout=10).json()
        if view["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert view["state"] == "done", view
    png = httpx.get(app.url + view["result"]["images"][0]["url"], timeout=10).content
    styled = pixels(post(app, {"loras": [{"name": "ink"}]}))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))).astype(int), styled)
