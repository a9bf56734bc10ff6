"""Schema versions: a file of the first release upgrades in place; a newer one is refused."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from gateway.jobs import S, next_event
from gateway.store import JobFilter, Unfinished, legacy
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
# What jobs of the first release held as Structs: params (JobSpec field 3) and a result's
# metadata (JobResult field 2; the result is Job field 8 and JobEvent field 10).
OLD_PARAMS = {"width": 256, "big": 2**53 - 1, "ratio": 0.5, "name": "é", "tags": ["a", 2]}
OLD_METADATA = {"format": "png", "pixels": 65536, "box": {"w": 256, "h": 0}}


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand: today's messages have no field
    for a Struct here."""
    out = bytearray()
    for value in (number << 3 | 2, len(payload)):
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


def _struct(values: dict[str, Any]) -> bytes:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct.SerializeToString()


def _add_old_params_and_metadata(path: Path) -> None:
    """Gives the fixture's jobs params and metadata as the first release stored them (a
    field appended to a message is merged into it, as protobuf reads it)."""
    metadata = _field(2, _struct(OLD_METADATA))
    changes = [
        ("jobs", "spec", "id = ?", (QUEUED_ID,), _field(3, _struct(OLD_PARAMS))),
        ("jobs", "status", "id = ?", (SUCCEEDED_ID,), _field(8, metadata)),
        ("events", "data", "job_id = ? AND seq = 3", (SUCCEEDED_ID,), _field(10, metadata)),
    ]
    with sqlite3.connect(path) as conn:
        for table, column, where, key, field in changes:
            [(data,)] = conn.execute(f"SELECT {column} FROM {table} WHERE {where}", key)
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (data + field, *key))


def pragma(path: Path, name: str) -> int:
    with sqlite3.connect(path) as conn:
        value: int = conn.execute(f"PRAGMA {name}").fetchone()[0]
    return value


async def test_a_database_of_the_first_release_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "jobmesh.db"
    shutil.copy(FIXTURE, path)
    _add_old_params_and_metadata(path)
    assert pragma(path, "user_version") == 0
    store = SqliteStore(str(path), retention=RETENTION)
    await store.open(Committed())
    try:
        queued = await store.get("default", QUEUED_ID)
        assert queued is not None
        assert queued.state == S.JOB_STATE_QUEUED
        assert queued.spec.inputs == {"in": b"queued input", "more": b"\x00\x01\x02"}
        assert queued.spec.labels == {"team": "a"}
        # Integers were doubles in a Struct; they read back as the integers submitted.
        params = json.loads(queued.spec.params_json)
        assert params == OLD_PARAMS
        assert [type(params[k]) for k in ("width", "big", "ratio")] == [int, int, float]
        succeeded = await store.get("default", SUCCEEDED_ID)
        assert succeeded is not None
        assert succeeded.state == S.JOB_STATE_SUCCEEDED
        assert succeeded.spec.inputs == {"small": b"inline"}
        assert succeeded.spec.input_blobs["big"].id == INPUT_BLOB
        assert succeeded.spec.start_to_close_timeout.seconds == 30
        assert succeeded.result.outputs == {"out": b"thumbnail"}
        assert succeeded.result.output_blobs["large"].id == OUTPUT_BLOB
        metadata = json.loads(succeeded.result.metadata_json)
        assert metadata == OLD_METADATA
        assert type(metadata["pixels"]) is int
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
        assert json.loads(events[-1].result.metadata_json) == OLD_METADATA
        assert [e.state for e in await store.events(FAILED_ID, 0)] == [
            S.JOB_STATE_QUEUED,
            S.JOB_STATE_FAILED,
        ]

        # Version 9 put the queued job in its queue, ready since it was submitted.
        [depth] = await store.queue_depths(time.time())
        assert (depth.tenant, depth.queued, depth.oldest_ready_at) == ("default", 1, START)
        [unfinished] = await queued_jobs(store)
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
        assert [u.job.id for u in await queued_jobs(store)] == [QUEUED_ID]
    finally:
        await store.close()
    assert pragma(path, "user_version") == LATEST
    assert pragma(path, "auto_vacuum") == 2  # incremental

    reopened = SqliteStore(str(path))
    await reopened.open(Committed())
    try:
        assert await reopened.inputs(QUEUED_ID) == {"in": b"queued input", "more": b"\x00\x01\x02"}
        [unfinished] = await queued_jobs(reopened)
        assert json.loads(unfinished.job.spec.params_json) == OLD_PARAMS
    finally:
        await reopened.close()


async def queued_jobs(store: SqliteStore) -> list[Unfinished]:
    """Every queued job, each queue's claimed and given back."""
    found = []
    for depth in await store.queue_depths(time.time()):
        claimed = await store.claim("t", depth.kind, depth.tenant, 100, time.time(), math.inf)
        await store.release([item.job.id for item in claimed])
        found.extend(claimed)
    return found


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ({}, ""),
        (
            {"n": 3, "x": 2.5, "s": "a", "b": True, "z": None},
            '{"b":true,"n":3,"s":"a","x":2.5,"z":null}',
        ),
        # Past 2^53 a double is no longer sure to have been an integer: it stays a number.
        (
            {"big": 2.0**60, "edge": -(2**53 - 1)},
            '{"big":1.152921504606847e+18,"edge":-9007199254740991}',
        ),
        # JSON has no NaN or Infinity: kept, spelled as protobuf's JSON spells them.
        ({"l": [float("nan"), {"i": float("-inf")}]}, '{"l":["NaN",{"i":"-Infinity"}]}'),
    ],
)
def test_an_old_struct_becomes_json_text_without_losing_a_value(
    values: dict[str, Any], text: str
) -> None:
    assert legacy.struct_json(_struct(values)) == text


def test_rows_without_old_fields_are_left_byte_for_byte() -> None:
    status = new_job().SerializeToString()
    assert legacy.status(status) is status
    spec = new_job().spec.SerializeToString()
    assert legacy.spec(spec) is spec


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
