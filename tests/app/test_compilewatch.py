"""The compile watch against real dynamo compiles (the cheap "eager" backend), and the heartbeat's
rule that a step with a compile in it is progress but not a step time."""

import torch

from app.runtime.compilewatch import CompileWatch, compile_watch
from app.runtime.engine import Heartbeat


def test_watch_counts_real_compiles_and_their_time():
    watch = compile_watch()
    assert watch is compile_watch()  # one per process: dynamo's callbacks are process-wide
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend="eager", dynamic=False)
    count, seconds = watch.mark()
    fn(torch.ones(3))
    after_first = watch.mark()
    assert after_first[0] == count + 1 and after_first[1] > seconds
    compiled, compile_s = watch.since((count, seconds))
    assert compiled == 1 and compile_s > 0
    fn(torch.ones(3))  # cached graph: nothing compiles
    assert watch.mark() == after_first
    fn(torch.ones(5))  # a new shape compiles again
    assert watch.mark()[0] == count + 2
    assert watch.active_since is None


def test_watch_reports_a_compile_under_way():
    clock = iter([100.0, 104.5]).__next__
    watch = CompileWatch(clock=clock)
    watch.on_start()
    assert watch.active_since == 100.0
    watch.on_end()
    assert watch.active_since is None and watch.mark() == (1, 4.5)


def test_a_compiled_step_is_progress_but_not_a_step_time():
    hb = Heartbeat()
    hb.record_step(0, 45.0, now=1000.0, compiled=True)
    assert hb.steps_done == 1 and hb.last_step_at == 1000.0
    assert hb.step_seconds_max == 0.0 and hb.step_seconds_ewma is None
    hb.record_step(1, 0.1, now=1000.1, compiled=False)
    hb.record_step(2, 0.2, now=1000.3, compiled=False)
    assert hb.steps_done == 3 and hb.step_seconds_max == 0.2
    assert abs(hb.step_seconds_ewma - (0.8 * 0.1 + 0.2 * 0.2)) < 1e-9
