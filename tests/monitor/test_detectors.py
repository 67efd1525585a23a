from monitor.detectors import (
    detect_all,
    detect_crash_loop,
    detect_drain_abandoned,
    detect_engine_unhealthy,
    detect_hang,
    detect_memory,
    detect_monitor_stalled,
    detect_not_ready,
    detect_not_running,
    detect_oom_in_log,
    detect_vram_pressure,
)
from monitor.samples import HttpResult
from tests.monitor.factories import GiB, cfg, oom_event, sample

C = cfg()


# ---- hang -------------------------------------------------------------------------------------
def test_a_stopped_process_is_a_hang_after_hang_stopped_s_not_before():
    h = [sample(t, status="stopped") for t in range(5)]  # stopped 0..4 s
    assert detect_hang(h, C) is None
    h.append(sample(5, status="stopped"))
    f = detect_hang(h, C)
    assert f.kind == "hang" and f.action == "kill" and "stopped" in f.reason and f.evidence["stopped_s"] == 5


def test_a_pause_of_three_seconds_is_not_a_hang_nor_a_liveness_failure():
    """SIGSTOP then SIGCONT within 3 s: no probe was sent while stopped, so none failed."""
    c = cfg(hang_stopped_s=5, hang_liveness_failures=3)
    h = [sample(0)] + [sample(t, status="stopped") for t in (1, 2, 3, 4)] + [sample(4.5), sample(5.5)]
    for i in range(1, len(h) + 1):
        assert detect_hang(h[:i], c) is None, i
    # a stop longer than the liveness failure count never trips the liveness rule instead
    long = [sample(t, status="stopped") for t in range(4)]
    assert detect_hang(long, cfg(hang_stopped_s=10, hang_liveness_failures=3)) is None


def test_a_stopped_child_of_the_app_is_a_hang_of_the_whole_group_even_while_it_answers():
    """A context-parallel rank in state T: the app answers and idles, but its next generation would
    wait on that rank for good. Timed as the app's own stop; a shorter pause is left alone."""
    h = [sample(t, stopped_child=101) for t in range(5)]  # the app itself sleeping, answering
    assert detect_hang(h, C) is None
    h.append(sample(5, stopped_child=101))
    f = detect_hang(h, C)
    assert f.action == "kill" and f.evidence["stopped_pid"] == 101 and f.evidence["pid"] == 100
    assert f.evidence["process_status"] == "sleeping"  # the app's own state: it was the rank
    assert "process 101 of app 100's tree" in f.reason
    resumed = h[:3] + [sample(3), sample(4, stopped_child=101), sample(5, stopped_child=101)]
    assert detect_hang(resumed, C) is None  # the count starts again after a SIGCONT


def test_liveness_timeouts_in_a_row_are_a_hang():
    h = [sample(t, live="timeout") for t in range(2)]
    assert detect_hang(h, C) is None
    h.append(sample(2, live="timeout"))
    assert detect_hang(h, C).evidence["failures"] == 3
    # one good answer in between resets the count
    h2 = [sample(0, live="timeout"), sample(1, live="timeout"), sample(2), sample(3, live="timeout")]
    assert detect_hang(h2, C) is None


def test_refused_before_the_first_answer_is_a_start_until_the_grace_and_after_one_it_is_a_hang():
    # a slow start (a loaded machine: 45 s of imports) is not killed, however long up to the grace
    slow = [sample(t, live="refused", uptime=40 + t) for t in range(10)]
    assert detect_hang(slow, C) is None
    never = [sample(t, live="refused", uptime=C.startup_grace_s + t) for t in range(3)]
    assert "refused" in detect_hang(never, C).reason
    # a server that answered and then went away is gone at once, however young the process
    gone = [sample(0, uptime=20)] + [sample(t, live="refused", uptime=20 + t) for t in range(1, 4)]
    assert detect_hang(gone, C).evidence["failures"] == 3
    assert detect_hang(gone[:3], C) is None  # two refusals are not three


def test_failures_of_an_older_pid_do_not_count():
    h = [sample(0, pid=1, live="timeout"), sample(1, pid=1, live="timeout"), sample(2, pid=2, live="timeout")]
    assert detect_hang(h, C) is None


def test_not_running_in_supervisord_is_not_our_hang():
    h = [sample(t, state="STARTING", live="timeout") for t in range(5)]
    assert detect_hang(h, C) is None


def test_long_generation_that_progresses_is_never_a_hang():
    # Busy for 10 minutes, but the last step was 2 s ago and steps take 1.5 s: progressing.
    h = [sample(t, busy=True, last_step_ago=2.0, step_max=1.5) for t in range(0, 600, 10)]
    assert detect_hang(h, C) is None


