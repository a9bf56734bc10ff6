"""Schema versions: a file of the first release upgrades in place; a newer one is refused."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from gateway.jobs import S, next_event
from gateway.store import JobFilter
from gateway.store.migrations import LATEST, SchemaTooNew
from gateway.store.sqlite import SqliteStore
from tests.gateway.fixtures.make_jobmesh_v1 import (
    FAILED_ID,
    INPUT_BLOB,
    OUTPUT_BLOB,
    QUEUED_ID,
    START,
    SUCCEEDED_ID,
)
from tests.gateway.test_store import Committed, new_job

FIXTURE = Path(__file__).parent / "fixtures" / "jobmesh-v1.db"
RETENTION = 100.0


def pragma(path: Path, name: str) -> int:
    with sqlite3.connect(path) as conn:
        value: int = conn.execute(f"PRAGMA {name}").fetchone()[0]
    return value


async def test_a_database_of_the_first_release_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "jobmesh.db"
    shutil.copy(FIXTURE, path)
    assert pragma(path, "user_version") == 0
    store = SqliteStore(str(path), retention=RETENTION)
    await store.open(Committed())
    try:
        queued = await store.get("default", QUEUED_ID)
        assert queued is not None
        assert queued.state == S.JOB_STATE_QUEUED
        assert queued.spec.inputs == {"in": b"queued input", "more": b"\x00\x01\x02"}
        assert queued.spec.labels == {"team": "a"}
        succeeded = await store.get("default", SUCCEEDED_ID)
        assert succeeded is not None
        assert succeeded.state == S.JOB_STATE_SUCCEEDED
        assert succeeded.spec.inputs == {"small": b"inline"}
        assert succeeded.spec.input_blobs["big"].id == INPUT_BLOB
        assert succeeded.spec.start_to_close_timeout.seconds == 30
        assert succeeded.result.outputs == {"out": b"thumbnail"}
        assert succeeded.result.output_blobs["large"].id == OUTPUT_BLOB
        failed = await store.get("default", FAILED_ID)
        assert failed is not None
        assert failed.error.code == "HANDLER_ERROR"

        assert [e.seq for e in await store.events(QUEUED_ID, 0)] == [1]
        events = await store.events(SUCCEEDED_ID, 0)
        assert [e.state for e in events] == [
            S.JOB_STATE_QUEUED,
            S.JOB_STATE_RUNNING,
            S.JOB_STATE_SUCCEEDED,
        ]
        assert [e.state for e in await store.events(FAILED_ID, 0)] == [
            S.JOB_STATE_QUEUED,
            S.JOB_STATE_FAILED,
        ]

        [unfinished] = await store.unfinished()
        assert unfinished.job.id == QUEUED_ID
        assert unfinished.job.spec.inputs == {}
        assert unfinished.inline_bytes == len(b"queued input") + 3
        assert await store.inputs(QUEUED_ID) == queued.spec.inputs

        page = await store.list_jobs(JobFilter(tenant="default"), 10, "")
        assert [j.id for j in page.jobs] == [FAILED_ID, SUCCEEDED_ID, QUEUED_ID]
        assert all(not j.spec.inputs and not j.result.outputs for j in page.jobs)
        again = new_job(key="k-queued")
        [existing] = await store.insert([again], [next_event(again)])
        assert existing.existing
        assert existing.job.id == QUEUED_ID

        # Blobs the old jobs use are referenced; jobs that had ended expire a retention later.
        assert await store.referenced({INPUT_BLOB, OUTPUT_BLOB, "3" * 64}) == {
            INPUT_BLOB,
            OUTPUT_BLOB,
        }
        assert await store.purge(START + 5 + RETENTION - 1, 10) == 0
        assert await store.purge(START + 5 + RETENTION, 10) == 1
        assert await store.expired("default", SUCCEEDED_ID)
        assert await store.purge(START + 6 + RETENTION, 10) == 1
        assert await store.referenced({INPUT_BLOB, OUTPUT_BLOB}) == set()
        assert [u.job.id for u in await store.unfinished()] == [QUEUED_ID]
    finally:
        await store.close()
    assert pragma(path, "user_version") == LATEST
    assert pragma(path, "auto_vacuum") == 2  # incremental

    reopened = SqliteStore(str(path))
    await reopened.open(Committed())
    try:
        assert await reopened.inputs(QUEUED_ID) == {"in": b"queued input", "more": b"\x00\x01\x02"}
    finally:
        await reopened.close()


async def test_a_new_database_starts_at_the_latest_version(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    store = SqliteStore(str(path))
    await store.open(Committed())
    await store.close()
    assert pragma(path, "user_version") == LATEST
    assert pragma(path, "auto_vacuum") == 2


async def test_a_database_of_a_newer_jobmesh_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, something_new BLOB)")
        conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    store = SqliteStore(str(path))
    with pytest.raises(SchemaTooNew, match=rf"schema version {LATEST + 1}.*newer jobmesh"):
        await store.open(Committed())
    await store.close()
    assert pragma(path, "user_version") == LATEST + 1  # left as it was
