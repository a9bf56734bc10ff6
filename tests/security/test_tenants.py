"""Tenants: the tenant comes from the principal, never from the request. Another tenant's
job or blob is NOT_FOUND exactly as an unknown one; an admin of every tenant sees all;
each job records who submitted and who cancelled it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.jobs import next_event
from gateway.store import ANY_TENANT
from gateway.store.sqlite import SqliteStore
from jobmesh import AsyncClient, BlobRef, JobState
from jobmesh.errors import InvalidArgument, JobmeshError, NotFound, PermissionDenied
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster
from tests.gateway.test_store import Committed, new_job
from tests.security.auth_fixtures import (
    ADMIN,
    ALICE,
    BOB,
    PRINCIPALS,
    WORKER,
    HandWorker,
    Who,
    secured,
)

UNKNOWN_JOB = "0" * 32
UNKNOWN_BLOB = "0" * 64


async def failure(call: object) -> JobmeshError:
    """The error an SDK call (a coroutine, or an async iterator read to its end) raises."""
    try:
        if isinstance(call, AsyncIterator):
            async for _ in call:
                pass
        else:
            await call  # type: ignore[misc]
    except JobmeshError as e:
        return e
    raise AssertionError("the call succeeded")


def same_message(
    theirs: JobmeshError, unknown: JobmeshError, their_id: str, unknown_id: str
) -> None:
    """The two errors are the same but for the id they name: nothing tells them apart."""
    assert type(theirs) is type(unknown)
    assert theirs.code == unknown.code
    assert theirs.message.replace(their_id, "ID") == unknown.message.replace(unknown_id, "ID")


async def test_another_tenants_job_is_not_found_exactly_as_an_unknown_one(
    cluster: Cluster,
) -> None:
    gw = secured(cluster)
    async with (
        AsyncClient(gw.address, token=ALICE.token) as alice,
        AsyncClient(gw.address, token=BOB.token) as bob,
        AsyncClient(gw.address, token=ADMIN.token) as admin,
    ):
        job = (await alice.submit("echo", labels={"team": "a"})).job
        assert (job.tenant, job.proto.submitted_by) == ("team-a", "alice-app")
        bobs = (await bob.submit("echo")).job

        for attempt in (bob.get, bob.cancel, lambda job_id: bob.watch(job_id)):
            theirs = await failure(attempt(job.id))
            unknown = await failure(attempt(UNKNOWN_JOB))
            assert isinstance(theirs, NotFound)
            same_message(theirs, unknown, job.id, UNKNOWN_JOB)
        # Listing shows only the caller's tenant, whatever the filter.
        assert [j.id for j in (await bob.list())[0]] == [bobs.id]
        assert [j.id for j in (await bob.list(labels={"team": "a"}))[0]] == []
        assert [j.id for j in (await alice.list())[0]] == [job.id]
        # Bob's cancel did nothing.
        assert (await alice.get(job.id)).state is JobState.QUEUED

        # An admin of every tenant sees them all; its cancel is recorded.
        assert {j.id for j in (await admin.list())[0]} == {job.id, bobs.id}
        cancelled = await admin.cancel(job.id, "not today")
        assert cancelled.state is JobState.CANCELLED
        assert (cancelled.tenant, cancelled.proto.cancelled_by) == ("team-a", "ops")
        seen = await alice.get(job.id)
        assert (seen.proto.submitted_by, seen.proto.cancelled_by) == ("alice-app", "ops")
        # What an admin of every tenant submits goes to tenant default.
        own = (await admin.submit("echo")).job
        assert (own.tenant, own.proto.submitted_by) == ("default", "ops")
        assert isinstance(await failure(alice.get(own.id)), NotFound)


async def test_idempotency_keys_run_and_workers_stay_within_a_tenant(cluster: Cluster) -> None:
    gw = secured(cluster)
    cluster.worker(gw, "w-1", "--token", WORKER.token, wait=False)
    async with (
        AsyncClient(gw.address, token=ALICE.token) as alice,
        AsyncClient(gw.address, token=BOB.token) as bob,
    ):
        first = await alice.submit("echo", idempotency_key="nightly", params={"who": "alice"})
        again = await alice.submit("echo", idempotency_key="nightly")
        assert again.existing
        assert again.job.id == first.job.id
        # The same key from another tenant is another job, not a way to reach Alice's.
        other = await bob.submit("echo", idempotency_key="nightly", params={"who": "bob"})
        assert not other.existing
        assert other.job.id != first.job.id
        events = [e async for e in bob.run("echo", idempotency_key="nightly")]
        assert {e.job_id for e in events} == {other.job.id}
        assert events[-1].state is JobState.SUCCEEDED
        assert events[-1].result is not None
        assert events[-1].result.metadata == {"who": "bob"}

        # A real worker fetches the input blobs of the attempts it holds, with its token.
        data = os.urandom(4096)
        ref = await alice.upload(data)
        done = await alice.wait((await alice.submit("echo", inputs={"in": ref})).job.id)
        assert done.state is JobState.SUCCEEDED, done.error
        assert await alice.outputs(done) == {"in": data}


async def test_blobs_belong_to_the_tenant_that_uploaded_them(cluster: Cluster) -> None:
    gw = secured(cluster)
    secret, shared = os.urandom(4096), os.urandom(4096)
    async with (
        AsyncClient(gw.address, token=ALICE.token) as alice,
        AsyncClient(gw.address, token=BOB.token) as bob,
        AsyncClient(gw.address, token=ADMIN.token) as admin,
    ):
        ref = await alice.upload(secret)
        assert await alice.download(ref.id) == secret
        theirs = await failure(bob.download(ref.id))
        unknown = await failure(bob.download(UNKNOWN_BLOB))
        assert isinstance(theirs, NotFound)
        same_message(theirs, unknown, ref.id, UNKNOWN_BLOB)
        # Naming it in a job is no way in either, and says what a missing blob says.
        theirs = await failure(bob.submit("echo", inputs={"x": ref}))
        unknown = await failure(bob.submit("echo", inputs={"x": BlobRef(UNKNOWN_BLOB, ref.size)}))
        assert isinstance(theirs, InvalidArgument)
        same_message(theirs, unknown, ref.id, UNKNOWN_BLOB)
        assert await admin.download(ref.id) == secret

        # The same content uploaded by both is each one's, stored once.
        mine, yours = await alice.upload(shared), await bob.upload(shared)
        assert mine == yours
        assert await bob.download(yours.id) == shared
        job = (await bob.submit("echo", inputs={"x": yours})).job
        assert job.tenant == "team-b"
        stored = list((cluster.db.parent / "jobmesh.db.blobs").glob(f"*/{yours.id}"))
        assert len(stored) == 1


async def test_a_worker_downloads_only_the_inputs_of_attempts_it_holds(cluster: Cluster) -> None:
    gw = secured(cluster)
    worker = HandWorker(gw, WORKER.token)
    try:
        await worker.attach("w-hand")
        async with (
            AsyncClient(gw.address, token=ALICE.token) as alice,
            AsyncClient(gw.address, token=WORKER.token) as as_worker,
        ):
            held, other = os.urandom(2048), os.urandom(2048)
            held_ref, other_ref = await alice.upload(held), await alice.upload(other)
            job = (await alice.submit("echo", inputs={"in": held_ref})).job
            assign = await worker.next_assign()
            assert assign.job_id == job.id
            assert await as_worker.download(held_ref.id) == held
            assert isinstance(await failure(as_worker.download(other_ref.id)), NotFound)
            # A worker may not read jobs.
            assert isinstance(await failure(as_worker.get(job.id)), PermissionDenied)

            await worker.fail(assign)
            ended = await alice.wait(job.id)
            assert ended.state is JobState.FAILED
            assert isinstance(await failure(as_worker.download(held_ref.id)), NotFound)
    finally:
        await worker.close()


# --- the store, without processes ---------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "jobs.db"), retention=100.0)
    await s.open(Committed())
    yield s
    await s.close()


async def test_a_tenant_sees_the_blobs_it_uploaded_or_its_jobs_reference(
    store: SqliteStore,
) -> None:
    job = new_job()
    job.tenant = "team-a"
    job.spec.input_blobs["big"].CopyFrom(job_pb2.BlobRef(id="b" * 64, size=1))
    await store.insert([job], [next_event(job)])
    assert await store.blob_visible("team-a", "b" * 64)
    assert not await store.blob_visible("team-b", "b" * 64)
    assert await store.blob_visible(ANY_TENANT, "b" * 64)

    await store.own_blob("c" * 64, "team-b", "bob-app", 1000.0, fresh=True)
    await store.own_blob("c" * 64, "team-c", "carol-app", 1000.0, fresh=False)
    assert await store.blob_visible("team-b", "c" * 64)
    assert await store.blob_visible("team-c", "c" * 64)
    # A new file of the same content (the old one swept): earlier owners are forgotten.
    await store.own_blob("c" * 64, "team-a", "alice-app", 1050.0, fresh=True)
    assert not await store.blob_visible("team-b", "c" * 64)
    assert await store.blob_visible("team-a", "c" * 64)
    # Ownership lasts a retention (100 s here); then only the tenant's jobs show a blob.
    await store.purge(1149.0, 100)
    assert await store.blob_visible("team-a", "c" * 64)
    await store.purge(1151.0, 100)
    assert not await store.blob_visible("team-a", "c" * 64)


async def test_the_any_tenant_reads_every_tenants_jobs(store: SqliteStore) -> None:
    job = new_job()
    job.tenant = "team-a"
    await store.insert([job], [next_event(job)])
    assert await store.get("team-b", job.id) is None
    assert (await store.get(ANY_TENANT, job.id)) is not None
    assert (await store.get("team-a", job.id)) is not None


async def test_concurrent_calls_of_two_tenants_keep_their_own_principal(cluster: Cluster) -> None:
    gw = secured(cluster)
    async with (
        AsyncClient(gw.address, token=ALICE.token) as alice,
        AsyncClient(gw.address, token=BOB.token) as bob,
    ):
        submitted = await asyncio.gather(
            *(client.submit("echo") for _ in range(20) for client in (alice, bob))
        )
    tenants = [s.job.tenant for s in submitted]
    assert tenants == ["team-a", "team-b"] * 20


TEAM_B_WORKER = Who("team-b-workers", "team-b", ("worker",), "tbw-Lm3Zq8Rx5Vc0", worker_ids="b-*")


async def test_a_worker_of_one_tenant_gets_only_that_tenants_jobs(cluster: Cluster) -> None:
    gw = secured(cluster, principals=(*PRINCIPALS, TEAM_B_WORKER))
    worker = HandWorker(gw, TEAM_B_WORKER.token)
    try:
        await worker.attach("b-1")
        async with (
            AsyncClient(gw.address, token=ALICE.token) as alice,
            AsyncClient(gw.address, token=BOB.token) as bob,
        ):
            # Alice's job is older and of higher priority: a worker of every tenant would
            # take it first. Team B's worker must not, nor wait behind it.
            theirs = (await alice.submit("echo", priority=9)).job
            ours = (await bob.submit("echo")).job
            assign = await worker.next_assign()
            assert assign.job_id == ours.id
            await worker.fail(assign)
            assert (await bob.wait(ours.id)).state is JobState.FAILED
            assert worker.assigned.empty()
            assert (await alice.get(theirs.id)).state is JobState.QUEUED
    finally:
        await worker.close()


async def test_a_worker_cannot_hand_a_job_another_tenants_blob_as_its_output(
    cluster: Cluster,
) -> None:
    gw = secured(cluster)
    worker = HandWorker(gw, WORKER.token)
    try:
        await worker.attach("w-forger")
        async with (
            AsyncClient(gw.address, token=ALICE.token) as alice,
            AsyncClient(gw.address, token=BOB.token) as bob,
            AsyncClient(gw.address, token=WORKER.token) as as_worker,
        ):
            secret = os.urandom(4096)
            stolen = await alice.upload(secret)
            job = (await bob.submit("echo")).job
            assign = await worker.next_assign()
            result = job_pb2.JobResult()
            result.output_blobs["loot"].CopyFrom(stolen.proto)
            await worker.complete(assign, result)
            ended = await bob.wait(job.id)
            assert ended.state is JobState.FAILED
            assert ended.error is not None
            assert ended.error.code == "INVALID_RESULT"
            assert "loot" in ended.error.message
            assert isinstance(await failure(bob.download(stolen.id)), NotFound)

            # What the worker uploads itself is a fine output, and the job's tenant gets it.
            made = os.urandom(4096)
            job = (await bob.submit("echo")).job
            assign = await worker.next_assign()
            result = job_pb2.JobResult()
            result.output_blobs["made"].CopyFrom((await as_worker.upload(made)).proto)
            await worker.complete(assign, result)
            ended = await bob.wait(job.id)
            assert ended.state is JobState.SUCCEEDED, ended.error
            assert await bob.outputs(ended) == {"made": made}
    finally:
        await worker.close()
