"""Nothing grows forever: expired jobs are purged, then blobs no job uses are deleted.

Jobs go first, so that the blobs only they referenced can go in the same sweep (once
their grace is over). Both are bounded per sweep; what is left waits for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.blobs import BlobStore
from gateway.store import JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    jobs: int
    """Expired jobs purged, with their events and inputs."""
    blobs: int
    """Blob files deleted."""


class Retention:
    """Sweeps the store and the blob directory; `run` does it every `interval` seconds.

    A sweep purges up to `batch` jobs at a time, in separate writes so that other writes
    go between them, and at most `max_batches` batches; then up to `blob_limit` blobs
    unreferenced for `blob_grace` seconds.
    """

    def __init__(
        self,
        store: JobStore,
        blobs: BlobStore,
        *,
        blob_grace: float,
        batch: int = 500,
        max_batches: int = 20,
        blob_limit: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._blob_grace = blob_grace
        self._batch = batch
        self._max_batches = max_batches
        self._blob_limit = blob_limit
        self._clock = clock

    async def sweep(self, now: float | None = None) -> SweepReport:
        """One sweep, as of `now` (time.time() seconds; the clock's time if None)."""
        now = self._clock() if now is None else now
        jobs = 0
        for _ in range(self._max_batches):
            purged = await self._store.purge(now, self._batch)
            jobs += purged
            if purged < self._batch:
                break
        older_than = now - self._blob_grace

        async def disown(blob_ids: list[str]) -> None:
            # Their tenants no longer store them (their quotas' stored bytes).
            await self._store.forget_owners(blob_ids, before=older_than)

        blobs = await self._blobs.sweep(
            self._store.referenced,
            older_than=older_than,
            limit=self._blob_limit,
            deleted=disown,
        )
        return SweepReport(jobs=jobs, blobs=blobs)

    async def run(self, interval: float) -> None:
        """Sweeps now and then every `interval` seconds until cancelled; a failed sweep is
        logged and the next one goes ahead."""
        while True:
            try:
                report = await self.sweep()
            except Exception:
                log.exception("retention sweep failed; the next one is in %g s", interval)
            else:
                if report.jobs or report.blobs:
                    log.info(
                        "retention: purged %d expired jobs, deleted %d unused blobs",
                        report.jobs,
                        report.blobs,
                    )
            await asyncio.sleep(interval)
