"""What only the PostgreSQL store has: gateways sharing one database (migrations, claims,
leases, quotas) and a server that goes away and comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.jobs import S, next_event
from gateway.store import Placement, Usage
from gateway.store.open import open_store
from gateway.store.pg_migrations import LATEST, SchemaTooNew
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore
from jobmesh.errors import ResourceExhausted, Unavailable
from tests.gateway.test_store import Committed, insert, new_job
from tests.postgres import PostgresCluster

pytestmark = pytest.mark.processes


@pytest.fixture
async def stores(pg_dsn: str) -> AsyncIterator[Callable[[], PostgresStore]]:
    """Opens stores on one database, as gateways sharing it do; closes them after."""
    opened: list[PostgresStore] = []

    def make() -> PostgresStore:
        store = PostgresStore(pg_dsn)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def test_a_postgresql_url_opens_a_postgres_store() -> None:
    for url in ("postgresql://gw@db.example/jobs", "postgres://gw@db.example/jobs"):
        assert isinstance(open_store(url, retention=1.0), PostgresStore)
    assert isinstance(open_store("jobs.db", retention=1.0), SqliteStore)


async def test_gateways_starting_at_once_apply_each_migration_once(
    stores: Callable[[], PostgresStore], postgres: PostgresCluster, pg_dsn: str
) -> None:
    # The second migration of one database would fail: its tables exist already.
    await asyncio.gather(*(stores().open(Committed()) for _ in range(3)))
    database = pg_dsn.rsplit("/", 1)[1]
    assert postgres.psql("SELECT version FROM schema_version", database) == str(LATEST)


async def test_a_database_of_a_newer_jobmesh_is_refused(
    stores: Callable[[], PostgresStore], postgres: PostgresCluster, pg_dsn: str
) -> None:
    await stores().open(Committed())
    postgres.psql(f"UPDATE schema_version SET version = {LATEST + 1}", pg_dsn.rsplit("/", 1)[1])
    with pytest.raises(SchemaTooNew, match=rf"schema version {LATEST + 1}.*newer jobmesh"):
        await stores().open(Committed())


async def test_gateways_claiming_one_queue_never_get_the_same_job(
    stores: Callable[[], PostgresStore],
) -> None:
    a, b = stores(), stores()
    await asyncio.gather(a.open(Committed()), b.open(Committed()))
    t = time.time()
    jobs = await insert(a, *(new_job() for _ in range(300)), placements=[Placement(t - 1)] * 300)
    taken: dict[str, list[str]] = {"a": [], "b": []}

    async def drain(name: str, store: PostgresStore) -> None:
        while found := await store.claim(name, "echo", "default", 7, t, t + 600):
            taken[name].extend(u.job.id for u in found)

    # Three claimers on each gateway's pool, all at once.
    await asyncio.gather(*(drain(name, s) for name, s in (("a", a), ("b", b)) for _ in range(3)))
    assert set(taken["a"]).isdisjoint(taken["b"])
    assert len(taken["a"]) + len(taken["b"]) == len(jobs)
    assert set(taken["a"]) | set(taken["b"]) == {j.id for j in jobs}
    assert taken["a"]  # both took part
    assert taken["b"]


async def test_a_lease_that_ended_is_free_for_another_gateway(
    stores: Callable[[], PostgresStore],
) -> None:
    a, b = stores(), stores()
    await asyncio.gather(a.open(Committed()), b.open(Committed()))
    t = time.time()
    live, ended = await insert(a, new_job(), new_job(), placements=[Placement(t - 1)] * 2)
    assert await a.claim_job("gw-a", "default", live.id, time.time() + 600) is not None
    assert await a.claim_job("gw-a", "default", ended.id, time.time() - 1) is not None
    assert await b.claim_job("gw-b", "default", live.id, time.time() + 600) is None
    taken = await b.claim_job("gw-b", "default", ended.id, t + 10_000)
    assert taken is not None
    assert taken.job.id == ended.id
    # And through the queue: gw-a's lease on `live` ends at t + 600.
    assert await b.claim("gw-b", "echo", "default", 5, t + 599, t + 900) == []
    [again] = await b.claim("gw-b", "echo", "default", 5, t + 601, t + 900)
    assert again.job.id == live.id


async def test_a_quota_holds_across_gateways(stores: Callable[[], PostgresStore]) -> None:
    a, b = stores(), stores()
    await asyncio.gather(a.open(Committed()), b.open(Committed()))

    def at_most_ten(usage: Usage, adding: Usage) -> None:
        if usage.queued + adding.queued > 10:
            raise ResourceExhausted("queue full")

    async def submit(store: PostgresStore) -> bool:
        job = new_job()
        try:
            await store.insert([job], [next_event(job)], at_most_ten)
        except ResourceExhausted:
            return False
        return True

    accepted = await asyncio.gather(*(submit(s) for s in (a, b) for _ in range(15)))
    assert sum(accepted) == 10
    assert (await b.usage("default")).queued == 10


async def test_committed_events_are_reported_in_commit_order(
    stores: Callable[[], PostgresStore],
) -> None:
    committed = Committed()
    store = stores()
    await store.open(committed)
    [a] = await insert(store, new_job())
    fresh = [new_job() for _ in range(3)]
    a.state = S.JOB_STATE_RUNNING
    calls: list[asyncio.Future[object]] = []
    # Inserts and saves made one after the other without waiting: reported in that order.
    for job in fresh:
        calls.append(asyncio.ensure_future(store.insert([job], [next_event(job)])))
        await asyncio.sleep(0)  # the insert is made
        calls.append(store.save(a, next_event(a)))
    await asyncio.gather(*calls)
    expected = [(a.id, 1)]
    for n, job in enumerate(fresh, 2):
        expected += [(job.id, 1), (a.id, n)]
    assert [(e.job_id, e.seq) for e in committed] == expected


async def test_while_its_server_is_down_a_store_keeps_state_changes_and_refuses_the_rest(
    stores: Callable[[], PostgresStore], postgres: PostgresCluster
) -> None:
    committed = Committed()
    store = stores()
    await store.open(committed)
    [job] = await insert(store, new_job())
    postgres.stop(kill=True)
    try:
        with pytest.raises(Unavailable):
            await store.get("default", job.id)
        # What the gateway already did is kept, in order, until the server is back ...
        job.state = S.JOB_STATE_RUNNING
        saved = store.save(job, next_event(job))
        barrier = store.barrier()
        # ... and what a caller can try again fails at once.
        with pytest.raises(Unavailable):
            await insert(store, new_job())
        with pytest.raises(Unavailable):
            await store.claim("gw", "echo", "default", 1, time.time(), time.time() + 9)
        with pytest.raises(Unavailable):
            await stores().open(Committed())
        assert not saved.done()
        assert not barrier.done()
    finally:
        postgres.start()
    await asyncio.wait_for(asyncio.gather(saved, barrier), 30)
    got = await store.get("default", job.id)
    assert got is not None
    assert got.state == S.JOB_STATE_RUNNING
    [other] = await insert(store, new_job())
    assert [e.seq for e in await store.events(job.id, 0)] == [1, 2]
    assert await store.get("default", other.id) is not None
    assert [e.job_id for e in committed] == [job.id, job.id, other.id]
