"""The engine on the real tiny Z-Image pipeline, in-process: sizes, determinism, batching, faults."""

import time

import numpy as np
import pytest

from app import errors
from app.runtime.engine import Engine
from app.runtime.faults import FaultInjector
from tests.engine_helpers import make_engine, make_settings, params
from tests.helpers import wait_for


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = make_engine(tmp_path_factory.mktemp("engine"), max_batch=4, queue_size=16)
    yield e
    e.stop()


def run(engine, p, timeout=60):
    return engine.submit(p).future.result(timeout)


def pixels(image):
    return np.asarray(image).astype(np.int16)


def test_images_have_the_requested_size_and_count(engine):
    result = run(engine, params(width=320, height=192, num_images=3))
    assert [im.size for im in result.images] == [(320, 192)] * 3
    assert result.seed == 7 and result.generation_s > 0


def test_same_seed_same_image_other_seed_other_image(engine):
    a = pixels(run(engine, params(seed=11)).images[0])
    b = pixels(run(engine, params(seed=11)).images[0])
    c = pixels(run(engine, params(seed=12)).images[0])
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0
    assert a.std() > 1.0  # a real picture, not a flat fill


def test_cfg_uses_the_negative_prompt(engine):
    a = pixels(run(engine, params(cfg_scale=4.0, negative_prompt="blurry")).images[0])
    b = pixels(run(engine, params(cfg_scale=4.0, negative_prompt="sharp, vivid")).images[0])
    assert np.abs(a - b).mean() > 0.0


def test_guidance_at_or_below_one_runs_and_uses_the_negative_prompt(engine):
    """Z-Image guides at any cfg_scale > 0 (not only above 1): cfg_scale = 1 with no negative prompt
    used to fail inside the pipeline (a 500 the hostile-bodies test found)."""
    assert run(engine, params(cfg_scale=1.0)).images  # negative prompt "" (the default)
    a = pixels(run(engine, params(cfg_scale=0.5, negative_prompt="blurry")).images[0])
    b = pixels(run(engine, params(cfg_scale=0.5, negative_prompt="sharp, vivid")).images[0])
    assert np.abs(a - b).mean() > 0.0


def test_batched_requests_give_the_same_images_as_alone(engine):
    alone = [pixels(run(engine, params(seed=s)).images[0]) for s in (21, 22)]
    # Occupy the engine with a slow job so that the next two queue up and get merged into one call.
    engine.faults.inject("slow", seconds=0.2)
    try:
        blocker = engine.submit(params(seed=1))
        wait_for(lambda: engine.heartbeat.busy_since, 10, 0.01, "blocker running")
        jobs = [engine.submit(params(seed=s)) for s in (21, 22)]
        blocker.future.result(60)
    finally:
        engine.faults.inject("clear")
    results = [j.future.result(60) for j in jobs]
    assert results[0].batch_size == 2
    for got, want in zip(results, alone):
        assert np.abs(pixels(got.images[0]) - want).max() <= 1  # same picture (fp rounding aside)


def test_step_cache_skips_the_main_layers_at_planned_steps_only(engine, tmp_path):
    cached = make_engine(tmp_path, step_cache_skips=2)
    try:
        transformer = cached.loaded.pipe.transformer
        calls = []
        hook = transformer.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            nine = pixels(run(cached, params(num_inference_steps=9)).images[0])
            assert len(calls) == 7  # steps 5 and 7 reused the residual of steps 4 and 6
            three = pixels(run(cached, params(num_inference_steps=3)).images[0])
            assert len(calls) == 7 + 3  # 3 steps: nothing to skip
            run(cached, params(num_inference_steps=9, cfg_scale=2.0, negative_prompt="blurry", num_images=2))
            assert len(calls) == 10 + 7  # guidance doubles the batch in one call per step: same plan
        finally:
            hook.remove()
        assert "step cache" in " ".join(cached.loaded.notes)
    finally:
        cached.stop()
    assert np.array_equal(three, pixels(run(engine, params(num_inference_steps=3)).images[0]))
    full = pixels(run(engine, params(num_inference_steps=9)).images[0])
    assert not np.array_equal(nine, full)  # lossy: the skipped steps change the image, a little
    assert np.abs(nine - full).mean() < 8  # (1.3 of 255 on the tiny model)


def test_heartbeat_counts_steps(engine):
    before = engine.heartbeat.generations
    run(engine, params(num_inference_steps=4))
    hb = engine.heartbeat.snapshot()
    assert hb["steps_done"] == 4 and hb["steps_total"] == 4 and not hb["busy"]
    assert hb["generations"] == before + 1 and hb["step_seconds_ewma"] > 0


def test_injected_oom_fails_only_that_request(engine, caplog):
    engine.faults.inject("oom")
    with caplog.at_level("INFO"), pytest.raises(errors.OutOfMemory) as info:
        run(engine, params(num_images=3))
    assert "smaller size" in info.value.hint
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "oom"]
    assert line.images == 3  # images, not requests (it said 1 for a request of 4 on the H200)
    assert engine.state == "ready"
    assert run(engine, params()).images  # still serving


def test_queue_full_is_refused_not_waited(tmp_path):
    engine = make_engine(tmp_path, queue_size=1)
    try:
        engine.faults.inject("slow", seconds=0.3)
        first = engine.submit(params(num_inference_steps=3))
        wait_for(lambda: engine.running == 1, 10, what="first job running")
        second = engine.submit(params())
        with pytest.raises(errors.QueueFull) as info:
            engine.submit(params())
        assert info.value.retry_after_s >= 1
        engine.faults.inject("clear")
        assert first.future.result(60).images and second.future.result(60).images
    finally:
        engine.stop()


