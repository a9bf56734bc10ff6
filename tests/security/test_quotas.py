"""Quotas and fairness between tenants: queued jobs, stored bytes and submits per second are
refused past a tenant's quota (RESOURCE_EXHAUSTED naming it); dispatch takes tenants in
weighted turns within a priority and holds a tenant at its max_running; job metrics carry
the tenant."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import pytest

from gateway import auth
from gateway.auth import AuthFileError
from gateway.blobs import BlobStore
from gateway.config import GatewaySettings
from gateway.jobs import S, next_event
from gateway.quotas import Quota, SubmitRate, quotas_of
from gateway.retention import Retention
from gateway.scheduler import Scheduler
from gateway.sessions import apply
from gateway.store import Usage
from gateway.store.sqlite import SqliteStore
from gateway.workers import WorkerSession
from jobmesh import AsyncClient, JobState, ResourceExhausted, job_spec
from jobmesh.errors import JobmeshError
from jobmesh.v1 import dispatcher_pb2, job_pb2
from tests.cluster import Cluster
from tests.gateway.test_store import Committed, new_job
from tests.gateway.test_store_migrations import FIXTURE
from tests.integration.test_telemetry import free_port, metrics_flags, scrape, value
from tests.security.auth_fixtures import ALICE, BOB, WORKER, HandWorker, Who, secured

CAROL = Who("carol-app", "team-c", ("client",), "carol-Xe4rT7yWq2Za")
A, B = ALICE.tenant, BOB.tenant


async def refusal(call: object) -> ResourceExhausted:
    """The ResourceExhausted an SDK call (a coroutine) fails with."""
    try:
        await call  # type: ignore[misc]
    except ResourceExhausted as e:
        return e
    except JobmeshError as e:
        raise AssertionError(f"refused otherwise: {e!r}") from e
    raise AssertionError("the call succeeded")


# --- the auth file -------------------------------------------------------------------


def test_a_principals_quota_is_its_tenants() -> None:
    alice = dataclasses.replace(
        ALICE,
        quota='{ max_queued = 10000, max_stored_bytes = "10GiB", submits_per_second = 200,'
        " max_running = 50, weight = 2 }",
    )
    # Another principal of team-a without a quota: the tenant's applies to it too.
    batch = Who("alice-batch", A, ("client",), "alice-batch-9Lm2")
    found = auth.parse(alice.toml() + batch.toml() + BOB.toml())
    assert found.quotas == {
        A: Quota(
            max_queued=10000,
            max_stored_bytes=10 << 30,
            submits_per_second=200.0,
            max_running=50,
            weight=2.0,
        )
    }
    # The same quota on two principals of a tenant is one quota.
    again = dataclasses.replace(batch, quota=alice.quota)
    assert auth.parse(alice.toml() + again.toml()).quotas[A] == found.quotas[A]


@pytest.mark.parametrize(
    ("quota", "message"),
    [
        ("{ max_queued = 0 }", "max_queued must be a whole number of at least 1"),
        ("{ max_running = 2.5 }", "max_running must be a whole number of at least 1"),
        ('{ max_stored_bytes = "lots" }', "max_stored_bytes must be a size"),
        ("{ weight = -1 }", "weight must be a number above 0"),
        ("{ submits_per_second = true }", "submits_per_second must be a number above 0"),
        ("{ max_jobs = 3 }", "unknown key 'max_jobs'"),
        ("3", "must be an inline table"),
    ],
)
def test_a_bad_quota_is_refused_naming_its_principal(quota: str, message: str) -> None:
    with pytest.raises(AuthFileError, match=rf"'alice-app'\): quota: {message}"):
        auth.parse(dataclasses.replace(ALICE, quota=quota).toml())


def test_two_principals_of_a_tenant_cannot_give_it_different_quotas() -> None:
    alice = dataclasses.replace(ALICE, quota="{ max_queued = 10 }")
    other = Who("alice-batch", A, ("client",), "alice-batch-9Lm2", quota="{ max_queued = 20 }")
    with pytest.raises(AuthFileError) as raised:
        auth.parse(alice.toml() + other.toml())
    assert "'alice-batch'" in str(raised.value)
    assert "differs from the one 'alice-app' gives tenant 'team-a'" in str(raised.value)


def test_a_quota_of_every_tenant_is_refused() -> None:
    worker = dataclasses.replace(WORKER, quota="{ max_running = 3 }")
    with pytest.raises(AuthFileError, match=r"a quota is a tenant's, and tenant \"\*\""):
        auth.parse(worker.toml())


# --- submits per second -------------------------------------------------------------


def test_submits_per_second_is_a_bucket_of_one_seconds_worth() -> None:
    clock = [100.0]
    rate = SubmitRate(clock=lambda: clock[0])
    rate.take(A, 3, 4.0)
    rate.take(A, 1, 4.0)  # the burst: 4 at once
    with pytest.raises(ResourceExhausted, match=r"submits_per_second = 4; retry in 0\.25 s"):
        rate.take(A, 1, 4.0)
    rate.take(B, 4, 4.0)  # each tenant has its own bucket
    clock[0] += 0.5
    rate.take(A, 2, 4.0)
    clock[0] += 60  # refilled to one second's worth, no more
    with pytest.raises(ResourceExhausted, match="a batch of 5 jobs is more than tenant team-a"):
        rate.take(A, 5, 4.0)
    rate.take(A, 4, 4.0)
    rate.take(A, 1000, None)  # no quota: no limit


# --- what the store counts ------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "jobs.db"), retention=10.0)
    await store.open(Committed())
    try:
        yield store
    finally:
        await store.close()


def of(tenant: str, inline: int = 0) -> job_pb2.Job:
    job = new_job()
    job.tenant = tenant
    job.spec.inputs.clear()
    if inline:
        job.spec.inputs["in"] = b"x" * inline
    return job


async def test_the_store_counts_queued_jobs_and_stored_bytes_per_tenant(
    store: SqliteStore,
) -> None:
    jobs = [of(A, 100), of(A, 50), of(B)]
    await store.insert(jobs, [next_event(j) for j in jobs])
    assert await store.usage(A) == Usage(queued=2, stored_bytes=150)
    assert await store.usage(B) == Usage(queued=1, stored_bytes=0)

    # Running is not queued; a retry queues it again; its inputs stay until it is purged.
    jobs[0].state = S.JOB_STATE_RUNNING
    await store.save(jobs[0], None)
    assert await store.usage(A) == Usage(queued=1, stored_bytes=150)
    jobs[0].state = S.JOB_STATE_QUEUED
    await store.save(jobs[0], None)
    assert (await store.usage(A)).queued == 2

    # A blob counts once per tenant, whichever of its principals uploaded it.
    blob = "b" * 64
    await store.own_blob(blob, A, "alice-app", 1000.0, fresh=True, size=4000)
    await store.own_blob(blob, A, "alice-app", 1001.0, fresh=False, size=4000)
    await store.own_blob(blob, A, "alice-batch", 1002.0, fresh=False, size=4000)
    await store.own_blob(blob, B, "bob-app", 1003.0, fresh=False, size=4000)
    assert (await store.usage(A)).stored_bytes == 4150
    assert (await store.usage(B)).stored_bytes == 4000
    # Deleted by a sweep as of 1002.5: the upload made since then stays B's.
    await store.forget_owners([blob], before=1002.5)
    assert (await store.usage(A)).stored_bytes == 150
    assert (await store.usage(B)).stored_bytes == 4000

    # Ended jobs keep their inputs until they are purged.
    for job in jobs[:2]:
        job.state = S.JOB_STATE_SUCCEEDED
        job.end_time.FromSeconds(1000)
        await store.save(job, next_event(job))
    assert await store.usage(A) == Usage(queued=0, stored_bytes=150)
    assert await store.purge(2000.0, 10) == 2
    assert await store.usage(A) == Usage()


async def test_a_refused_insert_keeps_nothing_and_others_committed_with_it_stand(
    store: SqliteStore,
) -> None:
    def at_most_two(usage: Usage, adding: Usage) -> None:
        if usage.queued + adding.queued > 2:
            raise ResourceExhausted(f"{usage.queued} + {adding.queued}")

    first = of(A)
    await store.insert([first], [next_event(first)], at_most_two)
    batch = [of(A, 10), of(A, 10)]
    theirs = of(B)
    # Both in one group commit: the refusal undoes the batch only.
    refused, kept = await asyncio.gather(
        store.insert(batch, [next_event(j) for j in batch], at_most_two),
        store.insert([theirs], [next_event(theirs)]),
        return_exceptions=True,
    )
    assert isinstance(refused, ResourceExhausted)
    assert refused.message == "1 + 2"
    assert not isinstance(kept, BaseException)
    assert [await store.get(A, j.id) for j in batch] == [None, None]
    assert await store.get(B, theirs.id) is not None
    assert await store.usage(A) == Usage(queued=1, stored_bytes=0)
    # At the quota, an idempotent repeat adds nothing, so it passes.
    keyed, again = of(A), of(A)
    keyed.spec.idempotency_key = again.spec.idempotency_key = "k"
    await store.insert([keyed], [next_event(keyed)], at_most_two)
    [repeat] = await store.insert([again], [next_event(again)], at_most_two)
    assert repeat.existing
    assert repeat.job.id == keyed.id


async def test_an_older_database_starts_with_its_tenants_counted(tmp_path: Path) -> None:
    path = tmp_path / "jobmesh.db"
    shutil.copy(FIXTURE, path)  # the first release's: one job queued, two ended
    store = SqliteStore(str(path))
    await store.open(Committed())
    try:
        # The inline inputs of each: 15 bytes, then 6 and 6.
        assert await store.usage("default") == Usage(queued=1, stored_bytes=27)
    finally:
        await store.close()


async def test_a_swept_blob_no_longer_counts(store: SqliteStore, tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", 1 << 20)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 3000

    ref = await blobs.put(3000, "", chunks())
    await store.own_blob(ref.id, A, "alice-app", time.time(), fresh=True, size=ref.size)
    assert (await store.usage(A)).stored_bytes == 3000
    retention = Retention(store, blobs, blob_grace=60.0)
    assert (await retention.sweep(time.time() + 61.0)).blobs == 1  # nothing referenced it
    assert (await store.usage(A)).stored_bytes == 0


# --- the scheduler, without processes ------------------------------------------------


@pytest.fixture
def quotas() -> dict[str, Quota]:
    return {}


@pytest.fixture
async def scheduler(
    store: SqliteStore, tmp_path: Path, quotas: Mapping[str, Quota]
) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(
        GatewaySettings(db=":memory:"),
        store,
        BlobStore(tmp_path / "blobs", 1 << 20),
        quotas=quotas_of(quotas),
    )
    try:
        yield scheduler
    finally:
        scheduler.stop()


def worker(slots: int) -> WorkerSession:
    s = WorkerSession(session_id="s1", worker_id="w1", kinds={"echo": 0}, slots=slots)
    s.answered = 1  # as if it had answered a ping, so it gets work
    return s


async def backlog(scheduler: Scheduler, tenant: str, n: int, priority: int = 0) -> list[str]:
    spec = job_pb2.JobSpec(kind="echo", priority=priority)
    return [i.job.id for i in await scheduler.submit(tenant, [spec] * n)]


def run_one_at_a_time(scheduler: Scheduler, session: WorkerSession, n: int) -> list[str]:
    """Completes the session's one job `n` times; the job ids in the order they ran."""
    ran = []
    for _ in range(n):
        [(job_id, attempt)] = session.inflight
        ran.append(job_id)
        done = dispatcher_pb2.Completed(job_id=job_id, attempt=attempt)
        apply(scheduler, session, dispatcher_pb2.SessionRequest(completed=[done]))
    assert not session.inflight
    return ran


