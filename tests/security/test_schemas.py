"""A kind's params schema: declared only by worker credentials, kept in the store (a restarted
gateway checks params before any worker attaches again), and versioned. Workers declaring
different versions of one kind (a rolling upgrade) are all attached; Submit checks against
the newest, the job records the version that accepted it, and dispatch prefers workers
declaring that version.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gateway.blobs import BlobStore
from gateway.config import GatewaySettings
from gateway.scheduler import Scheduler
from gateway.schemas import KindSchemas
from gateway.store.sqlite import SqliteStore
from gateway.workers import WorkerSession
from jobmesh import AsyncClient
from jobmesh.errors import InvalidArgument
from jobmesh.params import Param, schema_digest, schema_proto
from jobmesh.v1 import dispatcher_pb2, job_pb2
from tests.cluster import Cluster, Gateway, until
from tests.security.auth_fixtures import ALICE, WORKER, HandWorker, attach_refused, secured
from tests.security.test_workers import workers
from worker_service.registry import load_handlers

OLD = (Param("size", "integer", minimum=1), Param("quality", "integer"))
NEW = (Param("size", "integer", minimum=1), Param("format", "string", choices=("PNG", "JPEG")))


async def ponged(gw: Gateway, *worker_ids: str) -> None:
    """Until each worker has answered a ping: only then does it get work."""

    def answered() -> bool:
        attached = workers(gw)
        return all(w in attached and attached[w].HasField("last_pong_time") for w in worker_ids)

    await until(answered)


async def declare(gw: Gateway, worker_id: str, kind: str, schema: tuple[Param, ...]) -> HandWorker:
    worker = HandWorker(gw, WORKER.token)
    await worker.attach(worker_id, kind, schema)
    await ponged(gw, worker_id)
    return worker


async def test_a_declared_schema_survives_a_restart_before_any_worker_attaches(
    cluster: Cluster,
) -> None:
    gw = secured(cluster)
    worker = await declare(gw, "w-1", "resize", OLD)
    await worker.close()
    await asyncio.to_thread(gw.stop)

    again = cluster.gateway("--auth-file", str(cluster.tmp / "auth.toml"))
    assert workers(again) == {}
    async with AsyncClient(again.address, token=ALICE.token) as client:
        with pytest.raises(InvalidArgument, match=r"takes no param 'format' \(it takes: quality"):
            await client.submit("resize", params={"size": 2, "format": "PNG"})
        with pytest.raises(InvalidArgument, match=r"spec\.params_json\.size: must be an integer"):
            await client.submit("resize", params={"size": "big"})
        submitted = await client.submit("resize", params={"size": 2, "quality": 80})
    assert submitted.job.params_schema == schema_digest(OLD)


async def test_workers_declaring_two_versions_are_all_attached_and_get_the_jobs_of_theirs(
    cluster: Cluster,
) -> None:
    gw = secured(cluster)
    old = await declare(gw, "w-old", "resize", OLD)
    new = await declare(gw, "w-new", "resize", NEW)  # nobody is refused
    try:
        async with AsyncClient(gw.address, token=ALICE.token) as client:
            # Submit checks against the newer version, and the job records it.
            with pytest.raises(InvalidArgument, match=r"takes no param 'quality'"):
                await client.submit("resize", params={"size": 2, "quality": 80})
            submitted = await client.submit("resize", params={"size": 2, "format": "png"})
            assert submitted.job.params_schema == schema_digest(NEW)
            # Both are idle: the worker of its version gets it (the older one, attached
            # first, would otherwise).
            assert (await new.next_assign()).job_id == submitted.job.id

            # The newer version's worker leaves (a rollback): the older version is the
            # newest attached again.
            await new.close()
            await until(lambda: "w-new" not in workers(gw))
            held = await client.submit("resize", params={"size": 3, "quality": 80})
            retried = await client.submit(
                "resize", params={"size": 4, "quality": 80}, initial_backoff=0.1
            )
            assert held.job.params_schema == retried.job.params_schema == schema_digest(OLD)
            assert {(await old.next_assign()).job_id for _ in range(2)} == {
                held.job.id,
                retried.job.id,
            }

            # With a newer version's worker idle again, a retry of a job the older version
            # accepted still goes to the older version's worker, though it is busier.
            new = await declare(gw, "w-new-2", "resize", NEW)
            await old.fail(dispatcher_pb2.Assign(job_id=retried.job.id, attempt=1), retryable=True)
            second = await old.next_assign()
            assert (second.job_id, second.attempt) == (retried.job.id, 2)
            later = await client.submit("resize", params={"size": 5, "format": "jpeg"})
            assert (await new.next_assign()).job_id == later.job.id
            assert old.assigned.empty()
    finally:
        await old.close()
        await new.close()


async def test_a_client_credential_cannot_change_a_kinds_schema(cluster: Cluster) -> None:
    gw = secured(cluster)
    greeting = (Param("text", "string"),)
    worker = await declare(gw, "w-1", "greet", greeting)
    async with grpc.aio.insecure_channel(gw.address) as channel:
        pwned = dispatcher_pb2.KindCapacity(
            kind="greet", params_schema=schema_proto((Param("pwned", "string"),))
        )
        attach = dispatcher_pb2.Attach(worker_id="w-2", slots=1, kinds=[pwned])
        error = await attach_refused(channel, ALICE.token, attach)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    async with AsyncClient(gw.address, token=ALICE.token) as client:
        accepted = await client.submit("greet", params={"text": "hi"})
        assert accepted.job.params_schema == schema_digest(greeting)
        # After the worker left, what it declared still holds.
        await worker.close()
        await until(lambda: workers(gw) == {})
        again = await client.submit("greet", params={"text": "hi"})
        assert again.job.params_schema == schema_digest(greeting)
        with pytest.raises(InvalidArgument, match=r"takes no param 'pwned' \(it takes: text\)"):
            await client.submit("greet", params={"pwned": "yes"})


async def test_without_auth_a_worker_declares_its_kinds_params_as_before(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    sleep = load_handlers()["sleep"].params
    assert sleep is not None
    async with AsyncClient(gw.address) as client:
        with pytest.raises(InvalidArgument, match="must be a number"):
            await client.submit("sleep", params={"seconds": "long"})
        slept = await client.wait((await client.submit("sleep", params={"seconds": 0})).job.id)
        assert slept.state == job_pb2.JOB_STATE_SUCCEEDED
        assert slept.params_schema == schema_digest(sleep)
        echoed = await client.wait((await client.submit("echo", params={"any": 1})).job.id)
        assert echoed.state == job_pb2.JOB_STATE_SUCCEEDED
        assert echoed.params_schema == ""


# --- the versions, in process ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "jobmesh.db"))
    await store.open(lambda events: None)
    try:
        yield store
    finally:
        await store.close()


def session(worker_id: str, tenant: str = "*", kind: str = "resize") -> WorkerSession:
    s = WorkerSession(
        session_id=worker_id,
        worker_id=worker_id,
        kinds={kind: 0},
        slots=2,
        principal="workers",
        tenant=tenant,
    )
    s.answered = 1  # as if it had answered a ping, so it gets work
    return s


def newest(schemas: KindSchemas, tenant: str = "default") -> str | None:
    version = schemas.newest("resize", tenant)
    return None if version is None else version.digest


async def test_the_newest_version_is_the_last_first_seen_among_attached_workers(
    store: SqliteStore,
) -> None:
    schemas = KindSchemas(store, Clock())
    assert newest(schemas) is None
    a, b, c = session("a"), session("b"), session("c")
    schemas.attach(a, {"resize": OLD})
    schemas.attach(b, {"resize": NEW})
    schemas.attach(c, {"resize": OLD})  # attached later, but its version is older
    assert newest(schemas) == schema_digest(NEW)
    schemas.detach(b)  # a rollback: NEW's workers leave
    assert newest(schemas) == schema_digest(OLD)
    schemas.detach(a)
    schemas.detach(c)
    # Nobody attached: the version a worker attached declaring last.
    assert newest(schemas) == schema_digest(OLD)

    await store.barrier()
    kept = {row.digest: row for row in await store.schemas()}
    assert kept.keys() == {schema_digest(OLD), schema_digest(NEW)}
    assert kept[schema_digest(OLD)].first_seen < kept[schema_digest(NEW)].first_seen
    assert kept[schema_digest(OLD)].last_seen > kept[schema_digest(NEW)].last_seen
    restarted = KindSchemas(store)
    await restarted.load()
    assert newest(restarted) == schema_digest(OLD)
    version = restarted.newest("resize", "default")
    assert version is not None
    assert version.schema == OLD


async def test_workers_declaring_no_schema_take_any_params_once_they_alone_serve_the_kind(
    store: SqliteStore,
) -> None:
    schemas = KindSchemas(store, Clock())
    declaring, free = session("declaring"), session("free")
    schemas.attach(declaring, {"resize": OLD})
    schemas.attach(free, {})
    assert newest(schemas) == schema_digest(OLD)  # one that declares none changes nothing
    schemas.detach(declaring)
    assert newest(schemas) is None
    schemas.detach(free)
    assert newest(schemas) == schema_digest(OLD)  # kept, for when nobody is attached


async def test_one_tenants_workers_do_not_change_what_anothers_jobs_are_checked_against(
    store: SqliteStore,
) -> None:
    schemas = KindSchemas(store, Clock())
    everyone, team_a = session("everyone"), session("team-a-1", tenant="team-a")
    schemas.attach(everyone, {"resize": OLD})
    schemas.attach(team_a, {"resize": NEW})
    assert newest(schemas, "team-a") == schema_digest(NEW)
    assert newest(schemas, "team-b") == schema_digest(OLD)
    schemas.detach(everyone)
    schemas.detach(team_a)
    assert newest(schemas, "team-a") == schema_digest(NEW)
    assert newest(schemas, "team-b") == schema_digest(OLD)


async def test_dispatch_prefers_the_workers_of_the_version_that_accepted_the_job(
    store: SqliteStore, tmp_path: Path
) -> None:
    scheduler = Scheduler(GatewaySettings(db=":memory:"), store, BlobStore(tmp_path, 1 << 20))
    try:
        old, new = session("old"), session("new")
        scheduler.attach(old, (), {"resize": OLD})
        scheduler.attach(new, (), {"resize": NEW})

        async def submit(schema: tuple[Param, ...] | None) -> str:
            digest = "" if schema is None else schema_digest(schema)
            spec = job_pb2.JobSpec(kind="resize")
            [inserted] = await scheduler.submit("default", [spec], params_schemas=[digest])
            return inserted.job.id

        def held(s: WorkerSession) -> set[str]:
            return {job_id for job_id, _ in s.inflight}

        first = await submit(OLD)
        second = await submit(OLD)  # to the busier worker, which declares its version
        assert held(old) == {first, second}
        third = await submit(OLD)  # its workers are full: any worker of the kind
        assert held(new) == {third}
        fourth = await submit(NEW)
        assert held(new) == {third, fourth}
        scheduler.detach(new, "gone")
        scheduler.detach(old, "gone")
        other = session("other")
        scheduler.attach(other, (), {})
        fifth = await submit(NEW)  # none of its version attached: any worker of the kind
        assert held(other) == {fifth}
    finally:
        scheduler.stop()
