"""The gateway's metrics: Prometheus series, and the counts WatchStats reports.

The scheduler calls `GatewayMetrics` on the event loop at a few points of a job's life
(submitted, a state change, enqueued, assigned, ended). The /metrics endpoint answers
from threads of its own; what it reads of the workers is taken on the event loop.
Job counters and gauges are by kind and tenant; histograms by kind only, as a tenant
label would multiply their buckets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.jobs import S, ts_seconds
from gateway.workers import WorkerSession
from jobmesh.metrics import DURATION_BUCKETS
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)

RECENT_JOBS = 100
"""Success rate and mean processing time are over this many of the latest ended jobs."""
SCRAPE_TIMEOUT = 2.0
"""Seconds a scrape waits for the event loop to list the workers."""

_RUNNING = frozenset({S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})
_ENDED = {
    S.JOB_STATE_SUCCEEDED: "completed",
    S.JOB_STATE_FAILED: "failed",
    S.JOB_STATE_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class Totals:
    """Jobs since the gateway started."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass(frozen=True)
class Snapshot:
    totals: Totals
    queued: dict[str, int]
    """Kind -> jobs QUEUED (waiting for a worker or a retry's backoff)."""
    running: dict[str, int]
    """Kind -> jobs ASSIGNED or RUNNING."""
    oldest_ages: dict[str, float]
    """Kind -> seconds its oldest job ready to run has waited in the queue."""
    recent_jobs: int
    """Jobs (SUCCEEDED or FAILED, the latest RECENT_JOBS) the next two are over."""
    success_rate: float
    mean_processing_seconds: float
    """Mean time from assignment to the end, of those of the recent jobs that ran."""


# Label values kept apart at most; later new ones count as OTHER, so clients inventing kinds
# or workers inventing error codes cannot grow the gateway's metrics (and scrapes) forever.
MAX_KINDS = 500
MAX_CODES = 100
MAX_TENANTS = 100
OTHER = "_other"


class LabelValues:
    """Maps a label value to itself while fewer than `limit` values were seen, else OTHER."""

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return OTHER