def tenants(ran: list[str], owners: Mapping[str, str]) -> str:
    return "".join(owners[job_id] for job_id in ran)


@pytest.mark.parametrize(
    ("weights", "order"),
    [
        # A's backlog came first; B's jobs still run interleaved.
        ({}, "ABABABABAAAA"),
        ({A: Quota(weight=2)}, "ABAABAABAABA"),
        ({B: Quota(weight=3)}, "ABBBABAAAAAA"),
    ],
)
async def test_tenants_take_weighted_turns_within_a_priority(
    scheduler: Scheduler, quotas: dict[str, Quota], weights: dict[str, Quota], order: str
) -> None:
    quotas.update(weights)
    owners = dict.fromkeys(await backlog(scheduler, A, 8), "A")
    owners |= dict.fromkeys(await backlog(scheduler, B, 4), "B")
    session = worker(slots=1)
    scheduler.attach(session, ())
    await scheduler.settled()  # the windows are claimed from the store
    assert tenants(run_one_at_a_time(scheduler, session, 12), owners) == order


async def test_a_higher_priority_goes_first_whatever_the_turns(
    scheduler: Scheduler, quotas: dict[str, Quota]
) -> None:
    quotas[A] = Quota(weight=10)
    owners = dict.fromkeys(await backlog(scheduler, A, 3), "A")
    owners |= dict.fromkeys(await backlog(scheduler, B, 2, priority=1), "B")
    session = worker(slots=1)
    scheduler.attach(session, ())
    await scheduler.settled()
    assert tenants(run_one_at_a_time(scheduler, session, 5), owners) == "BBAAA"


