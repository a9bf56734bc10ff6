"""Workers that lie: silent, greedy or chatty ones lose their jobs to honest workers and
never hold the mesh."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from jobmesh import AsyncClient
from jobmesh.v1 import dispatcher_pb2, dispatcher_pb2_grpc, job_pb2
from tests.cluster import Cluster, Gateway, until


class RawWorker:
    """A Dispatcher/Session stream driven by hand, to behave as no real worker would."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = dispatcher_pb2_grpc.DispatcherStub(self.channel).Session()

    async def attach(self, worker_id: str, kind: str = "echo", slots: int = 10) -> None:
        attach = dispatcher_pb2.Attach(
            worker_id=worker_id,
            slots=slots,
            kinds=[dispatcher_pb2.KindCapacity(kind=kind)],
        )
        await self.call.write(dispatcher_pb2.SessionRequest(attach=attach))
        first = await self.call.read()
        assert first.HasField("welcome"), first

    async def messages(self) -> AsyncIterator[dispatcher_pb2.SessionResponse]:
        while True:
            message = await self.call.read()
            if message is grpc.aio.EOF:
                return
            yield message

    async def pong(self, message: dispatcher_pb2.SessionResponse) -> None:
        """Answers the message's ping, if it carries one."""
        if message.HasField("ping"):
            pong = dispatcher_pb2.Pong(seq=message.ping.seq)
            await self.call.write(dispatcher_pb2.SessionRequest(pong=pong))

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


async def until_ponged(gw: Gateway) -> None:
    """Until a worker has answered a ping: only then does it get work."""
    await until(lambda: any(w.HasField("last_pong_time") for w in gw.workers()))


