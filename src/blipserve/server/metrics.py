"""Prometheus metrics, one registry per server (so tests can run several apps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Everything ``GET /metrics`` reports; the online engine's observer
    (:class:`~blipserve.engine.online.OnlineObserver`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "blipserve_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "blipserve_request_seconds",
            "Whole-request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_rows = Gauge("blipserve_queue_rows", "Rows waiting for the model", registry=r)
        self.batch_size = Histogram(
            "blipserve_batch_size", "Rows per model batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "blipserve_queue_wait_seconds",
            "Time a row waited for its batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            "blipserve_decode_seconds",
            "Time to fetch and decode one request's images",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_time = Histogram(
            "blipserve_model_seconds",
            "Time of one model batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("blipserve_images", "Images run through the model", registry=r)
        self.out_of_memory = Counter(
            "blipserve_out_of_memory_retries",
            "Model calls that ran out of memory (their rows ran again in smaller calls)",
            registry=r,
        )
        self.batch_size_limit = Gauge(
            "blipserve_batch_size_limit",
            "Rows per model call that fit in memory: the fewest any generation setting is "
            "down to, else --max-batch-size",
            registry=r,
        )
        self._out_of_memory_seen = 0
        self.jobs = Gauge(
            "blipserve_jobs",
            "Batch jobs (POST /jobs) in the job table, by status, as this server last read it",
            ["status"],
            registry=r,
        )
        self.image_errors = Counter(
            "blipserve_image_errors",
            "Rows refused before the model (bad image or text)",
            registry=r,
        )

    # OnlineObserver
    def decoded(self, seconds: float, bad_rows: int) -> None:
        self.decode_time.observe(seconds)
        if bad_rows:
            self.image_errors.inc(bad_rows)

    def queue_depth(self, rows: int) -> None:
        self.queue_rows.set(rows)

    def batch_done(self, size: int, queue_waits_s: Sequence[float], model_s: float) -> None:
        self.batch_size.observe(size)
        self.model_time.observe(model_s)
        self.images.inc(size)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)

    def memory(self, out_of_memory_calls: int, batch_size_limit: int) -> None:
        """What the engine's batch sizer has seen (read when metrics are scraped)."""
        self.out_of_memory.inc(max(0, out_of_memory_calls - self._out_of_memory_seen))
        self._out_of_memory_seen = max(self._out_of_memory_seen, out_of_memory_calls)
        self.batch_size_limit.set(batch_size_limit)

    def jobs_by_status(self, counts: Mapping[str, int]) -> None:
        """The job table's statuses (read when metrics are scraped)."""
        for status, count in counts.items():
            self.jobs.labels(status).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
