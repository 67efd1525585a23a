"""Millisecond tests of the pure decision core: one sequence of events each, with an injected clock.
A "restart of the monitor" is a round trip of the state through the journal's JSON, as it happens
on disk."""

from monitor import core, journal
from monitor.config import WebhookTarget
from tests.monitor.factories import cfg, oom_event, sample

T0 = 1_000_000.0  # the factory's wall clock is T0 + sample.now
C = cfg(
    webhooks=[WebhookTarget(url="http://127.0.0.1:1/hook")],
    resolve_quiet_samples=2,
    restart_budget=2,
    backoff_initial_s=0,
    hang_stopped_s=5,
    down_after_s=3,
)


class Run:
    """Feeds events through core.step like the loop does, keeping the effects it was asked for."""

    def __init__(self, state=None, c=C):
        self.state, self.cfg = state or core.MonitorState(), c
        self.actions: list[core.RunAction] = []
        self.logs: list[core.LogLine] = []

    def feed(self, event, now):
        before = self.state
        self.state, effects = core.step(self.state, event, now, self.cfg)
        assert before is not self.state
        for e in effects:
            (self.actions if isinstance(e, core.RunAction) else self.logs).append(e)
        return effects

    def observe(self, s, maintenance=None):
        return self.feed(core.Observe(s, maintenance), T0 + s.now)

    def done(self, at, ok=True, action="kill"):
        return self.feed(
            core.ActionDone(
                action,
                ok,
                2.0,
                warmup_ok=ok,
                warmup_note="ready" if ok else "no image",
                old_pid=100,
                new_pid=200,
            ),
            T0 + at,
        )

    def alerts(self):
        return [(i.incident["kind"], i.status) for i in self.state.outbox]

    def restart_monitor(self):
        """The process dies; a new one reads the journal."""
        self.state = journal.from_json(journal.to_json(self.state))
        self.actions.clear()
        return self

    def events(self, name):
        return [line for line in self.logs if line.fields.get("event") == name]


def healthy(t, pid=200):
    return sample(t, pid=pid)


def test_step_never_mutates_the_state_it_was_given():
    start = core.MonitorState()
    snapshot = journal.to_json(start)
    core.step(start, core.Observe(sample(0, status="stopped")), T0, C)
    assert journal.to_json(start) == snapshot and start.history == ()


def test_hang_fires_kills_and_resolves_once_the_new_process_is_warm():
    run = Run()
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    assert [a.action for a in run.actions] == ["kill"] and run.actions[0].target_pid == 100
    assert run.alerts() == [("hang", "firing")]
    assert run.state.pending is not None and run.state.pending.action == "kill"
    run.done(7)
    assert run.state.pending is None and run.state.history == ()
    for t in (8, 9, 10):
        run.observe(healthy(t))
    assert run.alerts() == [("hang", "firing"), ("hang", "resolved")]
    assert run.state.book.open == {} and run.state.policy.budget_left(T0 + 10, C) == 1


def test_a_pause_shorter_than_hang_stopped_s_never_kills():
    run = Run()
    for t in (0, 1, 2, 3):
        run.observe(sample(t, status="stopped"))
    for t in (4, 5, 6, 30):
        run.observe(sample(t))
    assert run.actions == [] and run.alerts() == []


def test_budget_exhausted_pages_once_and_stops_restarting():
    c = C.model_copy(update=dict(restart_budget=1))
    run = Run(c=c)
    run.observe(sample(0, events=[oom_event(pid=100)]))
    assert [a.action for a in run.actions] == ["restart"]
    run.done(1, action="restart")
    run.observe(sample(2, pid=200, events=[oom_event(pid=200)]))
    assert run.state.policy.circuit_open
    assert ("restart_budget_exhausted", "firing") in run.alerts()
    run.observe(sample(3, pid=200, events=[oom_event(pid=200)]))
    assert len(run.actions) == 1  # no second restart
    run.feed(core.OperatorReset(), T0 + 4)
    assert ("restart_budget_exhausted", "resolved") in run.alerts() and not run.state.policy.circuit_open


def test_a_heal_held_back_by_backoff_fires_at_once_and_only_once():
    # A second hang soon after a first restart: the backoff holds the kill back for 20 s, but the
    # on-call hears of the hung app now, not when the kill finally runs.
    run = Run(c=C.model_copy(update=dict(backoff_initial_s=20, restart_budget=5)))
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    run.done(7)
    for t in (8, 9, 10):
        run.observe(healthy(t))
    for t in range(11, 18):
        run.observe(sample(t, pid=200, status="stopped"))
    assert [a.action for a in run.actions] == ["kill"]  # still backing off
    assert run.alerts()[-1] == ("hang", "firing") and len(run.alerts()) == 3
    assert "backing off" in run.state.outbox[-1].action
    t = 18
    while len(run.actions) < 2 and t < 40:
        run.observe(sample(t, pid=200, status="stopped"))
        t += 1
    assert [a.action for a in run.actions] == ["kill", "kill"] and t - 1 == 5 + 20  # first kill + backoff
    assert len(run.alerts()) == 3  # no second firing for the same incident


