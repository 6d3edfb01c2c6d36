"""Prometheus metrics of one serving app, in a registry of its own (no process-wide state).

Requests and errors by endpoint and status, latency histograms by endpoint, routed experts,
abstentions, batch sizes (routing forwards and answer batches) and router swaps, served by
`GET /metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from modal_jobs.serving.inference import Route

# Seconds: from a few ms (a batched route on a GPU) to a long CPU answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    """The counters and histograms the app updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mole_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "mole_request_errors",
            "HTTP requests answered with a 4xx or 5xx status, by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mole_request_seconds",
            "Time from a request's arrival to its answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.routed = Counter(
            "mole_routed", "Requests routed, by expert.", ["expert"], registry=self.registry
        )
        self.abstained = Counter(
            "mole_abstentions",
            "Routes whose top probability was under the threshold (answered by the base model).",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mole_batch_size",
            "Requests per batched run: 'route' forwards and per-adapter 'answer' batches.",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def follow(self, swaps: Callable[[], float], failures: Callable[[], float]) -> None:
        """Expose the server's router swaps and failed router loads (read at each scrape)."""
        Gauge(
            "mole_router_swaps",
            "Newly deployed routers swapped in since the server started.",
            registry=self.registry,
        ).set_function(swaps)
        Gauge(
            "mole_router_load_failures",
            "Newly deployed routers that failed to load (the previous one kept serving).",
            registry=self.registry,
        ).set_function(failures)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint).inc()
        self.latency.labels(endpoint).observe(seconds)

    def route(self, route: Route) -> None:
        """Count a routing decision."""
        self.routed.labels(route.expert).inc()
        if route.abstained:
            self.abstained.inc()

    def batch(self, kind: str, size: int) -> None:
        """Record the size of one batched run."""
        self.batch_size.labels(kind).observe(size)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
