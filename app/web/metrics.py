"""Prometheus metrics of the app, on a registry of its own (one per app instance, so tests can build
several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0, 120.0, 300.0)


class AppMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zimage_requests", "Generation requests by outcome", ["status"], registry=r)
        self.request_seconds = Histogram(
            "zimage_request_seconds", "End-to-end /api/generate latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.generation_seconds = Histogram(
            "zimage_generation_seconds", "Pipeline time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "zimage_queue_wait_seconds", "Time waiting for the engine", buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("zimage_images", "Images generated", registry=r)
        self.steps_per_second = Gauge(
            "zimage_steps_per_second", "Denoising steps per second, last batch", registry=r
        )
        self.oom = Counter("zimage_oom", "Generations that ran out of GPU memory", registry=r)
        self.outputs_files = Gauge("zimage_outputs_files", "PNG files kept in outputs/", registry=r)
        self.outputs_bytes = Gauge("zimage_outputs_bytes", "Bytes of PNG files kept in outputs/", registry=r)
        self.outputs_deleted = Counter(
            "zimage_outputs_deleted", "Output files removed by retention", registry=r
        )

    def on_batch_done(self, images: int, seconds: float, num_inference_steps: int) -> None:
        self.images.inc(images)
        self.generation_seconds.observe(seconds)
        if seconds > 0:
            self.steps_per_second.set(num_inference_steps / seconds)

    def add_live(self, live) -> None:
        """Register a collector for values read at scrape time (queue depth, readiness, GPU memory)."""
        self.registry.register(_LiveCollector(live))


def live_values(service) -> dict:
    """The values read at scrape time: queue, readiness, compile and cache counters, GPU memory."""
    engine = service.engine
    status = engine.status()
    values = {
        "zimage_queue_depth": ("Requests waiting for the engine", status.waiting),
        "zimage_in_flight": ("Requests being served (waiting, running or saving)", service.in_flight),
        "zimage_ready": ("1 when loaded, warmed and not draining", 1 if service.ready else 0),
        "zimage_draining": ("1 while draining for a restart", 1 if service.draining else 0),
        "zimage_busy": ("1 while a generation runs", 1 if status.heartbeat["busy"] else 0),
        "zimage_compiles_after_warmup": (
            "torch.compile runs a request waited for (0 when the warm-up covered every shape)",
            status.compiles_after_warmup,
        ),
    }
    if status.self_checks is not None:  # passed: requests that failed on their own (selfcheck.py)
        values["zimage_self_checks"] = (
            "Self-checks (the warm-up image again after failed generations) since start, by outcome",
            status.self_checks,
        )
    if status.model is not None:  # an alert on jit where aot is configured catches a fallback
        values["zimage_compile_backend"] = (
            "1 for how the transformer blocks run: aot (packages), jit "
            "(torch.compile) or none; why a start fell back is in the log's "
            "aot_* events",
            {status.model.compile_backend: 1},
        )
    if status.step_cache is not None:  # the lossy step cache at work: main-layer passes reused vs run
        values["zimage_step_cache_passes"] = (
            "Main-layer passes of the step cache since start, by outcome",
            status.step_cache,
        )
    memory = engine.memory()
    if memory:
        values["zimage_gpu_memory_bytes"] = (
            "GPU memory seen by torch",
            {
                "allocated": memory["allocated_bytes"],
                "reserved": memory["reserved_bytes"],
                "device_used": memory["device_total_bytes"] - memory["device_free_bytes"],
                "device_total": memory["device_total_bytes"],
            },
        )
    return values


class _LiveCollector:
    def __init__(self, live):
        self.live = live  # callable → dict of name → (help, value) or (help, {label: value})

    def collect(self):
        for name, (help_text, value) in self.live().items():
            if isinstance(value, dict):
                family = GaugeMetricFamily(name, help_text, labels=["kind"])
                for label, v in value.items():
                    family.add_metric([label], v)
            else:
                family = GaugeMetricFamily(name, help_text, value=value)
            yield family
