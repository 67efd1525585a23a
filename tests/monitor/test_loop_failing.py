"""monitor/loop.py's own loop: a turn that raises is told to the watchdog and is no beat; the first
turn that goes through beats again. Only `tick` is replaced (by one that raises on chosen turns);
the loop, its stop and its event queue are the real ones."""

from __future__ import annotations

import threading

from monitor.core import MonitorState
from monitor.loop import Monitor, describe_failure
from tests.monitor.factories import cfg


class TurnsThatRaise(Monitor):
    def __init__(self, failing_turns: set[int], turns: int):
        super().__init__(cfg(interval_s=0.01), None, None, None, None, state=MonitorState())
        self.failing_turns, self.turns, self.turn = failing_turns, turns, 0
        self.told: list[tuple[int, str]] = []  # (turn, what) in order: beats and failures
        self.beat = lambda: self.told.append((self.turn, "beat"))
        self.tell_failing = lambda error: self.told.append((self.turn, error))

    def tick(self) -> None:
        self.turn += 1
        if self.turn >= self.turns:
            self.request_stop()
        if self.turn in self.failing_turns:
            raise KeyError("gpu")


def test_failing_turns_are_told_and_beat_nothing_until_one_goes_through():
    monitor = TurnsThatRaise(failing_turns={2, 3, 4}, turns=6)
    thread = threading.Thread(target=monitor.run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    kinds = [(turn, what if what == "beat" else "failed") for turn, what in monitor.told]
    # the beat of a turn comes before its tick (drain_events), so it carries the previous turn's number
    assert kinds == [
        (0, "beat"),
        (1, "beat"),
        (2, "failed"),
        (3, "failed"),
        (4, "failed"),
        (5, "beat"),  # turn 5 went through: beat at once
        (5, "beat"),  # and at the start of turn 6
    ], kinds
    failure = monitor.told[2][1]
    assert failure.startswith("KeyError: 'gpu' at test_loop_failing.py:") and failure.endswith("in tick")
    assert monitor.failing is None


def test_describe_failure_scrubs_secrets(monkeypatch):
    from common import jsonlog

    monkeypatch.setattr(jsonlog, "_formatter", jsonlog.JsonFormatter("test", ["s3cr3t-token"]))
    try:
        raise RuntimeError("POST https://hooks.example/s3cr3t-token failed")
    except RuntimeError as exc:
        told = describe_failure(exc)
    assert "s3cr3t-token" not in told and "***" in told, told


class FailsThenOnlyEvents(TurnsThatRaise):
    """The one tick raises and leaves an event behind; the turns after it only take events (the
    next tick is not due)."""

    def __init__(self):
        super().__init__(failing_turns={1}, turns=99)
        self.cfg = cfg(interval_s=30)
        self.applied = 0

    def tick(self) -> None:
        self.post("an event")
        super().tick()

    def apply(self, event) -> None:
        self.applied += 1
        self.request_stop()


def test_a_turn_that_only_took_events_does_not_end_a_failing_run():
    monitor = FailsThenOnlyEvents()
    thread = threading.Thread(target=monitor.run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and monitor.applied == 1
    assert [what for _, what in monitor.told][:1] == ["beat"] and "beat" not in [w for _, w in monitor.told][
        1:
    ]
    assert monitor.failing is not None
