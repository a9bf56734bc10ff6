"""jobmesh.v1.AdminService: what operators call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from gateway.jobs import duration_seconds, now
from gateway.metrics import GatewayMetrics, Snapshot, Totals
from gateway.scheduler import Scheduler
from jobmesh.errors import InvalidArgument
from jobmesh.v1 import admin_service_pb2, admin_service_pb2_grpc

MIN_INTERVAL = 0.1
MAX_INTERVAL = 60.0


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, scheduler: Scheduler, metrics: GatewayMetrics) -> None:
        self._scheduler = scheduler
        self._metrics = metrics

    async def _workers(self) -> list[admin_service_pb2.Worker]:
        """This gateway's workers, then those of the others sharing its database."""
        here = [s.to_proto() for s in sorted(self._scheduler.sessions, key=lambda s: s.worker_id)]
        if here and self._scheduler.shared:
            for worker in here:
                worker.gateway = self._scheduler.name
        elsewhere = await self._scheduler.mesh_workers()
        return here + sorted(elsewhere, key=lambda w: (w.gateway, w.worker_id))

    async def ListWorkers(
        self,
        request: admin_service_pb2.ListWorkersRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_service_pb2.ListWorkersResponse:
        return admin_service_pb2.ListWorkersResponse(workers=await self._workers())

    async def WatchStats(
        self,
        request: admin_service_pb2.WatchStatsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[admin_service_pb2.WatchStatsResponse]:
        interval = duration_seconds(request.interval)
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise InvalidArgument(
                f"must be from {MIN_INTERVAL:g}s to {MAX_INTERVAL:g}s, got {interval:g}s",
                "interval",
            )
        previous: tuple[float, Totals] | None = None
        while True:
            await self._scheduler.refresh_queue_ages(interval)
            at = time.monotonic()
            snapshot = self._metrics.snapshot()
            stats = self._stats(snapshot, previous, at)
            stats.workers.extend(await self._workers())
            previous = (at, snapshot.totals)
            yield admin_service_pb2.WatchStatsResponse(stats=stats)
            await asyncio.sleep(interval)

    def _stats(
        self, snapshot: Snapshot, previous: tuple[float, Totals] | None, at: float
    ) -> admin_service_pb2.ClusterStats:
        stats = admin_service_pb2.ClusterStats(
            kinds=[
                _kind_stats(kind, snapshot)
                for kind in sorted({*snapshot.queued, *snapshot.running})
            ],
            totals=admin_service_pb2.JobCounts(
                submitted=snapshot.totals.submitted,
                completed=snapshot.totals.completed,
                failed=snapshot.totals.failed,
                cancelled=snapshot.totals.cancelled,
            ),
            recent_jobs=snapshot.recent_jobs,
            success_rate=snapshot.success_rate,
        )
        stats.time.CopyFrom(now())
        stats.mean_processing_time.FromNanoseconds(round(snapshot.mean_processing_seconds * 1e9))
        stats.period.SetInParent()  # zero in the first update, as its rates
        stats.rates.SetInParent()
        if previous is not None:
            since, before = previous
            period = max(at - since, 1e-9)
            totals = snapshot.totals
            stats.period.FromNanoseconds(round(period * 1e9))
            stats.rates.CopyFrom(
                admin_service_pb2.JobRates(
                    submitted_per_second=(totals.submitted - before.submitted) / period,
                    completed_per_second=(totals.completed - before.completed) / period,
                    failed_per_second=(totals.failed - before.failed) / period,
                    cancelled_per_second=(totals.cancelled - before.cancelled) / period,
                )
            )
        return stats


def _kind_stats(kind: str, snapshot: Snapshot) -> admin_service_pb2.KindStats:
    stats = admin_service_pb2.KindStats(
        kind=kind, queued=snapshot.queued.get(kind, 0), running=snapshot.running.get(kind, 0)
    )
    stats.oldest_queued_age.FromNanoseconds(round(snapshot.oldest_ages.get(kind, 0.0) * 1e9))
    return stats