def test_abandoned_job_is_cancelled_mid_generation(tmp_path):
    engine = make_engine(tmp_path)
    try:
        engine.faults.inject("slow", seconds=0.2)
        job = engine.submit(params(num_inference_steps=40))
        wait_for(lambda: engine.heartbeat.steps_done >= 1 and engine.heartbeat.busy_since, 20, what="steps")
        job.abandoned.set()
        with pytest.raises(errors.GenerationTimeout):
            job.future.result(20)
        assert engine.heartbeat.steps_done < 40
    finally:
        engine.stop()


def test_fatal_cuda_error_marks_the_engine_unhealthy(tmp_path):
    engine = make_engine(tmp_path)
    try:
        engine.faults.inject("cuda_fatal")
        with pytest.raises(errors.EngineUnhealthy):
            run(engine, params())
        assert engine.state == "unhealthy"
        with pytest.raises(errors.EngineUnhealthy):
            engine.submit(params())
    finally:
        engine.stop()


def test_an_error_past_the_generation_makes_the_engine_unhealthy_not_a_dead_thread(tmp_path):
    engine = make_engine(tmp_path)
    try:

        def broken_hook(*_):  # a bug in code after the generation (here the metrics hook)
            raise RuntimeError("hook bug")

        engine.on_batch_done = broken_hook
        with pytest.raises(errors.EngineUnhealthy):
            run(engine, params())  # answered (503 + Retry-After), not left to its timeout
        assert engine.state == "unhealthy" and "hook bug" in engine.state_reason
        assert engine._thread.is_alive()  # the loop goes on, answering what is queued
        with pytest.raises(errors.EngineUnhealthy):
            engine.submit(params())
    finally:
        engine.stop()


def test_a_failed_warm_up_fails_the_start_instead_of_reporting_ready(tmp_path):
    settings = make_settings(tmp_path)
    faults = FaultInjector(enabled=True)
    faults.inject("cuda_fatal")  # armed before start: the warm-up generation hits it
    engine = Engine(settings, faults=faults)
    engine.start()
    try:
        wait_for(lambda: engine.state in ("ready", "failed"), 120, what="engine start")
        assert engine.state == "failed" and "GPU failed" in engine.state_reason
        with pytest.raises(errors.NotReady):
            engine.submit(params())
    finally:
        engine.stop()


class _FaultsAfterFirst(FaultInjector):
    """The drill's fault injector, armed for the generations after the first (the warm-up's
    one image succeeds, its batch meets the fault)."""

    def __init__(self, kind):
        super().__init__(enabled=True)
        self.kind, self.calls = kind, 0

    def before_generation(self) -> None:
        self.calls += 1
        if self.calls == 2:
            self.inject(self.kind)
        super().before_generation()


def test_a_warm_up_batch_that_does_not_fit_is_no_incident(tmp_path, caplog):
    """On a small card the warm-up's batch may run out of memory. That is an answer, not an OOM:
    torch's words in the log make the monitor restart the app, at every start, in a loop."""
    import re

    from monitor.config import DEFAULT_PATTERNS

    settings = make_settings(tmp_path, max_batch=2)
    engine = Engine(settings, faults=_FaultsAfterFirst("oom"))
    with caplog.at_level("INFO"):
        engine.start()
        try:
            wait_for(lambda: engine.state in ("ready", "failed"), 120, what="engine start")
            assert engine.state == "ready", engine.state_reason
            assert run(engine, params()).images  # single images still work
        finally:
            engine.stop()
    assert [r for r in caplog.records if getattr(r, "event", None) == "warmup_batch_failed"]
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert not [p.pattern for p in DEFAULT_PATTERNS if re.search(p.pattern, text)], (
        "a restart trigger in the log"
    )


def test_a_fatal_error_in_a_warm_up_batch_fails_the_start(tmp_path):
    settings = make_settings(tmp_path, max_batch=2)
    engine = Engine(settings, faults=_FaultsAfterFirst("cuda_fatal"))
    engine.start()
    try:
        # (it used to be overwritten with "ready" once the warm-up returned)
        wait_for(lambda: engine.state in ("ready", "failed"), 120, what="engine start")
        assert engine.state == "failed" and "illegal memory access" in engine.state_reason
    finally:
        engine.stop()


def test_a_cancelled_job_is_not_a_stall_to_the_monitor(tmp_path):
    """The heartbeat the monitor reads (GET /healthz's) ends with the cancel: busy becomes false, so
    the stall rule has nothing to time, however long after the cancel it looks. The same rule on the
    heartbeat of the job still running shows the check can fail."""
    from monitor.config import MonitorSettings
    from monitor.detectors import detect_hang
    from monitor.samples import HttpResult, Sample

    def monitor_sees(heartbeat: dict, later_s: float):
        wall = time.time() + later_s
        live = HttpResult(ok=True, status=200, body={"state": engine.state, "heartbeat": heartbeat})
        sample = Sample(now=later_s, wall=wall, program_state="RUNNING", pid=1, uptime_s=600, live=live)
        return detect_hang([sample], MonitorSettings(stall_floor_s=4, stall_factor=8))

    engine = make_engine(tmp_path)
    try:
        engine.faults.inject("slow", seconds=0.2)
        job = engine.submit(params(num_inference_steps=40))
        wait_for(lambda: engine.heartbeat.steps_done >= 2, 20, what="steps")
        running = engine.heartbeat.snapshot()
        assert monitor_sees(running, later_s=120) is not None  # a job silent for 2 min is a stall
        assert engine.cancel(job) == "running"
        with pytest.raises(errors.Cancelled):
            job.future.result(20)
        after = engine.heartbeat.snapshot()
        assert not after["busy"] and after["request_ids"] == []
        assert monitor_sees(after, later_s=120) is None
    finally:
        engine.stop()
