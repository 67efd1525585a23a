"""Detectors: pure functions of recent samples + settings + now → findings. No I/O, no clock of
their own; the tests drive them with hand-made samples and an injected `now`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from monitor.config import MonitorSettings
from monitor.samples import Sample

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2, "critical": 3}


@dataclass
class Finding:
    kind: str  # oom_in_log, vram_pressure, hang, leak, memory_limit, crash_loop, engine_unhealthy, app_fatal
    severity: str
    reason: str  # one sentence for humans
    action: str  # the tier this finding asks for: alert, free_cache, restart, kill, start
    evidence: dict = field(default_factory=dict)


def detect_oom_in_log(sample: Sample) -> Optional[Finding]:
    """New log lines matching the configured patterns (lines seen before never reach here)."""
    if not sample.log_events:
        return None
    worst = max(sample.log_events, key=lambda e: SEVERITY_RANK.get(e.severity, 0))
    tier_rank = {"alert": 0, "free_cache": 1, "restart": 2, "kill": 3}
    action = max((e.action for e in sample.log_events), key=lambda a: tier_rank[a])
    return Finding(kind="oom_in_log", severity=worst.severity, action=action,
                   reason=f"{len(sample.log_events)} new matching line(s) in the app log: /{worst.pattern}/",
                   evidence={"lines": [e.line[:500] for e in sample.log_events[-5:]],
                             "patterns": sorted({e.pattern for e in sample.log_events})})


def detect_vram_pressure(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """Used/total above the threshold for N samples, or a rising trend that crosses it soon."""
    gpu = [s for s in history if s.gpu_total_bytes]
    if not gpu:
        return None  # no GPU (or NVML absent): this rule stays quiet
    last = gpu[-1]
    frac = last.gpu_used_bytes / last.gpu_total_bytes
    evidence = {"used_bytes": last.gpu_used_bytes, "total_bytes": last.gpu_total_bytes,
                "used_fraction": round(frac, 4), "app_bytes": last.gpu_app_bytes, "threshold": cfg.vram_threshold,
                "gpu": last.gpu_name}
    recent = gpu[-cfg.vram_samples:]
    if len(recent) >= cfg.vram_samples and all(s.gpu_used_bytes / s.gpu_total_bytes >= cfg.vram_threshold
                                               for s in recent):
        return Finding(kind="vram_pressure", severity="warning", action="free_cache", evidence=evidence,
                       reason=f"GPU memory at {frac:.0%} (≥ {cfg.vram_threshold:.0%}) for {len(recent)} samples")
    # The trend only counts while the app is serving: loading a model is memory rising on purpose
    # (seen on the H100: a "precursor" at 26 % while the weights were being loaded).
    window = [s for s in gpu if s.now >= last.now - cfg.vram_trend_window_s and s.ready is not None and s.ready.ok]
    slope = _slope([(s.now, s.gpu_used_bytes / s.gpu_total_bytes) for s in window])
    if slope is not None and slope > 0 and len(window) >= max(3, cfg.vram_samples) \
            and window[-1].now - window[0].now >= cfg.vram_trend_window_s / 2:
        eta = (cfg.vram_threshold - frac) / slope
        if 0 < eta <= cfg.vram_trend_horizon_s:
            evidence.update(trend_per_s=round(slope, 6), crosses_in_s=round(eta, 1))
            return Finding(kind="vram_pressure", severity="warning", action="free_cache", evidence=evidence,
                           reason=f"GPU memory at {frac:.0%} and rising: crosses {cfg.vram_threshold:.0%} "
                                  f"in about {eta:.0f} s (precursor)")
    return None


def _slope(points: list[tuple[float, float]]) -> Optional[float]:
    """Least-squares slope; None for fewer than 2 distinct times."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def detect_hang(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """A stopped process, liveness timing out N times in a row, or busy with no step for too long.
    A long generation whose steps keep coming is never a hang."""
    if not history:
        return None
    last = history[-1]
    if last.program_state != "RUNNING":
        return None  # supervisord is (re)starting or stopped it: not ours to call a hang
    stopped = _tail(history, lambda s: s.pid == last.pid and s.process_status == "stopped")
    if stopped >= cfg.hang_stopped_samples:
        return Finding(kind="hang", severity="critical", action="kill",
                       reason=f"app process {last.pid} is stopped (state T) for {stopped} samples",
                       evidence={"pid": last.pid, "process_status": "stopped", "samples": stopped})

    def failed_live(s: Sample) -> bool:
        if s.pid != last.pid or s.live is None or s.live.ok:
            return False
        if s.live.timed_out:
            return True
        # refused/5xx while starting up is expected; after the grace it means the server is gone
        return s.uptime_s >= cfg.startup_grace_s and s.live.status is None

    failures = _tail(history, failed_live)
    if failures >= cfg.hang_liveness_failures:
        return Finding(kind="hang", severity="critical", action="kill",
                       reason=f"liveness probe failed {failures} times in a row ({last.live.error})",
                       evidence={"pid": last.pid, "failures": failures, "last_error": last.live.error,
                                 "probe_timeout_s": cfg.probe_timeout_s})
    hb = last.heartbeat
    if last.live and last.live.ok and hb and hb.get("busy") and hb.get("last_step_at"):
        slowest = max(hb.get("step_seconds_max") or 0.0, hb.get("step_seconds_ewma") or 0.0)
        bound = max(cfg.stall_floor_s, cfg.stall_factor * slowest)
        if hb.get("compiling_since"):
            bound = max(bound, cfg.compile_stall_s)
        silent = last.wall - hb["last_step_at"]
        if silent > bound:
            return Finding(kind="hang", severity="critical", action="kill",
                           reason=f"generation stalled: no denoising step for {silent:.0f} s (bound {bound:.0f} s)",
                           evidence={"pid": last.pid, "seconds_since_step": round(silent, 1), "bound_s": bound,
                                     "steps_done": hb.get("steps_done"), "steps_total": hb.get("steps_total"),
                                     "request_ids": hb.get("request_ids")})
    return None


def _tail(history: Sequence[Sample], predicate) -> int:
    """How many of the most recent samples satisfy predicate, counted back until one does not."""
    count = 0
    for s in reversed(history):
        if not predicate(s):
            break
        count += 1
    return count


def detect_memory(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """The RSS limit (the memory limit supervisord cannot enforce) and leak-like growth."""
    if not history or history[-1].rss_bytes is None:
        return None
    last = history[-1]
    rss_mb = last.rss_bytes / 2**20
    if cfg.rss_limit_mb is not None and rss_mb > cfg.rss_limit_mb:
        return Finding(kind="memory_limit", severity="error", action="restart",
                       reason=f"app RSS {rss_mb:.0f} MiB is over the limit {cfg.rss_limit_mb} MiB",
                       evidence={"rss_bytes": last.rss_bytes, "limit_mb": cfg.rss_limit_mb, "pid": last.pid})
    # Growth counts only while the app serves: loading a model grows RSS on purpose (seen on the
    # H100: 1 → 9.7 GB during from_pretrained, which a naive rule restarted as a "leak").
    same = [s for s in history if s.pid == last.pid and s.rss_bytes is not None and s.ready is not None
            and s.ready.ok and s.now >= last.now - cfg.leak_window_s]
    if not same or last.now - same[0].now < cfg.leak_min_span_s:
        return None
    low = min(same, key=lambda s: s.rss_bytes)
    growth_mb = (last.rss_bytes - low.rss_bytes) / 2**20
    if growth_mb > cfg.leak_growth_mb and low.now < last.now:
        return Finding(kind="leak", severity="warning", action="restart",
                       reason=f"app RSS grew {growth_mb:.0f} MiB in {last.now - low.now:.0f} s "
                              f"(limit {cfg.leak_growth_mb} MiB per {cfg.leak_window_s:.0f} s)",
                       evidence={"rss_bytes": last.rss_bytes, "low_rss_bytes": low.rss_bytes,
                                 "growth_mb": round(growth_mb, 1), "pid": last.pid})
    return None


def detect_engine_unhealthy(sample: Sample) -> Optional[Finding]:
    """The app says so itself: /healthz 503 with state unhealthy (fatal CUDA error) or failed (load)."""
    if sample.live and sample.live.status == 503 and sample.engine_state in ("unhealthy", "failed"):
        reason = (sample.live.body or {}).get("reason") or sample.engine_state
        return Finding(kind="engine_unhealthy", severity="critical", action="restart",
                       reason=f"the app reports its engine {sample.engine_state}: {reason}",
                       evidence={"state": sample.engine_state, "reason": reason, "pid": sample.pid})
    return None


def detect_crash_loop(unexpected_restarts: Sequence[float], sample: Sample, cfg: MonitorSettings) -> Optional[Finding]:
    """supervisord restarting the app by itself again and again (pid changes we did not cause)."""
    recent = [t for t in unexpected_restarts if t >= sample.now - cfg.crash_loop_window_s]
    if sample.program_state == "FATAL":
        return Finding(kind="app_fatal", severity="critical", action="start",
                       reason="supervisord gave up on the app (FATAL: it exited too quickly, startretries used)",
                       evidence={"restarts_in_window": len(recent)})
    if len(recent) >= cfg.crash_loop_count:
        return Finding(kind="crash_loop", severity="critical", action="alert",
                       reason=f"the app died and was restarted by supervisord {len(recent)} times in "
                              f"{cfg.crash_loop_window_s:.0f} s",
                       evidence={"restarts_in_window": len(recent), "state": sample.program_state})
    fresh = [t for t in recent if t >= sample.now - cfg.crash_report_s]
    if fresh:
        # One crash: supervisord already restarted it; on-call hears of it, the monitor need not act.
        return Finding(kind="crash", severity="warning", action="alert",
                       reason="the app died and supervisord restarted it",
                       evidence={"restarts_in_window": len(recent), "state": sample.program_state,
                                 "pid": sample.pid})
    return None


def detect_all(history: Sequence[Sample], unexpected_restarts: Sequence[float],
               cfg: MonitorSettings) -> list[Finding]:
    """Every finding for the newest sample, most urgent first."""
    last = history[-1]
    candidates = [
        detect_hang(history, cfg),
        detect_engine_unhealthy(last),
        detect_crash_loop(unexpected_restarts, last, cfg),
        detect_oom_in_log(last),
        detect_memory(history, cfg),
        detect_vram_pressure(history, cfg),
    ]
    found = [f for f in candidates if f is not None]
    return sorted(found, key=lambda f: -SEVERITY_RANK.get(f.severity, 0))