async def test_a_tenant_at_its_max_running_waits_while_others_run(
    scheduler: Scheduler, quotas: dict[str, Quota]
) -> None:
    quotas[A] = Quota(max_running=2)
    theirs = await backlog(scheduler, A, 5)
    others = await backlog(scheduler, B, 2)
    session = worker(slots=6)
    scheduler.attach(session, ())
    await scheduler.settled()
    assert {job_id for job_id, _ in session.inflight} == {*theirs[:2], *others}
    assert (await scheduler.get(A, theirs[2])).state == job_pb2.JOB_STATE_QUEUED
    run = dispatcher_pb2.Completed(job_id=theirs[0], attempt=1)
    apply(scheduler, session, dispatcher_pb2.SessionRequest(completed=[run]))
    assert {job_id for job_id, _ in session.inflight} == {theirs[1], theirs[2], *others}


async def test_a_batch_past_max_queued_is_refused_whole(
    scheduler: Scheduler, store: SqliteStore, quotas: dict[str, Quota]
) -> None:
    quotas[A] = Quota(max_queued=3)
    await backlog(scheduler, A, 2)
    with pytest.raises(ResourceExhausted) as raised:
        await backlog(scheduler, A, 2)
    assert raised.value.message == (
        "tenant team-a has 2 queued jobs and this adds 2; its quota is max_queued = 3: "
        "retry once some have started"
    )
    assert (await store.usage(A)).queued == 2
    assert scheduler.queued == 2
    await backlog(scheduler, A, 1)
    await backlog(scheduler, B, 5)  # another tenant's jobs do not count
    with pytest.raises(ResourceExhausted, match="has 3 queued jobs; its quota is max_queued = 3"):
        await backlog(scheduler, A, 1)
    # Running jobs are not queued: room again.
    session = worker(slots=1)
    scheduler.attach(session, ())
    await scheduler.settled()
    await store.barrier()
    await backlog(scheduler, A, 1)