def test_a_warm_stage_silent_past_its_bound_is_a_stall_within_ten_seconds():
    c = cfg(stall_min_s=10, stall_floor_s=60, stall_factor=10)
    # An H200-like step of 0.1 s: the bound is max(10 s, 10 × 0.1 s) = 10 s.
    assert detect_hang([sample(0, busy=True, last_step_ago=9.5, step_max=0.1)], c) is None
    f = detect_hang([sample(0, busy=True, last_step_ago=10.5, step_max=0.1)], c)
    assert f is not None and "stalled in denoise" in f.reason and f.evidence["bound_s"] == 10
    # a slow stage raises its own bound: a 5 s step (a 2048², 4-image, 16 GiB offload step) → 50 s
    assert detect_hang([sample(0, busy=True, last_step_ago=45, step_max=5.0)], c) is None
    assert detect_hang([sample(0, busy=True, last_step_ago=55, step_max=5.0)], c) is not None
    # the decode of that shape, slowest 8 s: 80 s, whatever the steps took
    assert (
        detect_hang(
            [sample(0, busy=True, last_step_ago=70, step_max=0.1, stage="decode", stage_slowest=8.0)], c
        )
        is None
    )


def test_no_warm_stage_may_stay_silent_past_stall_max_s_whatever_its_slowest_time():
    """One outlier (a 30 s step on a squeezed host), extrapolated to a bigger shape, made a bound of
    minutes: every request queued behind a stuck stage timed out before the monitor acted."""
    c = cfg(stall_min_s=10, stall_factor=10, stall_max_s=120)
    outlier = dict(busy=True, step_max=0.1, stage="denoise", stage_slowest=30.0)
    assert detect_hang([sample(0, last_step_ago=119, **outlier)], c) is None
    f = detect_hang([sample(0, last_step_ago=121, **outlier)], c)
    assert f is not None and f.evidence["bound_s"] == 120 and f.evidence["stage_slowest_s"] == 30
    # a compile under way keeps its own, longer bound
    compiling = sample(0, last_step_ago=200, compiling_for=199, **outlier)
    assert detect_hang([compiling], cfg(stall_max_s=120, compile_stall_s=600)) is None


def test_before_the_warm_up_or_without_a_time_for_the_stage_the_floor_applies():
    c = cfg(stall_min_s=10, stall_floor_s=60, stall_factor=10)
    cold = sample(0, busy=True, last_step_ago=30, step_max=0.1, warm=False)
    assert detect_hang([cold], c) is None
    unknown = sample(0, busy=True, last_step_ago=30, stage="encode", stage_slowest=None)
    assert detect_hang([unknown], c) is None
    assert detect_hang([sample(0, busy=True, last_step_ago=61, warm=False)], c) is not None


def test_a_compile_under_way_extends_the_bound_but_not_forever():
    c = cfg(stall_floor_s=30, stall_factor=10, compile_stall_s=300)
    compiling = sample(0, busy=True, last_step_ago=120, step_max=0.5, compiling_for=119)
    assert detect_hang([compiling], c) is None  # a first start's compile: progress of another kind
    stuck = sample(0, busy=True, last_step_ago=301, step_max=0.5, compiling_for=300)
    assert detect_hang([stuck], c) is not None


# ---- OOM in log ---------------------------------------------------------------------------------
def test_oom_lines_are_one_finding_with_evidence():
    assert detect_oom_in_log(sample(0)) is None
    f = detect_oom_in_log(sample(0, events=[oom_event(), oom_event("second")]))
    assert f.kind == "oom_in_log" and f.action == "restart" and len(f.evidence["lines"]) == 2


# ---- VRAM ----------------------------------------------------------------------------------------
def test_no_gpu_keeps_vram_rule_quiet():
    assert detect_vram_pressure([sample(t) for t in range(10)], C) is None


def test_vram_over_threshold_for_n_samples():
    c = cfg(vram_threshold=0.9, vram_samples=3)
    h = [sample(t, gpu_used=int(0.95 * 80 * GiB), gpu_total=80 * GiB) for t in range(2)]
    assert detect_vram_pressure(h, c) is None
    h.append(sample(2, gpu_used=int(0.95 * 80 * GiB), gpu_total=80 * GiB))
    f = detect_vram_pressure(h, c)
    assert f.action == "free_cache" and f.evidence["used_fraction"] > 0.9


def test_rising_vram_trend_is_a_precursor():
    c = cfg(vram_threshold=0.9, vram_samples=3, vram_trend_window_s=20, vram_trend_horizon_s=60)
    # 50 % → 70 % over 20 s: +1 %/s, crosses 90 % in ~20 s
    h = [sample(t, gpu_used=int((0.5 + 0.01 * t) * 80 * GiB), gpu_total=80 * GiB) for t in range(21)]
    f = detect_vram_pressure(h, c)
    assert f is not None and "precursor" in f.reason and 10 < f.evidence["crosses_in_s"] < 30
    flat = [sample(t, gpu_used=int(0.7 * 80 * GiB), gpu_total=80 * GiB) for t in range(21)]
    assert detect_vram_pressure(flat, c) is None