async def test_a_worker_that_talks_but_never_answers_pings_is_declared_dead(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway("--ping-misses", "3")  # pings every 0.5 s
    black_hole = RawWorker(gw.address)
    await black_hole.attach("black-hole")
    assigned: list[str] = []

    async def accept_and_chatter() -> None:
        # Answers the first ping, so it gets work; then accepts every job and reports
        # progress on it, but never answers a ping again.
        answered = False
        async for message in black_hole.messages():
            if message.HasField("ping") and not answered:
                answered = True
                await black_hole.pong(message)
            for assign in message.assign:
                assigned.append(assign.job_id)
                ref = {"job_id": assign.job_id, "attempt": assign.attempt}
                await black_hole.call.write(
                    dispatcher_pb2.SessionRequest(
                        accepted=[dispatcher_pb2.Accepted(**ref)],
                        progress=[dispatcher_pb2.Progress(**ref, fraction=0.1)],
                    )
                )

    chatter = asyncio.create_task(accept_and_chatter())
    try:
        await until_ponged(gw)
        async with AsyncClient(gw.address) as client:
            ids = [(await client.submit("echo", params={"i": i})).job.id for i in range(4)]
            await until(lambda: len(assigned) == 4)
            cluster.worker(gw, "honest")
            jobs = [await client.wait(job_id) for job_id in ids]
    finally:
        chatter.cancel()
        await black_hole.close()
    assert [j.state for j in jobs] == [job_pb2.JOB_STATE_SUCCEEDED] * 4
    assert all(j.attempts[0].worker_id == "black-hole" for j in jobs)
    assert all(j.attempts[-1].worker_id == "honest" for j in jobs)
    assert "black-hole detached: no answer" in gw.output()


@pytest.mark.parametrize(
    ("worker_id", "slots", "field"),
    [("greedy", 10_000, "attach.slots"), ("w" * 300, 2, "attach.worker_id")],
)
async def test_an_attach_past_the_limits_is_refused(
    cluster: Cluster, worker_id: str, slots: int, field: str
) -> None:
    gw = cluster.gateway()
    worker = RawWorker(gw.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await worker.attach(worker_id, slots=slots)
    finally:
        await worker.close()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")
    assert gw.workers() == []


async def test_a_progress_message_past_the_limit_fails_the_attempt_not_the_session(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    chatty = RawWorker(gw.address)
    await chatty.attach("chatty", slots=1)
    async with AsyncClient(gw.address) as client:
        job_id = (await client.submit("echo")).job.id
        messages = chatty.messages()
        async for message in messages:
            await chatty.pong(message)
            if message.assign:
                break
        assign = message.assign[0]
        ref = {"job_id": assign.job_id, "attempt": assign.attempt}
        await chatty.call.write(
            dispatcher_pb2.SessionRequest(
                progress=[dispatcher_pb2.Progress(**ref, fraction=0.5, message="m" * (4 << 20))]
            )
        )
        job = await client.wait(job_id)
        assert job.state == job_pb2.JOB_STATE_FAILED
        assert job.error.code == "INVALID_PROGRESS"
        # The session is still there: the worker is listed and, once it reports the
        # cancelled attempt ended, gets the next job.
        assert [w.worker_id for w in gw.workers()] == ["chatty"]
        next_id = (await client.submit("echo")).job.id
        async for message in messages:
            await chatty.pong(message)
            for cancel in message.cancel:
                failed = dispatcher_pb2.Failed(
                    job_id=cancel.job_id,
                    attempt=cancel.attempt,
                    error=job_pb2.JobError(code="CANCELLED", message=cancel.reason),
                )
                await chatty.call.write(dispatcher_pb2.SessionRequest(failed=[failed]))
            if message.assign:
                break
        assert message.assign[0].job_id == next_id
    await chatty.close()


async def test_a_worker_that_answers_pings_but_never_accepts_draws_no_more_jobs(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway("--ack-timeout", "1")
    black_hole = RawWorker(gw.address)
    await black_hole.attach("pongs-only")
    assigned: list[tuple[str, int]] = []

    async def pong_only() -> None:
        async for message in black_hole.messages():
            await black_hole.pong(message)
            assigned.extend((a.job_id, a.attempt) for a in message.assign)

    answering = asyncio.create_task(pong_only())
    try:
        await until_ponged(gw)
        async with AsyncClient(gw.address) as client:
            ids = [(await client.submit("echo", params={"i": i})).job.id for i in range(3)]
            await until(lambda: len(assigned) == 3)
            cluster.worker(gw, "honest")
            jobs = [await client.wait(job_id) for job_id in ids]
            # Still attached and answering, but it drew nothing after its first miss.
            more = [(await client.submit("echo")).job.id for _ in range(3)]
            jobs += [await client.wait(job_id) for job_id in more]
    finally:
        answering.cancel()
        await black_hole.close()
    assert [j.state for j in jobs] == [job_pb2.JOB_STATE_SUCCEEDED] * 6
    assert all(j.attempts[-1].worker_id == "honest" for j in jobs)
    assert sorted(assigned) == sorted((job_id, 1) for job_id in ids)


async def test_a_refused_assign_is_queued_again_without_using_an_attempt(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    worker = RawWorker(gw.address)
    await worker.attach("refuser", slots=1)
    reason = "no free slot: a handler outlived its attempt " + "x" * 5000
    params = '{"n": 9007199254740991}'
    async with AsyncClient(gw.address) as client:
        [submitted] = await client.submit_batch([job_pb2.JobSpec(kind="echo", params_json=params)])
        job_id = submitted.job.id
        assigns: list[dispatcher_pb2.Assign] = []
        async for message in worker.messages():
            await worker.pong(message)
            if not message.assign:
                continue
            assign = message.assign[0]
            assigns.append(assign)
            ref = {"job_id": assign.job_id, "attempt": assign.attempt}
            if len(assigns) == 1:
                refused = dispatcher_pb2.Refused(**ref, reason=reason)
                await worker.call.write(dispatcher_pb2.SessionRequest(refused=[refused]))
            elif len(assigns) == 2:
                # An old worker's refusal: a failure like any other now, retried as it says.
                error = job_pb2.JobError(code="REJECTED", message="old worker", retryable=True)
                failed = dispatcher_pb2.Failed(**ref, error=error)
                await worker.call.write(dispatcher_pb2.SessionRequest(failed=[failed]))
            else:
                result = job_pb2.JobResult(metadata_json='{"big": 9007199254740991}')
                done = dispatcher_pb2.Completed(**ref, result=result)
                await worker.call.write(dispatcher_pb2.SessionRequest(completed=[done]))
                break
        job = await client.wait(job_id)
        events = [e async for e in client.watch(job_id)]
    await worker.close()
    assert [(a.job_id, a.attempt) for a in assigns] == [(job_id, 1), (job_id, 1), (job_id, 2)]
    assert all(a.params_json == params for a in assigns)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert [a.number for a in job.attempts] == [1, 2]
    assert job.attempts[0].error.code == "REJECTED"
    assert job.result is not None
    assert job.result.metadata == {"big": 2**53 - 1}
    [requeued] = [e for e in events if "refused" in e.message]
    assert requeued.state == job_pb2.JOB_STATE_QUEUED
    assert requeued.attempt == 1
    assert requeued.message.startswith(
        "worker refuser refused the job; queued again: no free slot: a handler outlived"
    )
    assert requeued.message.endswith("[... cut]")
    assert len(requeued.message) <= 4096
    assert "Traceback" not in gw.output()