def test_a_failed_warm_up_opens_its_own_incident():
    run = Run()
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    run.done(7, ok=False)
    assert ("warmup_failed", "firing") in run.alerts()
    assert run.state.book.open["hang"].awaiting_warmup is False  # it no longer waits for a warm-up


def test_monitor_killed_between_stop_and_start_rolls_forward_and_resolves_exactly_once():
    run = Run()
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    assert run.state.pending is not None  # persisted before the kill ran
    budget = run.state.policy.budget_left(T0 + 6, C)
    run.restart_monitor()  # died while the app was STOPPED
    run.observe(sample(7, pid=0, state="STOPPED", live="refused"))
    assert len(run.actions) == 1 and run.actions[0].resumed and run.actions[0].action == "kill"
    assert run.events("resume")
    run.done(9)
    for t in (10, 11, 12):
        run.observe(healthy(t))
    assert run.alerts() == [("hang", "firing"), ("hang", "resolved")]
    assert run.state.policy.budget_left(T0 + 12, C) == budget  # the roll-forward is not a second restart


def test_an_open_incident_survives_a_monitor_restart_and_resolves_once():
    run = Run()
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    run.done(7)
    run.restart_monitor()  # died during the quiet samples, after the warm-up
    incident_id = run.state.book.open["hang"].id
    for t in (8, 9, 10, 11):
        run.observe(healthy(t))
    assert run.alerts() == [("hang", "firing"), ("hang", "resolved")]
    assert [i.incident["id"] for i in run.state.outbox] == [incident_id, incident_id]


def test_the_same_alert_is_never_queued_twice():
    run = Run()
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    incident = run.state.book.open["hang"].as_dict()
    work = core._Step(run.state, T0 + 7, C)
    work.alert(incident, "firing")
    assert len(work.result()[0].outbox) == 1


def test_a_line_from_an_earlier_process_is_history():
    run = Run()
    run.observe(sample(0, pid=300, events=[oom_event(pid=299)]))
    assert run.actions == [] and run.state.book.open == {} and run.events("log_history")
    run.observe(sample(1, pid=0, state="STOPPED", live="refused", events=[oom_event(pid=300)]))
    assert run.actions == []  # no process runs: a line cannot be the current one's
    run.observe(sample(2, pid=300, events=[oom_event(pid=300)]))
    assert [a.action for a in run.actions] == ["restart"]


def test_outbox_keeps_order_until_delivered_and_drops_on_delivery():
    run = Run(
        c=C.model_copy(update=dict(webhooks=[WebhookTarget(url="http://a/"), WebhookTarget(url="http://b/")]))
    )
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    run.done(7)
    for t in (8, 9, 10):
        run.observe(healthy(t))
    first, second = run.state.outbox
    assert (first.status, second.status) == ("firing", "resolved") and first.seq < second.seq
    assert first.targets == (0, 1)
    run.feed(core.Delivered(first.seq, 0, "delivered"), T0 + 200)  # receiver a came back
    assert [i.targets for i in run.state.outbox] == [(1,), (0, 1)]
    run.restart_monitor()  # what is not delivered is still there after a restart
    for seq, target in ((first.seq, 1), (second.seq, 0), (second.seq, 1)):
        run.feed(core.Delivered(seq, target, "delivered"), T0 + 300)
    assert run.state.outbox == ()


def test_a_stopped_app_is_started_and_a_maintenance_mark_leaves_it_alone():
    run = Run()
    for t in range(5):
        run.observe(sample(t, pid=0, state="STOPPED", live="refused"), maintenance={"until": T0 + 100})
    assert run.actions == []
    for t in range(5, 9):
        run.observe(sample(t, pid=0, state="STOPPED", live="refused"))
        if run.actions:
            break
    assert [a.action for a in run.actions] == ["start"] and run.alerts() == [("app_down", "firing")]
    assert run.actions[0].target_pid == 0 and not run.actions[0].resumed


def test_an_alert_only_decision_is_logged_once_not_every_tick():
    run = Run(c=C.model_copy(update=dict(down_after_s=0)))
    for t in range(15):
        run.observe(sample(t, pid=0, state="BACKOFF", live="refused"))
    assert len(run.events("decision")) == 1 and run.alerts() == [("app_down", "firing")]


