from monitor.findings import Finding
from monitor.policy import PolicyState, backoff_seconds, decide, record, reset_circuit
from tests.monitor.factories import cfg

C = cfg(
    restart_budget=3,
    restart_budget_window_s=600,
    backoff_initial_s=10,
    backoff_max_s=60,
    vram_escalate_after_s=30,
)


def finding(kind="hang", action="kill", **evidence):
    return Finding(
        kind=kind, severity="critical", reason=f"{kind} happened", action=action, evidence=evidence
    )


def test_healthy_means_no_action():
    assert decide([], PolicyState(), 0, C).action == "none"


def test_hang_kills_at_once_then_backs_off_doubling():
    state = PolicyState()
    d = decide([finding()], state, 0, C)
    assert d.action == "kill"
    record(d, state, 0)
    d = decide([finding()], state, 5, C)
    assert d.action == "wait" and round(d.wait_s) == 5
    d = decide([finding()], state, 10, C)
    assert d.action == "kill"
    record(d, state, 10)
    assert decide([finding()], state, 25, C).action == "wait"  # second backoff is 20 s
    assert decide([finding()], state, 30, C).action == "kill"


def test_backoff_is_capped():
    assert [backoff_seconds(n, C) for n in range(6)] == [0, 10, 20, 40, 60, 60]


def test_budget_exhausted_pages_and_stops_restarting():
    state = PolicyState()
    t = 0.0
    for _ in range(3):
        d = decide([finding()], state, t, C)
        assert d.action == "kill"
        record(d, state, t)
        t += 100
    d = decide([finding()], state, t, C)
    assert d.action == "page" and "budget exhausted" in d.reason
    record(d, state, t)
    assert state.circuit_open
    later = decide([finding()], state, t + 10_000, C)  # stays stopped until an operator resets
    assert later.action == "none" and "operator" in later.reason
    reset_circuit(state)
    assert decide([finding()], state, t + 10_001, C).action == "kill"


def test_budget_window_slides():
    state = PolicyState(restarts=[0, 100, 200])
    assert decide([finding()], state, 300, C).action == "page"
    assert decide([finding()], state, 601, C).action == "kill"  # the first restart left the window


def test_vram_pressure_frees_cache_first_then_escalates():
    state = PolicyState()
    f = finding("vram_pressure", "free_cache", app_bytes=70, used_bytes=75)
    d = decide([f], state, 0, C)
    assert d.action == "free_cache"
    record(d, state, 0)
    assert decide([f], state, 10, C).action == "none"  # give tier 1 time to work
    grown = finding("vram_pressure", "free_cache", app_bytes=74, used_bytes=76)
    assert decide([grown], state, 31, C).action == "restart"  # still there and ours: tier 2


def test_pressure_from_other_processes_only_alerts():
    state = PolicyState(free_cache_at={"vram_pressure": 0})
    f = finding("vram_pressure", "free_cache", app_bytes=10, used_bytes=75)
    assert decide([f], state, 100, C).action == "alert"


def test_crash_loop_alerts_and_fatal_starts():
    assert decide([finding("crash_loop", "alert")], PolicyState(), 0, C).action == "alert"
    assert decide([finding("app_fatal", "start")], PolicyState(), 0, C).action == "start"


def test_neighbour_growth_is_not_blamed_on_the_app():
    """As seen on the H100: the app holds 26 GB, a neighbour grows from 12 to 40 GB."""
    state = PolicyState()
    first = finding("vram_pressure", "free_cache", app_bytes=26, used_bytes=38)
    d = decide([first], state, 0, C)
    record(d, state, 0)
    assert d.action == "free_cache"
    later = finding(
        "vram_pressure", "free_cache", app_bytes=26, used_bytes=45
    )  # app still > half, not growing
    assert decide([later], state, 40, C).action == "alert"
    growing = finding("vram_pressure", "free_cache", app_bytes=34, used_bytes=45)  # the app itself grew
    assert decide([growing], state, 40, C).action == "restart"