# --- a real gateway -------------------------------------------------------------------


async def test_each_quota_is_refused_with_resource_exhausted_naming_it(
    cluster: Cluster,
) -> None:
    alice = dataclasses.replace(ALICE, quota="{ max_queued = 3 }")
    bob = dataclasses.replace(BOB, quota='{ max_stored_bytes = "1KiB" }')
    carol = dataclasses.replace(CAROL, quota="{ submits_per_second = 1 }")
    gw = secured(cluster, principals=(alice, bob, carol, WORKER))
    async with (
        AsyncClient(gw.address, token=alice.token) as a,
        AsyncClient(gw.address, token=bob.token) as b,
        AsyncClient(gw.address, token=carol.token) as c,
    ):
        # Queued jobs: nobody serves "queued", so they wait.
        await a.submit("queued")
        error = await refusal(a.submit_batch([job_spec("queued")] * 3))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "its quota is max_queued = 3" in error.message
        jobs, _ = await a.list()
        assert len(jobs) == 1  # nothing of the refused batch was kept
        await a.submit_batch([job_spec("queued")] * 2)
        error = await refusal(a.submit("queued"))
        assert "tenant team-a has 3 queued jobs; its quota is max_queued = 3" in error.message

        # Stored bytes: inline inputs, and uploads.
        await b.submit("queued", inputs={"in": b"x" * 600})
        error = await refusal(b.submit("queued", inputs={"in": b"y" * 600}))
        assert error.message.startswith("tenant team-b stores 600 bytes and this adds 600 bytes")
        assert "its quota is max_stored_bytes = 1KiB" in error.message
        error = await refusal(b.upload(b"z" * 2000))
        assert "adds 2000 bytes in an upload" in error.message
        await b.upload(b"z" * 400)
        error = await refusal(b.upload(b"w" * 100))
        assert "stores 1000 bytes" in error.message

        # Submits per second: a bucket of one second's worth, here one job.
        error = await refusal(c.submit_batch([job_spec("queued")] * 2))
        assert "its quota is submits_per_second = 1; send smaller batches" in error.message
        for _ in range(3):  # more than a second between two submits would let one through
            try:
                await c.submit("queued")
            except ResourceExhausted as e:
                error = e
                break
        else:
            raise AssertionError("three submits in a row were not refused")
        assert "tenant team-c submits faster than its quota, submits_per_second = 1" in str(error)


