"""The engine's self-check (app/runtime/selfcheck.py): generations that keep failing for no reason of
their own make the engine try its warm-up image; a broken engine says so, a sound one keeps serving."""

import dataclasses
import logging

import pytest

from app import errors
from app.runtime.selfcheck import FAILED, OK, OTHER, FailureStreak
from tests.engine_helpers import make_engine
from tests.engine_helpers import params as base_params
from tests.helpers import wait_for


def test_the_streak_is_due_at_the_threshold_and_a_success_ends_it():
    streak = FailureStreak(threshold=2)
    assert streak.record(FAILED) is False
    assert streak.record(OK) is False and streak.in_a_row == 0  # a success in between: start again
    assert [streak.record(FAILED), streak.record(FAILED)] == [False, True]


def test_a_refusal_a_cancel_or_an_oom_neither_counts_nor_ends_the_streak():
    streak = FailureStreak(threshold=2)
    streak.record(FAILED)
    assert streak.record(OTHER) is False and streak.in_a_row == 1
    assert streak.record(FAILED) is True


def test_threshold_zero_never_asks_for_a_check():
    streak = FailureStreak(threshold=0)
    assert not any(streak.record(FAILED) for _ in range(50))


def params(seed):
    return base_params(width=128, height=128, num_inference_steps=1, seed=seed)


@pytest.fixture
def engine(tmp_path):
    e = make_engine(tmp_path, max_batch=1, queue_size=8)
    yield e
    e.stop()


def events(caplog, name):
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def test_a_failure_that_was_the_requests_own_is_a_500_and_the_engine_serves_on(engine, caplog):
    engine.faults.inject("broken", count=1)  # the request fails; the check after it does not
    with caplog.at_level(logging.INFO):
        with pytest.raises(errors.GenerationFailed):
            engine.submit(params(1)).future.result(60)
        assert engine.submit(params(2)).future.result(60).images
    assert engine.state == "ready"
    (passed,) = events(caplog, "self_check_passed")
    assert passed.failed_in_a_row == 1 and not events(caplog, "self_check_failed")
    assert engine.status().self_checks == {"passed": 1, "failed": 0}  # zimage_self_checks


def hold_the_queue(engine):
    """A slow request running first keeps what is submitted next in the queue until all of it is in."""
    engine.faults.inject("slow", seconds=0.5)
    running = engine.submit(dataclasses.replace(params(0), num_inference_steps=3))
    wait_for(lambda: engine.heartbeat.busy_since, 30, what="the first request running")
    return running


def test_a_broken_engine_answers_503_never_500_and_runs_nothing_more(engine, caplog):
    # Three failures armed: the first request, the self-check, and one more for the requests queued
    # behind them, which must not run on an engine that is known to be broken.
    running = hold_the_queue(engine)
    engine.faults.inject("broken", count=3)
    with caplog.at_level(logging.INFO):
        jobs = [engine.submit(params(seed)) for seed in (1, 2, 3)]
        assert running.future.result(60).images
        for job in jobs:  # the one that met the fault too: the check failed before it was answered
            with pytest.raises(errors.EngineUnhealthy) as refused:
                job.future.result(60)
            assert refused.value.status == 503 and refused.value.retry_after_s  # what a balancer retries
    assert engine.state == "unhealthy" and "self-check" in engine.state_reason
    assert engine.faults.broken_pending == 1  # the queued requests were never run
    (failed,) = events(caplog, "self_check_failed")
    assert failed.failed_in_a_row == 1 and engine.status().self_checks == {"passed": 0, "failed": 1}
    with pytest.raises(errors.EngineUnhealthy):
        engine.submit(params(4))


def test_with_a_threshold_of_two_the_first_failure_is_answered_and_the_second_checked(tmp_path):
    engine = make_engine(tmp_path, max_batch=1, self_check_after_failures=2)
    try:
        engine.faults.inject("broken", count=3)  # two requests and the check
        with pytest.raises(errors.GenerationFailed):
            engine.submit(params(1)).future.result(60)
        assert engine.state == "ready"
        with pytest.raises(errors.EngineUnhealthy):
            engine.submit(params(2)).future.result(60)
        assert engine.state == "unhealthy" and engine.faults.broken_pending == 0
    finally:
        engine.stop()


def test_with_the_check_off_failures_never_mark_the_engine(tmp_path):
    engine = make_engine(tmp_path, max_batch=1, self_check_after_failures=0)
    try:
        engine.faults.inject("broken", count=3)
        for seed in (1, 2, 3):
            with pytest.raises(errors.GenerationFailed):
                engine.submit(params(seed)).future.result(60)
        assert engine.state == "ready" and engine.submit(params(4)).future.result(60).images
    finally:
        engine.stop()


def test_under_cuda_graphs_one_failure_an_oom_included_makes_the_check_due(tmp_path):
    from app.runtime.selfcheck import OOM, streak_for
    from tests.engine_helpers import make_settings

    plain = streak_for(make_settings(tmp_path / "plain", self_check_after_failures=2))
    assert plain.record(OOM) is False and plain.record(FAILED) is False  # an OOM does not count
    assert plain.record(FAILED) is True
    graphs = streak_for(
        make_settings(tmp_path / "graphs", compile_mode="reduce-overhead", compile_backend="jit")
    )
    assert graphs.record(OOM) is True
    off = streak_for(
        make_settings(
            tmp_path / "off",
            compile_mode="reduce-overhead",
            compile_backend="jit",
            self_check_after_failures=0,
        )
    )
    assert off.record(OOM) is False and off.record(FAILED) is False


def test_an_oom_under_cuda_graphs_is_followed_by_the_check_at_once(tmp_path, caplog):
    """The engine's side of streak_for: its OOM outcome reaches the streak. (The CPU has no CUDA
    graphs; the mode only changes when the check runs, and on an H200 it found broken graph trees.)"""
    engine = make_engine(tmp_path, max_batch=1, compile_mode="reduce-overhead", compile_backend="jit")
    try:
        engine.faults.inject("oom")
        with caplog.at_level(logging.INFO):
            with pytest.raises(errors.OutOfMemory):
                engine.submit(params(1)).future.result(60)
            assert engine.submit(params(2)).future.result(60).images
        (passed,) = events(caplog, "self_check_passed")
        assert passed.failed_in_a_row == 1 and engine.state == "ready"
    finally:
        engine.stop()
