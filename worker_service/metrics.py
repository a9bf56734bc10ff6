"""The worker replica's Prometheus metrics, kept in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobmesh.metrics import DURATION_BUCKETS
from jobmesh.v1 import job_pb2
from worker_service.outcomes import Outcome


class WorkerMetrics:
    """What one replica runs; the replica reports each attempt's start and end."""

    def __init__(self, registry: CollectorRegistry | None = None, *, slots: int = 0) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self._active = Gauge("jobmesh_worker_active_jobs", "Attempts running now.", registry=r)
        self._slots = Gauge("jobmesh_worker_slots", "Attempts run at once, at most.", registry=r)
        self._slots.set(slots)
        self._pool = Gauge(
            "jobmesh_worker_pool_processes", "Live processes of the handler pool.", registry=r
        )
        self._connected = Gauge(
            "jobmesh_worker_connected", "1 while the session with the gateway is up.", registry=r
        )
        self._done = Counter(
            "jobmesh_worker_jobs_done", "Attempts that succeeded, by kind.", ["kind"], registry=r
        )
        self._failed = Counter(
            "jobmesh_worker_jobs_failed",
            "Attempts that failed, by kind and error code.",
            ["kind", "code"],
            registry=r,
        )
        self._duration = Histogram(
            "jobmesh_worker_handler_duration_seconds",
            "Time from taking an attempt to its outcome (inputs fetched, handler run), by kind.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def watch(self, *, pool_processes: Callable[[], int], connected: Callable[[], bool]) -> None:
        """Gauges read at scrape time (from the scrape's thread: keep them cheap and safe)."""
        self._pool.set_function(lambda: float(pool_processes()))
        self._connected.set_function(lambda: float(connected()))

    def started(self, kind: str) -> None:
        self._active.inc()

    def finished(self, kind: str, outcome: Outcome, seconds: float) -> None:
        self._active.dec()
        self._duration.labels(kind).observe(seconds)
        if isinstance(outcome, job_pb2.JobResult):
            self._done.labels(kind).inc()
        else:
            self._failed.labels(kind, outcome.code).inc()
