"""The engine's waiting line, in-process: positions, a queued cancel that leaves at once, and a
cancel inside a merged batch that drops only that request's images."""

import threading

import pytest

from app import errors
from app.runtime.jobqueue import JobQueue
from app.runtime.jobs import GenerationParams, Job


def job(seq: int, priority: int = 1, images: int = 1, steps: int = 2) -> Job:
    params = GenerationParams("p", "", 64, 64, steps, 0.0, images, seq)
    return Job(params=params, request_id=f"r{seq}", priority=priority, seq=seq)


def test_positions_follow_priority_then_arrival_and_a_cancel_leaves_at_once():
    q = JobQueue(queue_size=8, max_batch=1, retry_after=lambda waiting: 1)
    jobs = [job(i) for i in range(4)]
    for j in jobs:
        q.put(j)
    urgent = job(9, priority=0)
    q.put(urgent)
    assert [q.position(j) for j in jobs] == [1, 2, 3, 4] and q.position(urgent) == 0
    assert q.cancel(jobs[1]) == "queued" and q.waiting == 4
    assert isinstance(jobs[1].future.exception(timeout=0), errors.Cancelled)
    assert [q.position(j) for j in (jobs[0], jobs[2], jobs[3])] == [1, 2, 3]
    taken = [q.next_batch()[0] for _ in range(4)]
    assert taken == [urgent, jobs[0], jobs[2], jobs[3]]  # the cancelled one never comes up


def test_forwards_ahead_count_each_job_ahead_at_its_own_steps_and_what_the_running_one_has_left():
    q = JobQueue(queue_size=8, max_batch=1, retry_after=lambda waiting: 1)
    long, short, mine = job(0, steps=40), job(1, steps=6), job(2, steps=8)
    for j in (long, short, mine):
        q.put(j)
    assert q.forwards_ahead(long) == 0 and q.forwards_ahead(mine) == 40 + 6
    assert q.next_batch() == [long]
    long.steps_done = 30
    assert q.forwards_ahead(short) == 10 and q.forwards_ahead(mine) == 10 + 6
    q.put(urgent := job(9, priority=0, steps=3))  # the priority lane goes before everyone waiting
    assert q.forwards_ahead(urgent) == 10 and q.forwards_ahead(mine) == 10 + 3 + 6
    assert q.cancel(short) == "queued" and q.forwards_ahead(mine) == 10 + 3
    assert q.next_batch() == [urgent] and q.forwards_ahead(urgent) is None


def test_the_bound_refuses_clearly_but_not_the_priority_lane():
    q = JobQueue(queue_size=1, max_batch=1, retry_after=lambda waiting: 7)
    q.put(job(0))
    with pytest.raises(errors.QueueFull) as raised:
        q.put(job(1))
    assert raised.value.retry_after_s == 7
    q.put(job(2, priority=0))  # the monitor's check still gets in
    assert q.waiting == 2


def test_a_running_job_is_reported_running_and_a_finished_one_finished():
    q = JobQueue(queue_size=4, max_batch=4, retry_after=lambda waiting: 1)
    a, b = job(0), job(1)
    q.put(a)
    q.put(b)
    batch = q.next_batch()
    assert batch == [a, b]  # same shape: merged
    assert q.cancel(b) == "running" and b.cancelled.is_set() and not a.cancelled.is_set()
    q.done()
    assert q.cancel(a) == "finished"


def test_cancel_inside_a_merged_batch_drops_only_that_request(tmp_path):
    from tests.engine_helpers import make_engine

    engine = make_engine(tmp_path, max_batch=4, queue_size=8)
    try:
        engine.faults.inject("slow", seconds=0.2)
        blocker = engine.submit(GenerationParams("block", "", 64, 64, 4, 0.0, 1, 1))
        threading.Event().wait(0.3)
        first = engine.submit(GenerationParams("a", "", 64, 64, 2, 0.0, 1, 1))
        second = engine.submit(GenerationParams("b", "", 64, 64, 2, 0.0, 1, 2))
        first.on_step = lambda step: engine.cancel(second) if step == 1 else None
        engine.faults.inject("clear")
        assert len(first.future.result(60).images) == 1
        assert isinstance(second.future.exception(60), errors.Cancelled)
        assert blocker.future.result(60).images
    finally:
        engine.stop()
