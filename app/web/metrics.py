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
