"""Fixtures shared by every test directory. The fast tier (tests/app, tests/monitor without the
markers) uses only in-process parts; the slow tier's real processes start through these."""

from __future__ import annotations

import pytest

from tests.helpers import AppProcess

# The tiny model's quickest honest warm-up: one 128² image, one step.
TINY_WARMUP = {"warmup_size": 128, "warmup_steps": 1}


@pytest.fixture(scope="module")
def start_app(tmp_path_factory):
    """start_app(name, **settings) → a ready AppProcess (`python -m app` on the tiny model, its own
    port, outputs and admin token under a temp dir); every app started is stopped after the module."""
    started: list[AppProcess] = []

    def start(name: str, **settings) -> AppProcess:
        tmp = tmp_path_factory.mktemp(name)
        settings = {**TINY_WARMUP, **settings}
        settings = {k: (v(tmp) if callable(v) else v) for k, v in settings.items()}
        proc = AppProcess(tmp, **settings)
        started.append(proc)
        return proc.start().wait_ready()

    yield start
    for proc in started:
        proc.stop()
