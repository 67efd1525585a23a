"""Image-to-image and inpainting over real HTTP on the tiny model: they run through the same
queue and jobs, record their mode and inputs in the PNG, and every bad input is a 422 or 413
with a reason: not base64, not an image, truncated, a decompression bomb, a mask of another size."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import bomb_png

pytestmark = pytest.mark.integration
BASE = {"prompt": "a lighthouse at dusk", "width": 128, "height": 128, "num_inference_steps": 8, "seed": 5}


@pytest.fixture(scope="module")
def app(start_app):
    return start_app("img2img", min_size=64)


def png_bytes(size=(160, 96), mode="RGB", color=None) -> bytes:
    if color is None:
        ramp = np.linspace(0, 255, size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3)
        image = Image.fromarray(ramp)
    else:
        image = Image.new(mode, size, color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(app, body, path="/api/generate"):
    return httpx.post(app.url + path, json=body, timeout=60)


def pixels(app, body) -> np.ndarray:
    r = post(app, {**body, "response_format": "base64"})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64_png"]))))


def test_img2img_records_its_mode_and_inputs_and_depends_on_them(app):
    init = png_bytes()
    body = {**BASE, "init_image": b64(init), "strength": 0.5}
    r = post(app, body)
    assert r.status_code == 200, r.text
    png = httpx.get(app.url + r.json()["images"][0]["url"]).content
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (128, 128)  # the init image (160×96) was fitted to width×height
        params = json.loads(image.text["parameters"])
    assert params["mode"] == "img2img" and params["strength"] == 0.5
    assert params["init_image_sha256"] == hashlib.sha256(init).hexdigest()
    text2img, again = pixels(app, BASE), pixels(app, body)
    other_start = pixels(app, {**body, "init_image": b64(png_bytes(color=(0, 90, 200)))})
    assert np.array_equal(pixels(app, body), again)  # deterministic for one seed and input
    assert not np.array_equal(again, text2img) and not np.array_equal(again, other_start)


def test_img2img_as_a_job_runs_strength_times_the_steps(app):
    body = {**BASE, "init_image": b64(png_bytes()), "strength": 0.5}
    job_id = post(app, body, "/api/jobs").json()["job_id"]
    steps = []
    with httpx.stream("GET", f"{app.url}/api/jobs/{job_id}/events", timeout=60) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "step":
                steps.append(json.loads(line[6:])["step"])
    assert steps == [1, 2, 3, 4]  # 8 steps at strength 0.5: the last 4 of the schedule


def test_inpainting_takes_a_mask_of_the_images_size(app):
    init, mask = png_bytes((128, 128)), png_bytes((128, 128), "L", 255)
    r = post(app, {**BASE, "init_image": b64(init), "mask_image": b64(mask), "strength": 1.0})
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(httpx.get(app.url + r.json()["images"][0]["url"]).content)) as image:
        params = json.loads(image.text["parameters"])
    assert params["mode"] == "inpaint" and params["mask_image_sha256"] == hashlib.sha256(mask).hexdigest()


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"init_image": "not base64!"}, "init_image is not valid base64"),
        ({"init_image": b64(b"hello, not a picture")}, "init_image is not an image"),
        ({"init_image": b64(png_bytes()[:120])}, "init_image is truncated or corrupt"),
        ({"init_image": b64(bomb_png(30000, 30000))}, "decompression bomb"),
        (
            {"init_image": b64(png_bytes((128, 128))), "mask_image": b64(png_bytes((64, 64), "L", 0))},
            "64×64 but init_image is 128×128",
        ),
        ({"mask_image": b64(png_bytes((128, 128), "L", 0))}, "mask_image needs init_image"),
        ({"init_image": b64(png_bytes()), "strength": 0}, "strength"),
    ],
)
def test_bad_inputs_are_422_with_the_reason(app, extra, words):
    r = post(app, {**BASE, **extra})
    assert r.status_code == 422 and words in r.json()["message"], r.text


def test_an_input_over_the_body_limit_is_413(app):
    big = b64(np.random.default_rng(0).integers(0, 255, 2**20, dtype=np.uint8).tobytes())
    r = post(app, {**BASE, "init_image": big})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_the_variants_share_the_loaded_weights():
    import torch

    from app.runtime.stages import BatchRequest, pipeline_for
    from app.runtime.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(dtype=torch.float32)
    request = BatchRequest(
        ["x"], None, 64, 64, 2, 0.0, [torch.Generator().manual_seed(0)], [Image.new("RGB", (64, 64))]
    )
    img2img, extra = pipeline_for(pipe, request)
    assert extra["strength"] == 1.0 and img2img is pipeline_for(pipe, request)[0]  # made once
    for name in ("transformer", "vae", "text_encoder"):
        assert getattr(img2img, name) is getattr(pipe, name)  # the same modules: no second copy


def test_a_large_but_honest_image_is_refused_by_its_size_before_decoding(app):
    big = Image.new("RGB", (5000, 4000))  # 20 MP: under PIL's bomb limit, over ours
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = post(app, {**BASE, "init_image": b64(buf.getvalue())})
    assert r.status_code == 422 and "5000×4000" in r.json()["message"], r.text


def test_img2img_with_the_vae_in_another_dtype_than_the_transformer():
    """As on a GPU by default: transformer bf16, VAE fp32 (the H200 run failed here first)."""
    import torch

    from app.runtime.stages import BatchRequest, PromptEmbeddingCache, run_batch
    from app.runtime.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    dtypes = {n: getattr(pipe, n).dtype for n in ("transformer", "text_encoder", "vae")}
    init, mask = Image.new("RGB", (64, 64), (10, 200, 30)), Image.new("L", (64, 64), 255)
    for masks in (None, [mask]):
        request = BatchRequest(
            ["x"], None, 64, 64, 4, 0.0, [torch.Generator().manual_seed(0)], [init], masks, strength=0.6
        )
        with torch.inference_mode():
            images, _ = run_batch(pipe, request, torch.device("cpu"), PromptEmbeddingCache(0))
        assert images[0].size == (64, 64)
        # the shared modules keep their dtypes (from_pipe cast them all to fp32: twice the memory)
        assert {n: getattr(pipe, n).dtype for n in dtypes} == dtypes


# ---- multipart uploads ----------------------------------------------------------------------------
def upload(app, params, files, path="/api/generate/upload", **kw):
    data = {"params": params if isinstance(params, str) else json.dumps(params)}
    return httpx.post(app.url + path, data=data, files=files, timeout=60, **kw)


def test_a_multipart_upload_is_the_same_request_as_base64(app):
    init = png_bytes()
    as_json = post(app, {**BASE, "init_image": b64(init), "strength": 0.5, "response_format": "base64"})
    r = upload(app, {**BASE, "strength": 0.5, "response_format": "base64"}, {"init_image": ("a.png", init)})
    assert r.status_code == 200 and as_json.status_code == 200, r.text
    same = [base64.b64decode(x.json()["images"][0]["b64_png"]) for x in (r, as_json)]
    assert np.array_equal(*[np.asarray(Image.open(io.BytesIO(p))) for p in same])
    # inpainting, as a job
    mask = png_bytes(mode="L", color=255)
    job = upload(
        app,
        {**BASE, "strength": 1.0},
        {"init_image": ("a.png", init), "mask_image": ("m.png", mask)},
        path="/api/jobs/upload",
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]

    def done():
        return httpx.get(f"{app.url}/api/jobs/{job_id}", timeout=5).json()["state"] in ("done", "failed")

    from tests.helpers import wait_for

    wait_for(done, 60, 0.1, "upload job done")
    assert httpx.get(f"{app.url}/api/jobs/{job_id}", timeout=5).json()["state"] == "done"


@pytest.mark.parametrize(
    "params, files, status, reason",
    [
        ("{not json", {"init_image": ("a.png", png_bytes())}, 422, "`params` is not JSON"),
        ("[1, 2]", {"init_image": ("a.png", png_bytes())}, 422, "must be a JSON object"),
        (json.dumps(BASE), {"init_image": ("a.png", b"GIF89a not really")}, 422, "init_image"),
        (json.dumps(BASE), {"init_image": ("a.png", png_bytes()[:60])}, 422, "init_image"),
        (json.dumps(BASE), {"init_image": ("b.png", bomb_png(60_000, 60_000))}, 422, "init_image"),
        (json.dumps({**BASE, "width": 100}), {"init_image": ("a.png", png_bytes())}, 422, "width"),
    ],
)
def test_bad_uploads_are_4xx_with_a_reason(app, params, files, status, reason):
    r = upload(app, params, files)
    assert r.status_code == status, r.text
    assert reason in r.text and r.json()["message"]


def test_a_form_without_params_or_a_truncated_form_is_refused_with_a_reason(app):
    r = httpx.post(app.url + "/api/generate/upload", files={"init_image": ("a.png", png_bytes())}, timeout=30)
    assert r.status_code == 422 and "params" in r.json()["message"]
    boundary = "zimageboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(BASE)}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="init_image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png_bytes()[:100]  # cut off: no closing boundary
    r = httpx.post(
        app.url + "/api/generate/upload",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=30,
    )
    # (python-multipart parses it without complaint, minus the cut part: it would have run as text
    # to image; the closing boundary is checked instead)
    assert r.status_code == 400 and "truncated" in r.json()["message"], r.text


def test_an_upload_over_the_upload_limit_is_413_before_it_is_read(app):
    big = b"\0" * (51 * 2**20)  # max_upload_mb is 50
    r = upload(app, BASE, {"init_image": ("big.png", big)})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    # and the JSON route keeps its own 1 MiB limit
    r = post(app, {**BASE, "init_image": b64(b"\0" * 2**20)})
    assert r.status_code == 413
