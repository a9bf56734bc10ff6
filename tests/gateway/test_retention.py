"""Retention end to end on a real store and blob directory: expired jobs go, then the blobs
only they used, while blobs of live jobs and fresh uploads stay."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from gateway.blobs import BlobStore
from gateway.jobs import S, next_event, now, ts_seconds
from gateway.retention import Retention, SweepReport
from gateway.store.sqlite import SqliteStore
from jobmesh.v1 import job_pb2
from tests.gateway.test_store import Committed, insert, new_job

GRACE = 3600.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "jobs.db"), retention=7 * 24 * 3600.0)
    await s.open(Committed())
    yield s
    await s.close()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", 1 << 20)


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def old_blob(blobs: BlobStore, data: bytes) -> job_pb2.BlobRef:
    ref = await blobs.put(len(data), "", chunks(data))
    then = time.time() - 2 * GRACE
    os.utime(blobs.root / ref.id[:2] / ref.id, (then, then))
    return ref


def exists(blobs: BlobStore, ref: job_pb2.BlobRef) -> bool:
    return blobs.size(ref.id) is not None


async def test_a_sweep_purges_expired_jobs_then_the_blobs_only_they_used(
    store: SqliteStore, blobs: BlobStore
) -> None:
    used = await old_blob(blobs, b"input of a job")
    unused = await old_blob(blobs, b"nobody's")
    fresh = await blobs.put(5, "", chunks(b"fresh"))  # uploaded, not yet submitted
    job = new_job()
    job.spec.input_blobs["big"].CopyFrom(used)
    job.spec.retention.CopyFrom(duration_pb2.Duration(seconds=1))
    [job] = await insert(store, job)
    retention = Retention(store, blobs, blob_grace=GRACE)

    assert await retention.sweep(time.time()) == SweepReport(jobs=0, blobs=1)
    assert exists(blobs, used)  # referenced, old as it is
    assert not exists(blobs, unused)
    assert exists(blobs, fresh)

    job.state = S.JOB_STATE_SUCCEEDED
    job.end_time.CopyFrom(now())
    await store.save(job, next_event(job))
    end = ts_seconds(job.end_time)
    assert await retention.sweep(end + 2) == SweepReport(jobs=1, blobs=1)
    assert await store.get("default", job.id) is None
    assert await store.expired("default", job.id)
    assert not exists(blobs, used)
    assert exists(blobs, fresh)


async def test_a_sweep_purges_in_batches_up_to_its_cap(
    store: SqliteStore, blobs: BlobStore
) -> None:
    jobs = await insert(store, *(new_job() for _ in range(7)))
    for job in jobs:
        job.state = S.JOB_STATE_CANCELLED
        job.end_time.CopyFrom(now())
        await store.save(job, next_event(job))
    later = time.time() + 30 * 24 * 3600
    retention = Retention(store, blobs, blob_grace=GRACE, batch=2, max_batches=2)
    assert (await retention.sweep(later)).jobs == 4
    assert (await retention.sweep(later)).jobs == 3
    assert (await retention.sweep(later)).jobs == 0


class FailingOnce:
    """A store whose first purge fails; the sweeps after it count themselves."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.purges = 0
        self.second = asyncio.Event()

    async def purge(self, now: float, limit: int) -> int:
        self.purges += 1
        if self.purges == 1:
            raise RuntimeError("disk on fire")
        self.second.set()
        return await self._store.purge(now, limit)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


async def test_run_goes_on_after_a_failed_sweep(
    store: SqliteStore, blobs: BlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    failing = FailingOnce(store)
    retention = Retention(failing, blobs, blob_grace=GRACE)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="gateway.retention"):
        task = asyncio.create_task(retention.run(interval=0.01))
        try:
            await asyncio.wait_for(failing.second.wait(), 30)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert "retention sweep failed" in caplog.text
    assert "disk on fire" in caplog.text
