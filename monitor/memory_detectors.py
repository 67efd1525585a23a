"""Memory detectors: GPU memory through NVML (pressure and its rising precursor) and the app tree's
RSS (the memory limit supervisord has no key for, and leak-like growth). Pure, like the others in
monitor/detectors.py: recent samples + settings → a finding or None."""

from __future__ import annotations

from typing import Optional, Sequence

from common.enums import Action, FindingKind, Severity
from monitor.config import MonitorSettings
from monitor.findings import Finding
from monitor.samples import Sample


def detect_vram_pressure(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """Used/total above the threshold for N samples, or a rising trend that crosses it soon."""
    gpu = [s for s in history if s.gpu_total_bytes]
    if not gpu:
        return None  # no GPU (or NVML absent): this rule stays quiet
    last = gpu[-1]
    frac = last.gpu_used_bytes / last.gpu_total_bytes
    evidence = {
        "used_bytes": last.gpu_used_bytes,
        "total_bytes": last.gpu_total_bytes,
        "used_fraction": round(frac, 4),
        "app_bytes": last.gpu_app_bytes,
        "threshold": cfg.vram_threshold,
        "gpu": last.gpu_name,
    }
    recent = gpu[-cfg.vram_samples :]
    if len(recent) >= cfg.vram_samples and all(
        s.gpu_used_bytes / s.gpu_total_bytes >= cfg.vram_threshold for s in recent
    ):
        return Finding(
            kind=FindingKind.vram_pressure,
            severity=Severity.warning,
            action=Action.free_cache,
            evidence=evidence,
            reason=f"GPU memory at {frac:.0%} (≥ {cfg.vram_threshold:.0%}) for {len(recent)} samples",
        )
    # The trend only counts while the app is serving: loading a model is memory rising on purpose.
    window = [
        s for s in gpu if s.now >= last.now - cfg.vram_trend_window_s and s.ready is not None and s.ready.ok
    ]
    slope = _slope([(s.now, s.gpu_used_bytes / s.gpu_total_bytes) for s in window])
    if (
        slope is not None
        and slope > 0
        and len(window) >= max(3, cfg.vram_samples)
        and window[-1].now - window[0].now >= cfg.vram_trend_window_s / 2
    ):
        eta = (cfg.vram_threshold - frac) / slope
        if 0 < eta <= cfg.vram_trend_horizon_s:
            evidence.update(trend_per_s=round(slope, 6), crosses_in_s=round(eta, 1))
            return Finding(
                kind=FindingKind.vram_pressure,
                severity=Severity.warning,
                action=Action.free_cache,
                evidence=evidence,
                reason=f"GPU memory at {frac:.0%} and rising: crosses {cfg.vram_threshold:.0%} "
                f"in about {eta:.0f} s (precursor)",
            )
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


def detect_memory(history: Sequence[Sample], cfg: MonitorSettings) -> Optional[Finding]:
    """The RSS limit (the memory limit supervisord cannot enforce) and leak-like growth."""
    if not history or history[-1].rss_bytes is None:
        return None
    last = history[-1]
    rss_mb = last.rss_bytes / 2**20
    if cfg.rss_limit_mb is not None and rss_mb > cfg.rss_limit_mb:
        return Finding(
            kind=FindingKind.memory_limit,
            severity=Severity.error,
            action=Action.restart,
            reason=f"app RSS {rss_mb:.0f} MiB is over the limit {cfg.rss_limit_mb} MiB",
            evidence={"rss_bytes": last.rss_bytes, "limit_mb": cfg.rss_limit_mb, "pid": last.pid},
        )
    # Growth counts only while the app serves: loading a model grows RSS on purpose.
    same = [
        s
        for s in history
        if s.pid == last.pid
        and s.rss_bytes is not None
        and s.ready is not None
        and s.ready.ok
        and s.now >= last.now - cfg.leak_window_s
    ]
    if not same or last.now - same[0].now < cfg.leak_min_span_s:
        return None
    low = min(same, key=lambda s: s.rss_bytes)
    growth_mb = (last.rss_bytes - low.rss_bytes) / 2**20
    if growth_mb > cfg.leak_growth_mb and low.now < last.now:
        return Finding(
            kind=FindingKind.leak,
            severity=Severity.warning,
            action=Action.restart,
            reason=f"app RSS grew {growth_mb:.0f} MiB in {last.now - low.now:.0f} s "
            f"(limit {cfg.leak_growth_mb} MiB per {cfg.leak_window_s:.0f} s)",
            evidence={
                "rss_bytes": last.rss_bytes,
                "low_rss_bytes": low.rss_bytes,
                "growth_mb": round(growth_mb, 1),
                "pid": last.pid,
            },
        )
    return None
