"""The job store's contract, on each store for real: a SQLite file and a PostgreSQL database.

Durability across reopen, idempotency, listing, the queue (claims, leases, places, depths),
write order and usage. What only PostgreSQL has is in test_store_postgres.py.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import pytest

from gateway.jobs import S, new_job_id, next_event, now
from gateway.store import (
    ANY_TENANT,
    CLAIM_INPUT_BYTES,
    JobFilter,
    JobStore,
    Placement,
    QueueDepth,
    StoredSchema,
    Usage,
)
from gateway.store.open import is_postgres, open_store
from jobmesh.errors import ResourceExhausted
from jobmesh.v1 import job_pb2

RETENTION = 7 * 24 * 3600.0
# The stores every contract test runs on; PostgreSQL starts a server (tests/postgres.py).
STORES = [
    pytest.param("sqlite"),
    pytest.param("postgresql", marks=pytest.mark.processes),
]


def new_job(
    kind: str = "echo",
    *,
    key: str = "",
    labels: dict[str, str] | None = None,
    tenant: str = "default",
    priority: int = 0,
) -> job_pb2.Job:
    job = job_pb2.Job(
        id=new_job_id(),
        tenant=tenant,
        spec=job_pb2.JobSpec(
            kind=kind,
            inputs={"in": b"x" * 10},
            idempotency_key=key,
            labels=labels,
            priority=priority,
        ),
        state=S.JOB_STATE_QUEUED,
        attempt=1,
    )
    job.create_time.CopyFrom(now())
    return job


class Committed(list[job_pb2.JobEvent]):
    def __call__(self, events: Sequence[job_pb2.JobEvent]) -> None:
        self.extend(events)


@pytest.fixture(params=STORES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store of each kind keeps its jobs: a file, or a new database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.fixture
async def store(db: str) -> AsyncIterator[JobStore]:
    s = open_store(db, retention=RETENTION)
    await s.open(Committed())
    yield s
    await s.close()


async def insert(
    store: JobStore, *jobs: job_pb2.Job, placements: Sequence[Placement] | None = None
) -> list[job_pb2.Job]:
    inserted = await store.insert(jobs, [next_event(j) for j in jobs], placements=placements)
    return [i.job for i in inserted]


async def move(store: JobStore, job: job_pb2.Job, state: int) -> None:
    job.state = state  # type: ignore[assignment]
    await store.save(job, next_event(job))


def ids(found: Sequence[object]) -> list[str]:
    return [item.job.id for item in found]  # type: ignore[attr-defined]


async def test_a_saved_job_and_its_events_survive_reopening(db: str) -> None:
    store = open_store(db, retention=RETENTION)
    committed = Committed()
    await store.open(committed)
    [job] = await insert(store, new_job())
    job.state = S.JOB_STATE_SUCCEEDED
    job.result.outputs["out"] = b"done"
    await store.save(job, next_event(job))
    await store.close()
    assert [e.seq for e in committed] == [1, 2]
    assert committed[-1].result.outputs["out"] == b"done"

    reopened = open_store(db, retention=RETENTION)
    await reopened.open(Committed())
    got = await reopened.get("default", job.id)
    assert got is not None
    assert got.state == S.JOB_STATE_SUCCEEDED
    assert got.spec.inputs["in"] == b"x" * 10
    assert got.result.outputs["out"] == b"done"
    events = await reopened.events(job.id, 0)
    assert [e.state for e in events] == [S.JOB_STATE_QUEUED, S.JOB_STATE_SUCCEEDED]
    assert await reopened.running() == []
    await reopened.close()


async def test_an_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    [first] = await insert(store, new_job(key="k1"))
    second = new_job(key="k1")
    [again] = await store.insert([second], [next_event(second)])
    assert again.existing
    assert again.job.id == first.id
    assert again.job.spec.inputs == {}
    assert await store.get("default", second.id) is None


async def test_a_key_repeated_within_one_batch_returns_its_first_job(store: JobStore) -> None:
    one, two = new_job(key="k"), new_job(key="k")
    [first, again] = await store.insert([one, two], [next_event(one), next_event(two)])
    assert not first.existing
    assert again.existing
    assert again.job.id == one.id
    assert (await store.usage("default")).queued == 1


async def test_listing_filters_and_pages_newest_first(store: JobStore) -> None:
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
    await move(store, jobs[0], S.JOB_STATE_FAILED)
    failed = await store.list_jobs(
        JobFilter(tenant=ANY_TENANT, states=(S.JOB_STATE_FAILED,)), 9, ""
    )
    assert [j.id for j in failed.jobs] == [jobs[0].id]


async def test_running_jobs_come_back_in_submit_order(store: JobStore) -> None:
    jobs = await insert(store, new_job(), new_job(), new_job(), new_job())
    await move(store, jobs[2], S.JOB_STATE_RUNNING)
    await move(store, jobs[1], S.JOB_STATE_FAILED)
    await move(store, jobs[0], S.JOB_STATE_ASSIGNED)
    # jobs[3] is QUEUED: it stays in the store for a claim.
    assert ids(await store.running()) == [jobs[0].id, jobs[2].id]


async def test_running_leaves_inline_inputs_in_the_store_until_asked(db: str) -> None:
    store = open_store(db, retention=RETENTION)
    await store.open(Committed())
    bare = new_job()
    bare.spec.ClearField("inputs")
    with_inputs, without = await insert(store, new_job(), bare)
    for job in (with_inputs, without):
        await move(store, job, S.JOB_STATE_RUNNING)
    await store.close()

    reopened = open_store(db, retention=RETENTION)
    await reopened.open(Committed())
    try:
        running = await reopened.running()
        assert [(u.job.id, u.inline_bytes) for u in running] == [
            (with_inputs.id, 10),
            (without.id, 0),
        ]
        assert all(u.job.spec.inputs == {} for u in running)
        assert running[0].job.spec.kind == "echo"
        assert await reopened.inputs(with_inputs.id) == {"in": b"x" * 10}
        assert await reopened.inputs(without.id) == {}
        got = await reopened.get("default", with_inputs.id)  # Get shows them
        assert got is not None
        assert got.spec.inputs == {"in": b"x" * 10}
    finally:
        await reopened.close()


async def test_a_failing_write_fails_alone(store: JobStore, db: str) -> None:
    a, b = await insert(store, new_job(), new_job())
    duplicate = job_pb2.JobEvent(job_id=a.id, seq=1)  # seq 1 of `a` exists already
    b.state = S.JOB_STATE_RUNNING
    bad = store.save(a, duplicate)
    good = store.save(b, next_event(b))
    conflict = asyncpg.UniqueViolationError if is_postgres(db) else sqlite3.IntegrityError
    with pytest.raises(conflict):
        await bad
    await good
    stored = await store.get("default", b.id)
    assert stored is not None
    assert stored.state == S.JOB_STATE_RUNNING
    assert [e.seq for e in await store.events(b.id, 0)] == [1, 2]


async def test_a_failing_insert_fails_alone(db: str) -> None:
    committed = Committed()
    store = open_store(db, retention=RETENTION)
    await store.open(committed)
    try:
        [a] = await insert(store, new_job())
        twin = job_pb2.Job()
        twin.CopyFrom(a)  # the same id again
        fresh = new_job()
        a.state = S.JOB_STATE_RUNNING
        # Made together, so that a store may commit them together.
        bad, good, saved = await asyncio.gather(
            store.insert([twin], [next_event(twin)]),
            store.insert([fresh], [next_event(fresh)]),
            store.save(a, next_event(a)),
            return_exceptions=True,
        )
        conflict = asyncpg.UniqueViolationError if is_postgres(db) else sqlite3.IntegrityError
        assert isinstance(bad, conflict)
        assert not isinstance(good, BaseException)
        assert saved is None
        assert await store.get("default", fresh.id) is not None
        assert sorted((e.job_id, e.seq) for e in committed) == sorted(
            [(a.id, 1), (fresh.id, 1), (a.id, 2)]
        )
    finally:
        await store.close()


async def test_saves_not_awaited_take_effect_in_call_order(db: str) -> None:
    committed = Committed()
    store = open_store(db, retention=RETENTION)
    await store.open(committed)
    try:
        [job] = await insert(store, new_job())
        states = [S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED]
        for state in states:
            job.state = state
            store.save(job, next_event(job))  # not awaited, as the scheduler does
        await store.barrier()
        got = await store.get("default", job.id)
        assert got is not None
        assert got.state == S.JOB_STATE_SUCCEEDED
        assert [e.state for e in committed] == [S.JOB_STATE_QUEUED, *states]
        assert [e.seq for e in await store.events(job.id, 1)] == [2, 3, 4]
    finally:
        await store.close()


async def test_a_page_ends_before_it_grows_past_its_byte_limit(store: JobStore) -> None:
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


# --- the queue -----------------------------------------------------------------


async def test_a_claim_takes_ready_jobs_by_priority_then_age(store: JobStore) -> None:
    t = time.time()
    low_old, high, low_new, later, elsewhere = (
        new_job(),
        new_job(priority=5),
        new_job(),
        new_job(priority=9),
        new_job("other"),
    )
    await insert(
        store,
        low_new,
        later,
        high,
        low_old,
        elsewhere,
        placements=[
            Placement(t - 1),
            Placement(t + 60),  # not ready yet, whatever its priority
            Placement(t - 1),
            Placement(t - 5),
            Placement(t - 9),
        ],
    )
    claimed = await store.claim("gw1", "echo", "default", 10, t, t + 100)
    assert ids(claimed) == [high.id, low_old.id, low_new.id]
    assert [u.ready_at for u in claimed] == [t - 1, t - 5, t - 1]
    assert claimed[1].inline_bytes == 10
    assert claimed[1].job.spec.inputs == {}  # inputs unread
    assert await store.claim("gw2", "echo", "default", 10, t, t + 30) == []
    assert ids(await store.claim("gw2", "echo", "default", 10, t + 61, t + 90)) == [later.id]


async def test_a_lease_keeps_others_off_until_it_ends_or_is_released(store: JobStore) -> None:
    t = time.time()
    a, b = await insert(
        store, new_job(), new_job(), placements=[Placement(t - 2), Placement(t - 1)]
    )
    assert ids(await store.claim("gw1", "echo", "default", 1, t, t + 30)) == [a.id]
    assert ids(await store.claim("gw2", "echo", "default", 5, t + 10, t + 40)) == [b.id]
    # gw1's lease has ended by t + 31: gw2 takes `a` over.
    assert ids(await store.claim("gw2", "echo", "default", 5, t + 31, t + 60)) == [a.id]
    await store.release([a.id, b.id])
    assert ids(await store.claim("gw3", "echo", "default", 5, t + 32, t + 60)) == [a.id, b.id]


async def test_claim_job_takes_one_job_unless_another_holds_it(store: JobStore) -> None:
    t = time.time()
    [job] = await insert(store, new_job(), placements=[Placement(t + 3600)])
    held = await store.claim_job("gw1", "default", job.id, t + 600)  # ready or not
    assert held is not None
    assert held.job.id == job.id
    assert held.ready_at == t + 3600
    assert await store.claim_job("gw2", ANY_TENANT, job.id, t + 600) is None
    assert await store.claim_job("gw1", "default", job.id, t + 900) is not None  # its own
    assert await store.claim_job("gw1", "someone-else", job.id, t + 900) is None
    await store.release([job.id])
    assert await store.claim_job("gw2", ANY_TENANT, job.id, t + 600) is not None
    await move(store, job, S.JOB_STATE_CANCELLED)
    assert await store.claim_job("gw2", "default", job.id, t + 600) is None  # not QUEUED


async def test_due_jobs_are_claimed_to_be_failed(store: JobStore) -> None:
    t = time.time()
    overdue, due_later, never = await insert(
        store,
        new_job(),
        new_job(),
        new_job(),
        placements=[Placement(t, due_at=t - 1), Placement(t, due_at=t + 60), Placement(t)],
    )
    assert await store.next_times(t) == (None, t - 1)
    assert ids(await store.claim_due("gw1", t, 10, t + 30)) == [overdue.id]
    assert await store.claim_due("gw2", t, 10, t + 30) == []  # leased to gw1
    assert await store.next_times(t) == (None, t + 60)
    assert ids(await store.claim_due("gw2", t + 61, 10, t + 90)) == [overdue.id, due_later.id]
    assert never.id not in ids(await store.claim_due("gw3", t + 10**6, 10, t + 10**6))


async def test_next_times_say_when_a_delayed_job_gets_ready(store: JobStore) -> None:
    t = time.time()
    assert await store.next_times(t) == (None, None)
    await insert(
        store,
        new_job(),
        new_job(),
        new_job(),
        placements=[Placement(t - 1), Placement(t + 30), Placement(t + 20, due_at=t + 90)],
    )
    assert await store.next_times(t) == (t + 20, t + 90)
    assert await store.next_times(t + 25) == (t + 30, t + 90)


async def test_a_save_puts_a_job_back_in_its_queue(store: JobStore) -> None:
    t = time.time()
    [job] = await insert(store, new_job(), placements=[Placement(t - 1)])
    assert ids(await store.claim("gw1", "echo", "default", 1, t, t + 30)) == [job.id]
    await move(store, job, S.JOB_STATE_RUNNING)
    assert (await store.usage("default")).queued == 0
    # A retry after a backoff: queued again, ready later, leased to no one.
    job.state = S.JOB_STATE_QUEUED
    job.attempt = 2
    await store.save(job, next_event(job), Placement(t + 10))
    assert (await store.usage("default")).queued == 1
    assert await store.claim("gw2", "echo", "default", 1, t + 5, t + 30) == []
    [again] = await store.claim("gw2", "echo", "default", 1, t + 10, t + 30)
    assert again.job.attempt == 2
    assert again.ready_at == t + 10


async def test_a_placement_with_an_owner_stays_leased_to_it(store: JobStore) -> None:
    t = time.time()
    kept, leased = await insert(
        store,
        new_job(),
        new_job(),
        placements=[Placement(t - 1, owner="gw1"), Placement(t - 1, owner="gw1", lease_until=t)],
    )
    # A lease without an end lasts until it is released; one with an end, until then.
    assert ids(await store.claim("gw2", "echo", "default", 5, t + 1, t + 30)) == [leased.id]
    await store.release([kept.id])
    assert ids(await store.claim("gw2", "echo", "default", 5, t + 1, t + 30)) == [kept.id]


async def test_queue_depths_count_every_queue_store_wide(store: JobStore) -> None:
    t = time.time()
    jobs = await insert(
        store,
        new_job("a"),
        new_job("a"),
        new_job("a"),
        new_job("b"),
        placements=[Placement(t - 5), Placement(t - 9), Placement(t + 60), Placement(t + 60)],
    )
    await insert(store, new_job("a", tenant="t2"), placements=[Placement(t - 1)])
    await store.claim("gw1", "a", "default", 1, t, t + 30)  # claimed jobs are still queued
    assert await store.queue_depths(t) == [
        QueueDepth("a", "default", 3, t - 9),
        QueueDepth("a", "t2", 1, t - 1),
        QueueDepth("b", "default", 1, None),  # none ready yet
    ]
    await move(store, jobs[3], S.JOB_STATE_CANCELLED)
    await move(store, jobs[0], S.JOB_STATE_ASSIGNED)
    assert await store.queue_depths(t) == [
        QueueDepth("a", "default", 2, t - 9),
        QueueDepth("a", "t2", 1, t - 1),
    ]


# --- usage ---------------------------------------------------------------------


async def test_usage_counts_queued_jobs_and_inline_bytes(store: JobStore) -> None:
    jobs = await insert(store, new_job(), new_job(), new_job())
    assert await store.usage("default") == Usage(queued=3, stored_bytes=30)
    await move(store, jobs[0], S.JOB_STATE_RUNNING)
    assert await store.usage("default") == Usage(queued=2, stored_bytes=30)
    assert await store.usage("nobody") == Usage()
    await store.own_blob("a" * 64, "default", "alice", time.time(), fresh=True, size=100)
    await store.own_blob("a" * 64, "default", "bob", time.time(), fresh=False, size=100)
    assert (await store.usage("default")).stored_bytes == 130  # once, however many owners
    await store.forget_owners(["a" * 64], time.time() + 1)
    assert (await store.usage("default")).stored_bytes == 30


async def test_a_refused_insert_leaves_nothing(store: JobStore) -> None:
    await insert(store, new_job())

    def at_most_two(usage: Usage, adding: Usage) -> None:
        if usage.queued + adding.queued > 2:
            raise ResourceExhausted("queue full")

    batch = [new_job(), new_job()]
    with pytest.raises(ResourceExhausted):
        await store.insert(batch, [next_event(j) for j in batch], at_most_two)
    assert await store.get("default", batch[0].id) is None
    assert await store.usage("default") == Usage(queued=1, stored_bytes=10)
    [ok] = await store.insert(batch[:1], [next_event(batch[0])], at_most_two)
    assert not ok.existing


# --- blobs and schemas -----------------------------------------------------------

BLOB = "b" * 64


async def test_a_tenant_sees_the_blobs_it_uploaded_or_its_jobs_reference(store: JobStore) -> None:
    await store.own_blob(BLOB, "t1", "alice", time.time(), fresh=True, size=5)
    job = new_job(tenant="t2")
    job.spec.input_blobs["in"].CopyFrom(job_pb2.BlobRef(id=BLOB, size=5))
    await insert(store, job)
    assert await store.blob_visible("t1", BLOB)
    assert await store.blob_visible("t2", BLOB)
    assert not await store.blob_visible("t3", BLOB)
    assert await store.blob_visible(ANY_TENANT, BLOB)
    assert await store.referenced([BLOB, "c" * 64]) == {BLOB}
    assert await store.blob_uploaded_by("alice", BLOB)
    assert not await store.blob_uploaded_by("bob", BLOB)
    # A new file of the same content: the owners of the one swept before are forgotten.
    await store.own_blob(BLOB, "t1", "bob", time.time(), fresh=True, size=5)
    assert not await store.blob_uploaded_by("alice", BLOB)
    assert await store.blob_uploaded_by("bob", BLOB)
    assert (await store.usage("t1")).stored_bytes == 5


async def test_a_schema_keeps_when_it_was_first_and_last_declared(store: JobStore) -> None:
    first = StoredSchema("echo", "default", "d1", b"schema", first_seen=1.0, last_seen=1.0)
    store.declare_schema(first)  # not awaited: in call order, as saves
    store.declare_schema(StoredSchema("echo", "default", "d1", b"schema", 5.0, 5.0))
    await store.declare_schema(StoredSchema("echo", ANY_TENANT, "d2", b"other", 2.0, 2.0))
    assert sorted(await store.schemas(), key=lambda s: s.digest) == [
        StoredSchema("echo", "default", "d1", b"schema", 1.0, 5.0),
        StoredSchema("echo", ANY_TENANT, "d2", b"other", 2.0, 2.0),
    ]


async def test_a_claim_reads_small_inline_inputs_with_their_job(store: JobStore) -> None:
    small = new_job()
    large = new_job()
    large.spec.inputs["in"] = b"y" * (CLAIM_INPUT_BYTES + 1)
    await store.insert([small, large], [next_event(small), next_event(large)])
    claimed = await store.claim("g", "echo", "default", 10, time.time() + 1, math.inf)
    inputs = {
        item.job.id: None if item.inputs is None else job_pb2.JobSpec.FromString(item.inputs).inputs
        for item in claimed
    }
    # Small ones come with the claim, so that dispatch reads nothing per job; large ones are
    # read when their job is assigned.
    assert inputs == {small.id: {"in": b"x" * 10}, large.id: None}
    assert [item.inline_bytes for item in claimed] == [10, CLAIM_INPUT_BYTES + 1]
