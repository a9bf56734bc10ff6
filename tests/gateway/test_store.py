"""The SQLite store on a real file: durability across reopen, idempotency, listing."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gateway.jobs import S, new_job_id, next_event, now
from gateway.store import JobFilter
from gateway.store.sqlite import SqliteStore
from jobmesh.v1 import job_pb2


def new_job(
    kind: str = "echo", *, key: str = "", labels: dict[str, str] | None = None
) -> job_pb2.Job:
    job = job_pb2.Job(
        id=new_job_id(),
        tenant="default",
        spec=job_pb2.JobSpec(
            kind=kind, inputs={"in": b"x" * 10}, idempotency_key=key, labels=labels
        ),
        state=S.JOB_STATE_QUEUED,
        attempt=1,
    )
    job.create_time.CopyFrom(now())
    return job


class Committed(list[job_pb2.JobEvent]):
    def __call__(self, events: Sequence[job_pb2.JobEvent]) -> None:
        self.extend(events)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "jobs.db"))
    await s.open(Committed())
    yield s
    await s.close()


async def insert(store: SqliteStore, *jobs: job_pb2.Job) -> list[job_pb2.Job]:
    inserted = await store.insert(jobs, [next_event(j) for j in jobs])
    return [i.job for i in inserted]


async def test_a_saved_job_and_its_events_survive_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    store = SqliteStore(path)
    committed = Committed()
    await store.open(committed)
    [job] = await insert(store, new_job())
    job.state = S.JOB_STATE_SUCCEEDED
    job.result.outputs["out"] = b"done"
    await store.save(job, next_event(job))
    await store.close()
    assert [e.seq for e in committed] == [1, 2]
    assert committed[-1].result.outputs["out"] == b"done"

    reopened = SqliteStore(path)
    await reopened.open(Committed())
    got = await reopened.get("default", job.id)
    assert got is not None
    assert got.state == S.JOB_STATE_SUCCEEDED
    assert got.spec.inputs["in"] == b"x" * 10
    assert got.result.outputs["out"] == b"done"
    events = await reopened.events(job.id, 0)
    assert [e.state for e in events] == [S.JOB_STATE_QUEUED, S.JOB_STATE_SUCCEEDED]
    assert await reopened.unfinished() == []
    await reopened.close()


async def test_an_idempotency_key_returns_the_first_job(store: SqliteStore) -> None:
    [first] = await insert(store, new_job(key="k1"))
    second = new_job(key="k1")
    [again] = await store.insert([second], [next_event(second)])
    assert again.existing
    assert again.job.id == first.id
    assert await store.get("default", second.id) is None


async def test_listing_filters_and_pages_newest_first(store: SqliteStore) -> None:
    jobs = await insert(
        store,
        *(new_job("a", labels={"team": "x"}) for _ in range(5)),
        *(new_job("b", labels={"team": "y"}) for _ in range(3)),
    )
    page = await store.list_jobs(JobFilter(tenant="default", kind="a"), 2, "")
    assert [j.id for j in page.jobs] == [jobs[4].id, jobs[3].id]
    assert page.jobs[0].spec.inputs == {}  # pages leave payloads out
    rest = await store.list_jobs(JobFilter(tenant="default", kind="a"), 10, page.last_id)
    assert [j.id for j in rest.jobs] == [jobs[2].id, jobs[1].id, jobs[0].id]
    assert rest.last_id == ""
    labelled = await store.list_jobs(JobFilter(tenant="default", labels=(("team", "y"),)), 10, "")
    assert {j.id for j in labelled.jobs} == {j.id for j in jobs[5:]}
    other_tenant = await store.list_jobs(JobFilter(tenant="someone-else"), 10, "")
    assert other_tenant.jobs == []


async def test_unfinished_jobs_come_back_in_submit_order(store: SqliteStore) -> None:
    jobs = await insert(store, new_job(), new_job(), new_job())
    jobs[1].state = S.JOB_STATE_FAILED
    await store.save(jobs[1], next_event(jobs[1]))
    assert [u.job.id for u in await store.unfinished()] == [jobs[0].id, jobs[2].id]


async def test_unfinished_leaves_inline_inputs_in_the_store_until_asked(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    store = SqliteStore(path)
    await store.open(Committed())
    bare = new_job()
    bare.spec.ClearField("inputs")
    with_inputs, without = await insert(store, new_job(), bare)
    await store.close()

    reopened = SqliteStore(path)
    await reopened.open(Committed())
    try:
        unfinished = await reopened.unfinished()
        assert [(u.job.id, u.inline_bytes) for u in unfinished] == [
            (with_inputs.id, 10),
            (without.id, 0),
        ]
        assert all(u.job.spec.inputs == {} for u in unfinished)
        assert unfinished[0].job.spec.kind == "echo"
        assert await reopened.inputs(with_inputs.id) == {"in": b"x" * 10}
        assert await reopened.inputs(without.id) == {}
        got = await reopened.get("default", with_inputs.id)  # Get shows them
        assert got is not None
        assert got.spec.inputs == {"in": b"x" * 10}
    finally:
        await reopened.close()


async def test_a_failing_write_fails_alone(store: SqliteStore) -> None:
    a, b = await insert(store, new_job(), new_job())
    duplicate = job_pb2.JobEvent(job_id=a.id, seq=1)  # seq 1 of `a` exists already
    b.state = S.JOB_STATE_RUNNING
    bad = store.save(a, duplicate)
    good = store.save(b, next_event(b))
    with pytest.raises(sqlite3.IntegrityError):
        await bad
    await good
    stored = await store.get("default", b.id)
    assert stored is not None
    assert stored.state == S.JOB_STATE_RUNNING
    assert [e.seq for e in await store.events(b.id, 0)] == [1, 2]


async def test_a_page_ends_before_it_grows_past_its_byte_limit(store: SqliteStore) -> None:
    jobs = await insert(store, *(new_job(labels={"pad": "x" * 200}) for _ in range(5)))
    one = (await store.list_jobs(JobFilter(tenant="default"), 10, "")).jobs[0].ByteSize()
    # Room for three and a half jobs, whatever the few bytes their timestamps differ by.
    room = int(3.5 * (one + 6))
    page = await store.list_jobs(JobFilter(tenant="default"), 10, "", max_bytes=room)
    assert [j.id for j in page.jobs] == [jobs[4].id, jobs[3].id, jobs[2].id]
    assert page.last_id == jobs[2].id
    tiny = await store.list_jobs(JobFilter(tenant="default"), 10, "", max_bytes=1)
    assert len(tiny.jobs) == 1  # always one, so paging goes on
    rest = await store.list_jobs(JobFilter(tenant="default"), 10, page.last_id, max_bytes=10**6)
    assert [j.id for j in rest.jobs] == [jobs[1].id, jobs[0].id]
    assert rest.last_id == ""