# ---- memory --------------------------------------------------------------------------------------
def test_rss_limit_and_leak():
    c = cfg(rss_limit_mb=1000, leak_growth_mb=200, leak_window_s=100, leak_min_span_s=10)
    assert detect_memory([sample(0, rss=1200 * 2**20)], c).kind == "memory_limit"
    growing = [sample(t, rss=(500 + 30 * t) * 2**20) for t in range(12)]  # +330 MiB in 11 s
    assert detect_memory(growing, c).kind == "leak"
    steady = [sample(t, rss=500 * 2**20) for t in range(30)]
    assert detect_memory(steady, c) is None
    short = [sample(t, rss=(500 + 100 * t) * 2**20) for t in range(5)]  # under leak_min_span_s of history
    assert detect_memory(short, c) is None


# ---- crash loop / unhealthy ----------------------------------------------------------------------
def test_crash_loop():
    c = cfg(crash_loop_count=3, crash_loop_window_s=60)
    w = 1_000_000.0  # unexpected restarts are epoch seconds (the factory's wall = 1e6 + now)
    assert (
        detect_crash_loop([w + 10, w + 19], sample(30), c) is None
    )  # older than crash_report_s, under the count
    single = detect_crash_loop([w + 25], sample(30), c)
    assert single.kind == "crash" and single.action == "alert"
    assert detect_crash_loop([w + 10, w + 20, w + 25], sample(30), c).kind == "crash_loop"
    assert detect_crash_loop([w + 1, w + 2, w + 3], sample(100), c) is None  # outside the window


def test_the_app_not_running_is_never_healthy():
    c = cfg(down_after_s=3)
    assert detect_not_running([sample(0, state="FATAL", live="refused")], c).action == "start"
    stopped = [sample(t, state="STOPPED", pid=0, live="refused") for t in range(3)]
    assert detect_not_running(stopped, c) is None  # 2 s: the gap of a restart
    stopped.append(sample(3, state="STOPPED", pid=0, live="refused"))
    f = detect_not_running(stopped, c)
    assert f.kind == "app_down" and f.action == "start" and "STOPPED" in f.reason
    exited = [sample(t, state="EXITED", pid=0, live="refused") for t in range(4)]
    assert detect_not_running(exited, c).action == "start"
    backoff = [sample(t, state="BACKOFF", pid=0, live="refused") for t in range(4)]
    assert detect_not_running(backoff, c).action == "alert"  # supervisord is retrying by itself
    assert detect_not_running([sample(0), sample(5)], c) is None


def test_engine_unhealthy_reported_by_the_app():
    assert detect_engine_unhealthy(sample(0, live="unhealthy")).action == "restart"
    assert detect_engine_unhealthy(sample(0)) is None


def test_a_start_that_never_gets_ready_is_reported_once_past_the_bound_and_only_then():
    c = cfg(ready_timeout_s=600)
    stuck = sample(0, uptime=601, ready=False, engine_state="loading", busy=False)
    found = detect_not_ready(stuck, c)
    assert found.kind == "not_ready" and found.action == "alert" and "loading" in found.reason
    assert detect_not_ready(sample(0, uptime=599, ready=False, engine_state="loading"), c) is None
    assert detect_not_ready(sample(0, uptime=601, ready=True, engine_state="ready"), c) is None
    # working at it: a warm-up generation (the stall bound judges it) or torch.compile
    assert detect_not_ready(sample(0, uptime=601, ready=False, engine_state="warming", busy=True), c) is None
    compiling = sample(0, uptime=601, ready=False, engine_state="warming", compiling_for=30)
    assert detect_not_ready(compiling, c) is None
    # not starting: draining or failed (engine_unhealthy's) or not answering (detect_hang's)
    assert detect_not_ready(sample(0, uptime=601, ready=False, engine_state="ready"), c) is None
    assert detect_not_ready(sample(0, uptime=601, ready=False, live="unhealthy"), c) is None
    assert detect_not_ready(sample(0, uptime=601, ready=False, live="timeout"), c) is None
    assert "not_ready" in [f.kind for f in detect_all([stuck], [], c)]


