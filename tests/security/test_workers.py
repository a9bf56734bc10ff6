"""Worker identity: a worker is the credential it attaches with plus the worker id it
declares, which the credential must allow. One session per identity is live: a second
Attach of the same identity closes the first stream (ABORTED, and the worker says why in
its log); the same worker id from another credential is refused. Nothing a session says
about an attempt it does not hold changes the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import grpc
import pytest

from gateway.blobs import BlobStore
from gateway.config import GatewaySettings
from gateway.scheduler import Scheduler
from gateway.sessions import apply
from gateway.store.sqlite import SqliteStore
from gateway.workers import WorkerSession
from jobmesh import AsyncClient
from jobmesh.errors import PermissionDenied
from jobmesh.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    dispatcher_pb2,
    dispatcher_pb2_grpc,
    job_pb2,
)
from tests.cluster import Cluster, Gateway, until
from tests.hostile.test_workers import RawWorker
from tests.security.auth_fixtures import ADMIN, ALICE, Who, bearer, secured, write_auth
from tests.security.conftest import Authority
from tests.security.test_tls import free_port, tls_gateway

IMAGES = Who("image-workers", "*", ("worker",), "images-Tz4pW9", worker_ids="images-*")
# May attach as any worker id: refused for taking over another credential's worker, not
# for its pattern.
SLOPPY = Who("sloppy-workers", "*", ("worker",), "sloppy-Lm3qX8", worker_ids="*")
PRINCIPALS = (ADMIN, ALICE, IMAGES, SLOPPY)


class Intruder(RawWorker):
    """A hand-driven session that may carry a credential and report running attempts."""

    def __init__(self, address: str, token: str = "", channel: grpc.aio.Channel | None = None):
        self.channel = channel or grpc.aio.insecure_channel(address)
        stub = dispatcher_pb2_grpc.DispatcherStub(self.channel)
        self.call = stub.Session(metadata=bearer(token))

    async def attach(  # type: ignore[override]
        self,
        worker_id: str,
        kind: str = "sleep",
        slots: int = 4,
        running: Iterable[tuple[str, int]] = (),
    ) -> None:
        attach = dispatcher_pb2.Attach(
            worker_id=worker_id,
            slots=slots,
            kinds=[dispatcher_pb2.KindCapacity(kind=kind)],
            running=[dispatcher_pb2.AttemptRef(job_id=j, attempt=a) for j, a in running],
        )
        await self.call.write(dispatcher_pb2.SessionRequest(attach=attach))
        first = await self.call.read()
        assert first is not grpc.aio.EOF
        assert first.HasField("welcome"), first

    async def forge_completed(self, job_id: str, attempt: int) -> None:
        ref = {"job_id": job_id, "attempt": attempt}
        result = job_pb2.JobResult(metadata_json='{"forged": true}')
        await self.call.write(
            dispatcher_pb2.SessionRequest(
                accepted=[dispatcher_pb2.Accepted(**ref)],
                progress=[dispatcher_pb2.Progress(**ref, fraction=0.9, message="forged")],
                completed=[dispatcher_pb2.Completed(**ref, result=result)],
            )
        )

    async def acked(self) -> list[tuple[str, int]]:
        """Reads until the gateway acknowledges a result (it does so even for stale ones,
        after the store has committed whatever they changed)."""
        async for message in self.messages():
            await self.pong(message)
            if message.acked:
                return [(a.job_id, a.attempt) for a in message.acked]
        raise AssertionError("the stream ended before an acknowledgement")


def workers(gw: Gateway) -> dict[str, admin_service_pb2.Worker]:
    """The attached workers, as the admin sees them."""
    if gw.tls_ca is None:
        channel = grpc.insecure_channel(gw.address)
    else:
        channel = grpc.secure_channel(
            gw.address, grpc.ssl_channel_credentials(gw.tls_ca.read_bytes())
        )
    with channel:
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        answer = stub.ListWorkers(
            admin_service_pb2.ListWorkersRequest(), metadata=bearer(ADMIN.token), timeout=5
        )
    return {w.worker_id: w for w in answer.workers}


async def running_on(client: AsyncClient, job_id: str, worker_id: str, attempt: int = 1) -> None:
    """Until the attempt runs on the worker."""
    async with asyncio.timeout(30):
        async for event in client.watch(job_id):
            if event.attempt == attempt and event.state == job_pb2.JOB_STATE_RUNNING:
                assert event.worker_id == worker_id
                return
    raise AssertionError(f"job {job_id} ended before attempt {attempt} ran")


async def pong_until_closed(raw: RawWorker) -> None:
    """Answers pings until the gateway ends the stream (with an error status, it raises)."""
    async for message in raw.messages():
        await raw.pong(message)


async def test_a_credential_cannot_take_over_another_ones_worker(cluster: Cluster) -> None:
    gw = secured(cluster, principals=PRINCIPALS)
    worker = cluster.worker(gw, "images-1", "--token", IMAGES.token, wait=False)
    await until(lambda: "images-1" in workers(gw))
    session_id = workers(gw)["images-1"].session_id
    hijacker = Intruder(gw.address, SLOPPY.token)
    async with AsyncClient(gw.address, token=ALICE.token) as client:
        job_id = (await client.submit("sleep", params={"seconds": 3})).job.id
        await running_on(client, job_id, "images-1")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await hijacker.attach("images-1", running=[(job_id, 1)])
        finally:
            await hijacker.close()
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "attached with another credential" in (raised.value.details() or "")

        # Under a worker id of its own, what it says of the job changes nothing.
        forger = Intruder(gw.address, SLOPPY.token)
        try:
            await forger.attach("sloppy-1")
            await forger.forge_completed(job_id, 1)
            assert await forger.acked() == [(job_id, 1)]
            job = await client.get(job_id)
            assert job.state == job_pb2.JOB_STATE_RUNNING
            assert job.progress_message != "forged"
        finally:
            await forger.close()

        job = await client.wait(job_id)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert job.result is not None
        assert job.result.metadata == {"slept": 3}
        assert [(a.number, a.worker_id) for a in job.attempts] == [(1, "images-1")]
        # The real worker was never disturbed and still gets work.
        assert workers(gw)["images-1"].session_id == session_id
        more = await client.wait((await client.submit("sleep", params={"seconds": 0})).job.id)
        assert more.state == job_pb2.JOB_STATE_SUCCEEDED
        assert more.worker_id == "images-1"
    assert worker.alive()
    assert "refused an attach" in gw.output()


async def test_a_worker_id_outside_the_credentials_pattern_is_refused(cluster: Cluster) -> None:
    gw = secured(cluster, principals=PRINCIPALS)
    outsider = Intruder(gw.address, IMAGES.token)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await outsider.attach("billing-1")
    finally:
        await outsider.close()
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = raised.value.details() or ""
    assert "'images-*'" in details
    assert "'billing-1'" in details
    assert workers(gw) == {}


async def test_a_refused_worker_says_why_once_and_attaches_when_its_credential_is_fixed(
    cluster: Cluster,
) -> None:
    gw = secured(cluster, principals=PRINCIPALS)
    worker = cluster.worker(gw, "billing-1", "--token", IMAGES.token, wait=False)
    refusal = "refused this worker (PERMISSION_DENIED"
    await until(lambda: refusal in worker.output())
    # It retries meanwhile (with backoff) but says the same refusal only once.
    await asyncio.sleep(2)
    assert worker.alive()
    assert worker.output().count(refusal) == 1
    assert "'images-*'" in worker.output()

    # The auth file is fixed; the gateway reloads it and the worker gets in by itself.
    fixed = dataclasses.replace(IMAGES, worker_ids="*")
    write_auth(cluster.tmp / "auth.toml", [p if p is not IMAGES else fixed for p in PRINCIPALS])
    await until(lambda: "billing-1" in workers(gw))
    assert worker.output().count(refusal) == 1


async def test_a_certificate_attaches_as_its_own_name_only(
    cluster: Cluster,
    authority: Authority,
    make_authority: Callable[[str], Authority],
    server_cert: tuple[Path, Path],
) -> None:
    clients = make_authority("clients")
    auth = write_auth(cluster.tmp / "auth.toml", [ADMIN, ALICE])
    with auth.open("a") as f:  # a worker known by its certificate alone, no worker_ids
        f.write('[[principal]]\nname = "edge"\ntenant = "*"\nroles = ["worker"]\n')
        f.write('certificate = "edge-7"\n')
    mtls = f"127.0.0.1:{free_port()}"
    gw = tls_gateway(
        cluster,
        authority,
        *server_cert,
        *("--tls-client-ca", str(clients.ca_file), "--mtls-listen", mtls),
        *("--auth-file", str(auth)),
    )
    cert, key = clients.issue("edge-7")
    worker_tls = (
        "--tls-ca",
        str(authority.ca_file),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    cluster.worker(gw, "edge-7", "--gateway", mtls, *worker_tls, wait=False)
    await until(lambda: "edge-7" in workers(gw))

    credentials = grpc.ssl_channel_credentials(
        authority.ca_file.read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    other = Intruder(mtls, channel=grpc.aio.secure_channel(mtls, credentials))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await other.attach("edge-8")
    finally:
        await other.close()
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only as 'edge-7' (its certificate's name), not as 'edge-8'" in (
        raised.value.details() or ""
    )
    assert set(workers(gw)) == {"edge-7"}


async def test_a_lost_workers_attempts_cannot_be_claimed_by_another_credential(
    cluster: Cluster,
) -> None:
    gw = secured(cluster, "--reattach-grace", "2", principals=PRINCIPALS)
    lost = cluster.worker(gw, "images-1", "--token", IMAGES.token, wait=False)
    await until(lambda: "images-1" in workers(gw))
    async with AsyncClient(gw.address, token=ALICE.token) as client:
        job_id = (await client.submit("sleep", params={"seconds": 30})).job.id
        await running_on(client, job_id, "images-1")
        lost.kill()  # its stream breaks: the attempt waits for images-1 to come back
        await until(lambda: "images-1" not in workers(gw))

        # Another credential may attach as images-1 now nobody is, but not as its owner.
        impostor = Intruder(gw.address, SLOPPY.token)
        try:
            await impostor.attach("images-1", running=[(job_id, 1)])
            await impostor.forge_completed(job_id, 1)
            await impostor.acked()
            assert (await client.get(job_id)).state == job_pb2.JOB_STATE_RUNNING
        finally:
            await impostor.close()

        # After the grace, the attempt is lost and the job runs again on a real worker.
        cluster.worker(gw, "images-2", "--token", IMAGES.token, wait=False)
        await running_on(client, job_id, "images-2", attempt=2)
        job = await client.get(job_id)
        await client.cancel(job_id)
    assert [(a.number, a.worker_id) for a in job.attempts] == [(1, "images-1"), (2, "images-2")]
    assert job.attempts[0].error is not None
    assert job.attempts[0].error.code == "WORKER_LOST"


# --- without an auth file: one credential, so the same worker id is the same identity ---


async def test_a_second_attach_of_the_same_worker_closes_the_first_session(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    worker = cluster.worker(gw, "w1")
    first_session = gw.workers()[0].session_id
    async with AsyncClient(gw.address) as client:
        job_id = (await client.submit("sleep", params={"seconds": 3})).job.id
        await running_on(client, job_id, "w1")

        # A second session of w1 replaces the worker's: its stream ends ABORTED, and it
        # says why. It keeps reconnecting, so this one is replaced in turn.
        duplicate = Intruder(gw.address)
        try:
            await duplicate.attach("w1")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await pong_until_closed(duplicate)
        finally:
            await duplicate.close()
        assert raised.value.code() == grpc.StatusCode.ABORTED
        details = raised.value.details() or ""
        assert details.startswith("worker w1 attached again from ")
        assert details.endswith("(a newer session); this session is closed")

        # The worker's session came back, with its running job (the re-attach rules).
        log = worker.output()
        assert "ERROR" in log
        assert "another process attached to" in log
        assert "this worker's id 'w1'" in log
        assert "--worker-id" in log
        job = await client.wait(job_id)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert [(a.number, a.worker_id) for a in job.attempts] == [(1, "w1")]
        [now] = gw.workers()
        assert now.worker_id == "w1"
        assert now.session_id != first_session
        more = await client.wait((await client.submit("echo")).job.id)
        assert more.state == job_pb2.JOB_STATE_SUCCEEDED
    assert gw.output().count("worker w1 detached: replaced by a newer session from") == 2
    assert "Traceback" not in gw.output() + worker.output()


async def test_a_forged_result_for_an_attempt_the_session_does_not_hold_changes_nothing(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        job_id = (await client.submit("sleep", params={"seconds": 2})).job.id
        await running_on(client, job_id, "w1")
        forger = Intruder(gw.address)
        try:
            await forger.attach("w2")
            await forger.forge_completed(job_id, 1)
            await forger.forge_completed(job_id, 2)  # the next attempt, before there is one
            await forger.acked()
            assert (await client.get(job_id)).state == job_pb2.JOB_STATE_RUNNING
        finally:
            await forger.close()
        job = await client.wait(job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.result is not None
    assert job.result.metadata == {"slept": 2}
    assert [(a.number, a.worker_id) for a in job.attempts] == [(1, "w1")]


# --- the scheduler alone: what a closed session says after it was replaced ---


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    store = SqliteStore(":memory:")
    await store.open(lambda events: None)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def scheduler(store: SqliteStore, tmp_path: Path) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(GatewaySettings(db=":memory:"), store, BlobStore(tmp_path, 1 << 20))
    try:
        yield scheduler
    finally:
        scheduler.stop()


def session(worker_id: str, principal: str, peer: str) -> WorkerSession:
    s = WorkerSession(
        session_id=f"{principal}/{worker_id}@{peer}",
        worker_id=worker_id,
        kinds={"echo": 0},
        slots=2,
        principal=principal,
        peer=peer,
    )
    s.answered = 1  # as if it had answered a ping, so it gets work
    return s


def completed(job_id: str, metadata: str) -> dispatcher_pb2.SessionRequest:
    result = job_pb2.JobResult(metadata_json=metadata)
    done = dispatcher_pb2.Completed(job_id=job_id, attempt=1, result=result)
    return dispatcher_pb2.SessionRequest(completed=[done])


async def test_a_replaced_session_is_closed_and_fenced_off(
    scheduler: Scheduler, store: SqliteStore
) -> None:
    old = session("w1", "team", "old-peer")
    scheduler.attach(old, ())
    [inserted] = await scheduler.submit("default", [job_pb2.JobSpec(kind="echo")])
    job_id = inserted.job.id
    assert old.inflight.keys() == {(job_id, 1)}

    new = session("w1", "team", "new-peer")
    scheduler.attach(new, [(job_id, 1)])
    assert old.closed.is_set()
    assert old.close_error is not None
    assert old.close_error.code == grpc.StatusCode.ABORTED
    assert old.close_error.message == (
        "worker w1 attached again from new-peer (a newer session); this session is closed"
    )
    assert list(scheduler.sessions) == [new]
    assert new.inflight.keys() == {(job_id, 1)}

    # What the closed session still says is ignored; the new one's result counts.
    apply(scheduler, old, completed(job_id, '{"from": "old"}'))
    await store.barrier()
    assert (await scheduler.get("default", job_id)).state == job_pb2.JOB_STATE_ASSIGNED
    apply(scheduler, new, completed(job_id, '{"from": "new"}'))
    await store.barrier()
    job = await scheduler.get("default", job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.result.metadata_json == '{"from": "new"}'


async def test_the_same_worker_id_from_another_credential_is_refused(
    scheduler: Scheduler,
) -> None:
    owner = session("w1", "team", "owner")
    scheduler.attach(owner, ())
    [inserted] = await scheduler.submit("default", [job_pb2.JobSpec(kind="echo")])
    job_id = inserted.job.id

    with pytest.raises(PermissionDenied, match="attached with another credential"):
        scheduler.attach(session("w1", "mallory", "thief"), [(job_id, 1)])
    assert not owner.closed.is_set()
    assert list(scheduler.sessions) == [owner]
    assert owner.inflight.keys() == {(job_id, 1)}


async def test_after_a_restart_a_lost_workers_attempts_are_taken_back_by_its_credential_only(
    scheduler: Scheduler, store: SqliteStore, tmp_path: Path
) -> None:
    scheduler.attach(session("w1", "a", "before"), ())
    [inserted] = await scheduler.submit("default", [job_pb2.JobSpec(kind="echo")])
    job_id = inserted.job.id
    await store.barrier()
    scheduler.stop()

    # A new gateway on the same store: the attempt is an orphan of credential a's w1.
    restarted = Scheduler(GatewaySettings(db=":memory:"), store, BlobStore(tmp_path, 1 << 20))
    try:
        assert await restarted.recover() == 1
        [attempt] = (await restarted.get("default", job_id)).attempts
        assert (attempt.worker_id, attempt.principal) == ("w1", "a")

        impostor = session("w1", "b", "impostor")
        restarted.attach(impostor, [(job_id, 1)])
        apply(restarted, impostor, completed(job_id, '{"from": "b"}'))
        await store.barrier()
        assert (await restarted.get("default", job_id)).state == job_pb2.JOB_STATE_ASSIGNED
        restarted.detach(impostor, "gone")

        owner = session("w1", "a", "after")
        restarted.attach(owner, [(job_id, 1)])
        assert owner.inflight.keys() == {(job_id, 1)}
        apply(restarted, owner, completed(job_id, '{"from": "a"}'))
        await store.barrier()
        job = await restarted.get("default", job_id)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert job.result.metadata_json == '{"from": "a"}'
    finally:
        restarted.stop()