class GatewayMetrics:
    """The gateway's counts, kept in `registry` (one per gateway)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        by = ["kind", "tenant"]
        self._submitted = PromCounter(
            "jobmesh_gateway_jobs_submitted", "Jobs accepted, by kind and tenant.", by, registry=r
        )
        self._completed = PromCounter(
            "jobmesh_gateway_jobs_completed",
            "Jobs that SUCCEEDED, by kind and tenant.",
            by,
            registry=r,
        )
        self._failed = PromCounter(
            "jobmesh_gateway_jobs_failed",
            "Jobs that FAILED, by kind, tenant and error code.",
            [*by, "code"],
            registry=r,
        )
        self._cancelled = PromCounter(
            "jobmesh_gateway_jobs_cancelled", "Jobs CANCELLED, by kind and tenant.", by, registry=r
        )
        self._queue_depth = Gauge(
            "jobmesh_gateway_queue_depth",
            "Jobs QUEUED (waiting for a worker or a retry's backoff), by kind and tenant.",
            by,
            registry=r,
        )
        self._queue_age = Gauge(
            "jobmesh_gateway_queue_oldest_age_seconds",
            "How long the oldest job ready to run has waited in its queue, by kind and tenant "
            "(0: none waits).",
            by,
            registry=r,
        )
        self._running_gauge = Gauge(
            "jobmesh_gateway_jobs_running",
            "Jobs ASSIGNED to a worker or RUNNING, by kind and tenant.",
            by,
            registry=r,
        )
        self._duration = Histogram(
            "jobmesh_gateway_job_duration_seconds",
            "Time from Submit to the end of a job, retries included, by kind and end state.",
            ["kind", "state"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._queue_wait = Histogram(
            "jobmesh_gateway_queue_wait_seconds",
            "Time a job waited in its queue before a worker was assigned, per attempt, by kind.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._workers = _WorkersCollector()
        r.register(self._workers)
        self._totals: Counter[str] = Counter()
        self._queued: Counter[tuple[str, str]] = Counter()
        """(kind, tenant) label values -> jobs QUEUED."""
        self._running: Counter[tuple[str, str]] = Counter()
        self._oldest: dict[tuple[str, str], float] = {}
        """(kind, tenant) label values -> the ready_at of its oldest ready job."""
        self._recent: deque[tuple[bool, float | None]] = deque(maxlen=RECENT_JOBS)
        """(succeeded, seconds from assignment to the end or None) of the latest ended jobs."""
        self._kinds = LabelValues(MAX_KINDS)
        self._tenants = LabelValues(MAX_TENANTS)
        self._codes = LabelValues(MAX_CODES)

    def watch_workers(
        self, sessions: Callable[[], Iterable[WorkerSession]], loop: asyncio.AbstractEventLoop
    ) -> None:
        """Lets scrapes list the attached workers: `sessions()` is called on `loop`."""
        self._workers.sessions = sessions
        self._workers.loop = loop

    # --- what the scheduler reports -------------------------------------------

    def _labels(self, job: job_pb2.Job) -> tuple[str, str]:
        """The job's (kind, tenant) label values."""
        return self._kinds(job.spec.kind), self._tenants(job.tenant)

    def submitted(self, job: job_pb2.Job) -> None:
        """A new job, QUEUED."""
        labels = self._labels(job)
        self._submitted.labels(*labels).inc()
        self._totals["submitted"] += 1
        self._count(labels, job.state, +1)

    def recovered(self, job: job_pb2.Job) -> None:
        """An unfinished job of a previous run, taken back in its state."""
        self._count(self._labels(job), job.state, +1)

    def state_changed(self, job: job_pb2.Job, state: int) -> None:
        """`job` (still in its old state) goes to `state`."""
        if job.state != state:
            labels = self._labels(job)
            self._count(labels, job.state, -1)
            self._count(labels, state, +1)

    def queued_in_store(self, kind: str, tenant: str, count: int) -> None:
        """`count` jobs of a previous run wait QUEUED in the store."""
        labels = self._kinds(kind), self._tenants(tenant)
        self._count(labels, S.JOB_STATE_QUEUED, count)

    def queue_ages(self, oldest: Iterable[tuple[str, str, float | None]]) -> None:
        """Each queue's (kind, tenant, ready_at of its oldest ready job or None), store-wide."""
        found: dict[tuple[str, str], float] = {}
        for kind, tenant, ready_at in oldest:
            labels = self._kinds(kind), self._tenants(tenant)
            if ready_at is not None:
                found[labels] = min(ready_at, found.get(labels, ready_at))
        for labels in self._oldest.keys() - found.keys():
            self._queue_age.labels(*labels).set(0)
        now = time.time()
        for labels, ready_at in found.items():
            self._queue_age.labels(*labels).set(max(0.0, now - ready_at))
        self._oldest = found

    def oldest_ages(self, now: float) -> dict[str, float]:
        """Kind -> seconds its oldest ready job has waited (over every tenant)."""
        ages: dict[str, float] = {}
        for (kind, _), ready_at in self._oldest.items():
            ages[kind] = max(ages.get(kind, 0.0), now - ready_at)
        return ages

    def assigned(self, job: job_pb2.Job, waited: float | None) -> None:
        """A worker was given the job after it `waited` seconds in its queue (None: unknown)."""
        if waited is not None:
            self._queue_wait.labels(self._kinds(job.spec.kind)).observe(max(0.0, waited))

    def ended(self, job: job_pb2.Job) -> None:
        """`job` reached its terminal state, with its end time set."""
        outcome = _ENDED.get(job.state, "")
        if not outcome:
            return
        self._totals[outcome] += 1
        labels = self._labels(job)
        kind = labels[0]
        if job.state == S.JOB_STATE_SUCCEEDED:
            self._completed.labels(*labels).inc()
        elif job.state == S.JOB_STATE_FAILED:
            self._failed.labels(*labels, self._codes(job.error.code)).inc()
        else:
            self._cancelled.labels(*labels).inc()
        end = ts_seconds(job.end_time)
        self._duration.labels(kind, outcome).observe(max(0.0, end - ts_seconds(job.create_time)))
        if job.state != S.JOB_STATE_CANCELLED:
            ran = None
            last = job.attempts[-1] if job.attempts else None
            if last is not None and last.number == job.attempt and last.HasField("start_time"):
                ran = max(0.0, end - ts_seconds(last.start_time))
            self._recent.append((job.state == S.JOB_STATE_SUCCEEDED, ran))

    # --- what WatchStats reads ------------------------------------------------

    def snapshot(self) -> Snapshot:
        recent = list(self._recent)
        ran = [seconds for _, seconds in recent if seconds is not None]
        return Snapshot(
            totals=Totals(**self._totals),
            queued=_by_kind(self._queued),
            running=_by_kind(self._running),
            oldest_ages=self.oldest_ages(time.time()),
            recent_jobs=len(recent),
            success_rate=sum(ok for ok, _ in recent) / len(recent) if recent else 0.0,
            mean_processing_seconds=sum(ran) / len(ran) if ran else 0.0,
        )

    def _count(self, labels: tuple[str, str], state: int, delta: int) -> None:
        if state == S.JOB_STATE_QUEUED:
            self._queued[labels] += delta
            self._queue_depth.labels(*labels).set(self._queued[labels])
        elif state in _RUNNING:
            self._running[labels] += delta
            self._running_gauge.labels(*labels).set(self._running[labels])