async def test_a_backlog_does_not_starve_another_tenant(cluster: Cluster) -> None:
    alice = dataclasses.replace(ALICE, quota="{ weight = 2 }")
    gw = secured(cluster, principals=(alice, BOB, WORKER))
    async with (
        AsyncClient(gw.address, token=alice.token) as a,
        AsyncClient(gw.address, token=BOB.token) as b,
    ):
        await a.submit_batch([job_spec("echo")] * 8)
        await b.submit_batch([job_spec("echo")] * 4)
        hand = HandWorker(gw, WORKER.token)
        try:
            await hand.attach("w-1", slots=1)
            order = ""
            for _ in range(12):
                assign = await hand.next_assign()
                order += {A: "A", B: "B"}[assign.tenant]
                await hand.complete(assign, job_pb2.JobResult())
        finally:
            await hand.close()
    assert order == "ABAABAABAABA"


async def test_max_running_holds_a_tenant_while_another_runs(cluster: Cluster) -> None:
    alice = dataclasses.replace(ALICE, quota="{ max_running = 1 }")
    gw = secured(cluster, principals=(alice, BOB, WORKER))
    async with (
        AsyncClient(gw.address, token=alice.token) as a,
        AsyncClient(gw.address, token=BOB.token) as b,
    ):
        theirs = [s.job.id for s in await a.submit_batch([job_spec("echo")] * 3)]
        [other] = [s.job.id for s in await b.submit_batch([job_spec("echo")])]
        hand = HandWorker(gw, WORKER.token)
        try:
            await hand.attach("w-1", slots=3)
            first, second = await hand.next_assign(), await hand.next_assign()
            assert {first.job_id, second.job_id} == {theirs[0], other}
            # Both were handed out together; a third would have been too.
            assert (await a.get(theirs[1])).state == JobState.QUEUED
            done = first if first.job_id == theirs[0] else second
            await hand.complete(done, job_pb2.JobResult())
            assert (await hand.next_assign()).job_id == theirs[1]
            assert (await a.get(theirs[2])).state == JobState.QUEUED
        finally:
            await hand.close()


async def test_job_metrics_carry_the_tenant(cluster: Cluster) -> None:
    port = free_port()
    gw = secured(cluster, *metrics_flags(port), principals=(ALICE, BOB, WORKER))
    async with (
        AsyncClient(gw.address, token=ALICE.token) as a,
        AsyncClient(gw.address, token=BOB.token) as b,
    ):
        await a.submit_batch([job_spec("queued")] * 2)
        await b.submit("queued")
        found = await scrape(port)
    for tenant, n in ((A, 2), (B, 1)):
        labels = {"kind": "queued", "tenant": tenant}
        assert value(found, "jobmesh_gateway_jobs_submitted_total", **labels) == n
        assert value(found, "jobmesh_gateway_queue_depth", **labels) == n
