"""Finished jobs expire: purge removes them with their events, inputs and blob references,
leaves a tombstone so Get can say "expired", and (SQLite) gives the file's space back.
Each test runs on each store, as test_store.py's do."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from gateway.jobs import S, next_event, now, ts_seconds
from gateway.store import JobStore
from gateway.store.open import open_store
from gateway.store.sqlite import SqliteStore
from jobmesh.v1 import job_pb2
from tests.gateway.test_store import STORES, Committed, insert, new_job

RETENTION = 3600.0
BLOB_IN, BLOB_OUT, OTHER = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    db = (
        str(tmp_path / "jobs.db")
        if request.param == "sqlite"
        else request.getfixturevalue("pg_dsn")
    )
    s = open_store(db, retention=RETENTION)
    await s.open(Committed())
    yield s
    await s.close()


async def finish(store: JobStore, job: job_pb2.Job, state: int = S.JOB_STATE_SUCCEEDED) -> float:
    """Ends the job as the scheduler does; returns its end time."""
    job.state = state  # type: ignore[assignment]
    job.end_time.CopyFrom(now())
    await store.save(job, next_event(job))
    return ts_seconds(job.end_time)


async def test_a_job_with_its_own_retention_is_purged_once_it_expires(
    store: JobStore,
) -> None:
    job = new_job()
    job.spec.retention.CopyFrom(duration_pb2.Duration(seconds=1))
    [job] = await insert(store, job)
    end = await finish(store, job)

    assert await store.purge(end + 0.5, 100) == 0
    assert await store.get("default", job.id) is not None
    assert await store.purge(end + 2, 100) == 1
    assert await store.get("default", job.id) is None
    assert await store.events(job.id, 0) == []
    assert await store.inputs(job.id) == {}
    assert await store.expired("default", job.id)
    assert not await store.expired("someone-else", job.id)
    assert not await store.expired("default", "f" * 32)  # never existed


async def test_a_job_without_its_own_retention_keeps_the_default(store: JobStore) -> None:
    [job] = await insert(store, new_job())
    end = await finish(store, job, S.JOB_STATE_FAILED)
    assert await store.purge(end + 2, 100) == 0
    assert await store.purge(end + RETENTION - 1, 100) == 0
    assert await store.get("default", job.id) is not None
    assert await store.purge(end + RETENTION, 100) == 1
    assert await store.get("default", job.id) is None


async def test_unfinished_jobs_are_never_purged(store: JobStore) -> None:
    queued, running = await insert(store, new_job(), new_job())
    running.state = S.JOB_STATE_RUNNING
    await store.save(running, next_event(running))
    assert await store.purge(ts_seconds(queued.create_time) + 100 * RETENTION, 100) == 0
    assert await store.get("default", queued.id) is not None
    assert [u.job.id for u in await store.running()] == [running.id]


async def test_purge_goes_in_batches_and_tombstones_go_one_retention_later(
    store: JobStore,
) -> None:
    jobs = await insert(store, *(new_job() for _ in range(5)))
    ends = [await finish(store, job) for job in jobs]
    at = max(ends) + RETENTION
    assert [await store.purge(at, 2) for _ in range(4)] == [2, 2, 1, 0]
    assert all([await store.expired("default", job.id) for job in jobs])
    await store.purge(at + RETENTION - 1, 100)
    assert await store.expired("default", jobs[0].id)
    await store.purge(at + RETENTION, 100)
    assert not any([await store.expired("default", job.id) for job in jobs])


async def test_jobs_reference_their_blobs_until_they_are_purged(store: JobStore) -> None:
    job = new_job()
    job.spec.input_blobs["big"].CopyFrom(job_pb2.BlobRef(id=BLOB_IN, size=3))
    [job] = await insert(store, job)
    assert await store.referenced({BLOB_IN, BLOB_OUT, OTHER}) == {BLOB_IN}

    job.state = S.JOB_STATE_RUNNING
    job.result.output_blobs["out"].CopyFrom(job_pb2.BlobRef(id=BLOB_OUT, size=4))
    await store.save(job, next_event(job))
    assert await store.referenced({BLOB_OUT}) == set()  # not until the job SUCCEEDED
    end = await finish(store, job)
    assert await store.referenced({BLOB_IN, BLOB_OUT, OTHER}) == {BLOB_IN, BLOB_OUT}

    assert await store.purge(end + RETENTION, 100) == 1
    assert await store.referenced({BLOB_IN, BLOB_OUT, OTHER}) == set()


async def test_a_purge_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SqliteStore(str(path), retention=1.0)
    await store.open(Committed())
    try:
        jobs = []
        for _ in range(4):
            job = new_job()
            job.spec.inputs["big"] = bytes(1 << 20)
            jobs.extend(await insert(store, job))
        ends = [await finish(store, job) for job in jobs]
        await store.barrier()
        with sqlite3.connect(path) as conn:
            before = conn.execute("PRAGMA page_count").fetchone()[0]
        assert await store.purge(max(ends) + 2, 100) == 4
        with sqlite3.connect(path) as conn:
            after = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        await store.close()
    assert free == 0
    assert after < before / 4