def test_a_drain_nobody_finishes_is_a_restart_past_the_bound_and_only_then():
    c = cfg(drain_abandoned_s=300)
    left = sample(0, ready=False, draining_for=301)
    found = detect_drain_abandoned(left, c)
    assert found.kind == "drain_abandoned" and found.action == "restart" and "301 s" in found.reason
    assert found.evidence["draining_s"] == 301
    assert "drain_abandoned" in [f.kind for f in detect_all([left], [], c)]
    # a drain still in progress, or none
    assert detect_drain_abandoned(sample(0, ready=False, draining_for=299), c) is None
    assert detect_drain_abandoned(sample(0), c) is None
    # supervisord stopping it (its SIGTERM drain ends in an exit), or the app not answering (the
    # hang rules judge that), or an app that does not say since when it drains
    assert detect_drain_abandoned(sample(0, state="STOPPING", ready=False, draining_for=900), c) is None
    assert detect_drain_abandoned(sample(0, live="timeout", ready=False), c) is None
    old_app = sample(0, ready=False, draining_for=900)
    del old_app.live.body["draining_since"]
    assert detect_drain_abandoned(old_app, c) is None


def test_a_monitor_replaced_by_its_watchdog_is_paged_with_where_it_hung():
    left = {"silent_s": 301.2, "bound_s": 300.0, "where": "gpu.py:88 in sample", "pid": 7, "at": 1.0}
    s = sample(0)
    s.monitor_stalled = left
    found = detect_monitor_stalled(s)
    assert found.kind == "monitor_stalled" and found.action == "alert" and found.severity == "error"
    assert "301.2 s" in found.reason and "gpu.py:88 in sample" in found.reason and found.evidence == left
    assert "monitor_stalled" in [f.kind for f in detect_all([s], [], cfg())]
    assert detect_monitor_stalled(sample(0)) is None


def test_a_balancer_silent_past_its_bound_is_paged_by_replica_0s_monitor_only():
    def with_balancer(t, status, state="RUNNING"):
        s = sample(t)
        s.balancer_live = HttpResult(ok=status == 200, status=status, error=None if status else "timeout")
        s.balancer_state = state
        return s

    c = cfg(watch_capacity=True, balancer_after_s=5)
    wedged = [with_balancer(0, 200)] + [with_balancer(t, None) for t in range(1, 8)]
    found = detect_all(wedged, [], c)[0]
    assert found.kind == "balancer_down" and found.action == "alert" and found.severity == "critical"
    assert "6 s" in found.reason and "timeout" in found.reason and found.evidence["state"] == "RUNNING"
    kinds = lambda h, conf=c: [f.kind for f in detect_all(h, [], conf)]  # noqa: E731
    assert "balancer_down" not in kinds(wedged[:5])  # 3 s: a restart by supervisord is not paged
    assert "balancer_down" not in kinds(wedged, cfg(watch_capacity=False, balancer_after_s=5))  # replica 1's
    # its own 503 (no replica ready) is the balancer answering: capacity's business, not this one's
    assert "balancer_down" not in kinds([with_balancer(t, 503) for t in range(10)])
    assert "balancer_down" not in kinds([sample(t) for t in range(10)])  # not watched (one app)


def test_detect_all_orders_by_severity():
    h = [sample(0, status="stopped", events=[oom_event()]), sample(6, status="stopped", events=[oom_event()])]
    kinds = [f.kind for f in detect_all(h, [], C)]
    assert kinds[0] == "hang" and "oom_in_log" in kinds


def test_memory_rising_while_the_app_loads_is_not_a_precursor():
    c = cfg(vram_threshold=0.9, vram_samples=3, vram_trend_window_s=20, vram_trend_horizon_s=60)
    loading = [
        sample(t, ready=False, gpu_used=int((0.1 + 0.02 * t) * 80 * GiB), gpu_total=80 * GiB)
        for t in range(21)
    ]
    assert detect_vram_pressure(loading, c) is None


def test_rss_growth_while_loading_is_not_a_leak():
    c = cfg(leak_growth_mb=200, leak_window_s=100, leak_min_span_s=10)
    loading = [sample(t, ready=False, rss=(500 + 300 * t) * 2**20) for t in range(30)]
    assert detect_memory(loading, c) is None
    serving = loading + [sample(30 + t, rss=9500 * 2**20) for t in range(20)]  # loaded, flat
    assert detect_memory(serving, c) is None


def test_a_monitor_replaced_for_failing_every_turn_is_paged_with_what_it_raised():
    left = {
        "silent_s": 300.4,
        "bound_s": 300.0,
        "where": "every turn of its loop failing",
        "error": "KeyError: 'gpu' at detectors.py:12 in detect_leak",
        "pid": 7,
        "at": 1.0,
    }
    s = sample(0)
    s.monitor_stalled = left
    found = detect_monitor_stalled(s)
    assert found.reason.startswith("every turn of the monitor's loop raised for 300.4 s"), found.reason
    assert "KeyError: 'gpu' at detectors.py:12 in detect_leak" in found.reason