def _by_kind(counts: Counter[tuple[str, str]]) -> dict[str, int]:
    """Kind -> its count over every tenant, for kinds whose count is not 0."""
    found: Counter[str] = Counter()
    for (kind, _), n in counts.items():
        found[kind] += n
    return {kind: n for kind, n in found.items() if n}


class _WorkersCollector(Collector):
    """Per-worker gauges, read at scrape time so that departed workers drop out."""

    def __init__(self) -> None:
        self.sessions: Callable[[], Iterable[WorkerSession]] = tuple
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self._rows()
        sessions = GaugeMetricFamily(
            "jobmesh_gateway_sessions", "Worker replicas attached (one session each)."
        )
        sessions.add_metric([], len(rows))
        active = GaugeMetricFamily(
            "jobmesh_gateway_worker_active_jobs",
            "Jobs handed to the worker and not yet ended, by worker.",
            labels=["worker_id"],
        )
        slots = GaugeMetricFamily(
            "jobmesh_gateway_worker_slots",
            "Jobs the worker runs at once, by worker.",
            labels=["worker_id"],
        )
        for worker_id, n_active, n_slots in rows:
            active.add_metric([worker_id], n_active)
            slots.add_metric([worker_id], n_slots)
        yield from (sessions, active, slots)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # unknown until scraped; do not read the workers at registration

    def _rows(self) -> list[tuple[str, int, int]]:
        def rows() -> list[tuple[str, int, int]]:
            return [(s.worker_id, len(s.inflight), s.slots) for s in self.sessions()]

        loop = self.loop
        if loop is None:
            return rows()
        try:
            if asyncio.get_running_loop() is loop:
                return rows()
        except RuntimeError:
            pass  # a scrape thread: ask the loop
        if loop.is_closed():
            return []
        future: concurrent.futures.Future[list[tuple[str, int, int]]] = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                future.set_result(rows())
            except Exception as exc:
                future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(on_loop)
            return future.result(SCRAPE_TIMEOUT)
        except Exception:
            log.warning("metrics: could not list the workers in time", exc_info=True)
            return []
