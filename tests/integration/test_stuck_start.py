"""A start stuck on storage: the transformer's weights are a FIFO nobody writes, a read that never
returns (as from a hung network mount). The app answers /healthz but never gets ready. The monitor
neither calls that a hang (the app answers) nor kills it (a slow first AOT build looks the same):
it pages not_ready once past ready_timeout_s, and keeps its hands off. The operator puts the file
back and kills the stuck process; supervisord starts it again, it gets ready, the incident resolves."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import torch

from app.runtime.tiny import build_tiny_pipeline
from ops.tempstack import StackHome
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def test_a_load_stuck_on_storage_is_paged_not_killed_and_resolves_once_fixed(tmp_path, receiver):
    model = tmp_path / "model"
    build_tiny_pipeline(dtype=torch.float32).save_pretrained(str(model))
    weights = next((model / "transformer").glob("*.safetensors"))
    kept = tmp_path / "kept.safetensors"
    weights.rename(kept)
    os.mkfifo(weights)
    (tmp_path / "home").mkdir()
    stack = StackHome(
        tmp_path / "home",
        app={"model_dir": str(model)},
        monitor={"webhooks": receiver.url, "ready_timeout_s": 8},
    )
    try:
        stack.ctl("up", "--timeout", "1")  # it will not get ready: up says so and leaves it running
        firing = wait_for(lambda: receiver.alerts("not_ready"), stack.within(90), 0.2, "not_ready alert")
        assert firing[0]["status"] == "firing" and "engine loading" in firing[0]["reason"], firing
        pid = stack.pid()
        health = httpx.get(stack.url + "/healthz", timeout=5).json()
        assert health["state"] == "loading" and not stack.ready()
        time.sleep(3)  # several more ticks: still paged only, never restarted
        assert stack.pid() == pid and stack.restarts() == [] and len(receiver.alerts("not_ready")) == 1

        weights.unlink()
        kept.rename(weights)
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the operator: supervisorctl signal KILL app
        wait_for(lambda: stack.pid() not in (0, pid) and stack.ready(), stack.within(90), 0.2, "ready")
        wait_for(
            lambda: [a for a in receiver.alerts("not_ready") if a["status"] == "resolved"],
            stack.within(30),
            0.2,
            "not_ready resolved",
        )
    finally:
        stack.stop()
