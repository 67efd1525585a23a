"""Hand-made samples for the pure monitor tests."""

from monitor.config import MonitorSettings
from monitor.samples import HttpResult, LogEvent, Sample

GiB = 2**30


def cfg(**overrides) -> MonitorSettings:
    return MonitorSettings(**overrides)


def sample(
    now: float,
    pid: int = 100,
    state: str = "RUNNING",
    uptime: float = 100.0,
    live="ok",
    ready=True,
    busy=False,
    last_step_ago=None,
    step_max=0.5,
    status="sleeping",
    rss=None,
    gpu_used=None,
    gpu_total=None,
    gpu_app=None,
    events=(),
    engine_state="ready",
    stage="denoise",
    warm=True,
    stage_slowest="step_max",
    compiling_for=None,
    draining_for=None,
    stopped_child=None,
) -> Sample:
    """One tick's sample. A stopped process (status="stopped") is not probed: live is None then."""
    wall = 1_000_000.0 + now
    if status == "stopped":
        live = None
    if live == "ok":
        at = None if last_step_ago is None else wall - last_step_ago
        hb = {
            "busy": busy,
            "busy_since": at,
            "last_step_at": at,
            "stage": stage if busy else None,
            "stage_started_at": at if busy else None,
            "warm": warm,
            "stage_slowest_s": step_max if stage_slowest == "step_max" else stage_slowest,
            "compiling_since": None if compiling_for is None else wall - compiling_for,
            "step_seconds_max": step_max,
            "step_seconds_ewma": step_max,
            "steps_done": 3,
            "steps_total": 9,
            "request_ids": ["r1"] if busy else [],
        }
        body = {"state": engine_state, "heartbeat": hb}
        if draining_for is not None:
            body.update(draining=True, draining_since=wall - draining_for)
        live_result = HttpResult(ok=True, status=200, body=body)
    elif live == "unhealthy":
        live_result = HttpResult(
            ok=False,
            status=503,
            error="HTTP 503",
            body={"state": "unhealthy", "reason": "CUDA error", "heartbeat": {}},
        )
    elif live is None:
        live_result = None
    else:
        live_result = HttpResult(ok=False, error=live)
    return Sample(
        now=now,
        wall=wall,
        program_state=state,
        pid=pid,
        uptime_s=uptime,
        live=live_result,
        ready=HttpResult(ok=ready, status=200 if ready else 503) if live_result is not None else None,
        process_status=status,
        stopped_pid=stopped_child or (pid if status == "stopped" else None),
        rss_bytes=rss,
        gpu_used_bytes=gpu_used,
        gpu_total_bytes=gpu_total,
        gpu_app_bytes=gpu_app,
        log_events=list(events),
    )


def oom_event(line="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", pid=None):
    return LogEvent(line=line, pattern="CUDA out of memory", severity="error", action="restart", pid=pid)