def test_supervisord_restarting_the_app_is_an_unexpected_restart_but_ours_is_not():
    run = Run()
    run.observe(sample(0, pid=100))
    run.observe(sample(1, pid=101))
    assert run.state.unexpected_restarts == (T0 + 1,) and run.alerts() == [("crash", "firing")]
    for t in range(2, 8):
        run.observe(sample(t, pid=101, status="stopped"))
    run.done(9)
    run.observe(sample(10, pid=102))
    assert run.state.unexpected_restarts == (T0 + 1,)


def test_a_new_pid_under_a_new_supervisord_is_no_crash_but_under_the_same_one_it_is():
    """zimagectl down, then up: a new supervisord, a new app pid, a monitor reading the old journal.
    The pid of an earlier stack is forgotten, not compared (a false "crash" alert on every up)."""
    from monitor.state import under_supervisord

    run = Run(core.MonitorState(supervisord="40:1000.00"))
    run.observe(sample(0, pid=100))
    run.restart_monitor()
    run.state = under_supervisord(run.state, "77:2000.00")  # the stack was brought down and up
    run.observe(sample(1, pid=200))
    assert run.state.unexpected_restarts == () and run.alerts() == [] and run.state.known_pid == 200
    run.restart_monitor()
    run.state = under_supervisord(run.state, "77:2000.00")  # the same supervisord: the monitor alone
    run.observe(sample(2, pid=201))  # the app died meanwhile and supervisord restarted it
    assert run.state.unexpected_restarts == (T0 + 2,) and run.alerts() == [("crash", "firing")]


def test_a_journal_without_a_supervisord_keeps_its_pid_and_learns_the_identity():
    from monitor.state import under_supervisord

    old = core.MonitorState(known_pid=100)
    assert under_supervisord(old, "77:2000.00").known_pid == 100
    assert under_supervisord(old, "77:2000.00").supervisord == "77:2000.00"
    assert under_supervisord(old, "") is old  # supervisord not answering: nothing known


def test_journal_round_trip_keeps_every_durable_field():
    run = Run()
    for t in range(6):
        run.observe(sample(t, status="stopped"))
    text = journal.to_json(run.state)
    again = journal.from_json(text)
    assert journal.to_json(again) == text and again.history == ()
    marked = core.MonitorState(supervisord="77:2000.00", known_pid=5)
    assert journal.from_json(journal.to_json(marked)).supervisord == "77:2000.00"


def test_an_unreadable_journal_is_moved_aside_and_the_monitor_starts_fresh(tmp_path):
    path = tmp_path / "journal.json"
    path.write_text("{not json")
    state = journal.Journal(path).load()
    fresh = journal.to_json(core.MonitorState())
    assert journal.to_json(state) == fresh and (tmp_path / "journal.json.unreadable").exists()
    j = journal.Journal(path)
    assert j.save(state) and not j.save(state)  # an unchanged state is not written again
    assert journal.to_json(journal.Journal(path).load()) == fresh


def test_a_journal_that_cannot_be_written_says_why_and_is_written_again_once_it_can(tmp_path):
    """A full disk (here /dev/full, where every write is ENOSPC): save raised, and the loop then
    applied no step at all, so the monitor neither healed nor paged. Now it says why, leaves the
    last good journal in place, and writes the next step once it can."""
    path = tmp_path / "journal.json"
    j = journal.Journal(path)
    assert j.save(core.MonitorState()) and j.error is None
    (tmp_path / "journal.json.tmp").symlink_to("/dev/full")
    assert not j.save(core.MonitorState(known_pid=5))
    assert "No space left on device" in j.error
    assert journal.Journal(path).load().known_pid == 0  # the last good journal, whole
    assert not (tmp_path / "journal.json.tmp").exists()  # (a partial temp file would hold space)
    assert j.save(core.MonitorState(known_pid=5)) and j.error is None  # the same step, written now
    assert journal.Journal(path).load().known_pid == 5


def test_an_unwritable_journal_pages_while_the_healing_goes_on_and_resolves():
    run = Run()
    for t in range(3):
        unwritable = sample(t)
        unwritable.journal_error = "OSError: [Errno 28] No space left on device"
        run.observe(unwritable)
    assert run.alerts() == [("journal_unwritable", "firing")]
    for t in range(3, 9):  # a hang meanwhile is still healed (the journal still cannot be written)
        stopped = sample(t, status="stopped")
        stopped.journal_error = "OSError: [Errno 28] No space left on device"
        run.observe(stopped)
    assert [a.action.value for a in run.actions] == ["kill"]
    run.done(at=9)
    for t in range(10, 14):  # the disk has room again: the new process is healthy, the journal written
        run.observe(healthy(t))
    assert ("journal_unwritable", "resolved") in run.alerts() and ("hang", "resolved") in run.alerts()
