from monitor.findings import Finding
from monitor.incidents import IncidentBook


def f(kind="hang"):
    return Finding(kind=kind, severity="critical", reason="r", action="kill")


def test_one_incident_per_problem_repeats_suppressed():
    book = IncidentBook()
    first = book.observe(f(), 0, 1000)
    assert first is not None and first.status == "firing"
    assert book.observe(f(), 1, 1001) is None
    assert book.open["hang"].count == 2


def test_resolves_after_quiet_samples_with_app_ready_and_warmup():
    book = IncidentBook()
    book.observe(f(), 0, 1000)
    book.note_action("hang", "kill", awaiting_warmup=True)
    assert book.settle(set(), True, 2, 1002) == []  # still waiting for the warm-up
    book.warmed_up("warm-up image in 0.2 s")
    assert book.settle(set(), False, 2, 1003) == []  # app not ready
    assert book.settle(set(), True, 2, 1004) == []
    (resolved,) = book.settle(set(), True, 2, 1005)
    assert resolved.status == "resolved" and resolved.evidence["warmup"].startswith("warm-up")
    assert "hang" not in book.open and book.closed[-1] is resolved


def test_a_new_finding_resets_the_quiet_count():
    book = IncidentBook()
    book.observe(f(), 0, 0)
    book.settle(set(), True, 2, 1)
    book.observe(f(), 2, 2)
    assert book.settle({"hang"}, True, 2, 3) == []
    assert book.settle(set(), True, 2, 4) == []


def test_budget_incident_is_held_until_resolved_by_hand():
    book = IncidentBook()
    book.observe(f("restart_budget_exhausted"), 0, 0)
    for t in range(10):
        assert book.settle(set(), True, 1, t) == []
    assert book.resolve("restart_budget_exhausted", 11, "reset").status == "resolved"
