"""Input images are decoded off the event loop: a 16 MP upload takes the CPU for a moment, and the
loop must keep answering probes, progress streams and other requests meanwhile. In-process, engine
not started: the decode comes before the queue, so a 503 (not ready) follows it."""

import asyncio
import base64
import io

from fastapi.testclient import TestClient
from PIL import Image

import app.web.service as service_module
from app.config import load_settings
from app.web.api import create_app


def test_input_images_are_decoded_on_a_worker_thread_not_the_event_loop(tmp_path, monkeypatch):
    (tmp_path / "none.toml").write_text("")
    env = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml"), "ZIMAGE_HOME": str(tmp_path)}
    app = create_app(load_settings(env, admin_token_file=tmp_path / "admin.token"), with_ui=False)
    seen = []
    real = service_module.decode_image

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "decode_image", spy)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": "x", "width": 256, "height": 256, "init_image": image, "mask_image": image}
    client = TestClient(app, raise_server_exceptions=False)
    for route in ("/api/generate", "/api/jobs"):
        r = client.post(route, json=body)
        assert r.status_code == 503 and r.json()["error"] == "not_ready", r.text  # decoded, then queued
    assert seen == ["worker thread"] * 4  # init and mask, for each route
