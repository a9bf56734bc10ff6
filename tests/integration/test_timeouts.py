"""Timeouts, the unacknowledged assignment and the bounded queue, through real processes."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest

from jobmesh import AsyncClient, JobState, ResourceExhausted
from jobmesh.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from tests.cluster import Cluster


async def test_a_job_nobody_starts_in_time_fails_with_a_clear_code(cluster: Cluster) -> None:
    gw = cluster.gateway()
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit("echo", schedule_to_start_timeout=0.5)
        job = await client.wait(submitted.job.id)
    assert job.state is JobState.FAILED
    assert job.error.code == "SCHEDULE_TO_START_TIMEOUT"
    assert not job.attempts


async def test_a_job_past_its_deadline_fails_and_its_worker_moves_on(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=1)
    async with AsyncClient(gw.address) as client:
        slow = await client.submit("sleep", params={"seconds": 60}, schedule_to_close_timeout=1)
        job = await client.wait(slow.job.id)
        # The worker was told to stop, so its only slot is free for the next job.
        after = await client.wait((await client.submit("echo")).job.id)
    assert job.state is JobState.FAILED
    assert job.error.code == "DEADLINE_EXCEEDED"
    assert job.attempts[0].error.code == "DEADLINE_EXCEEDED"
    assert after.state is JobState.SUCCEEDED
    assert after.worker_id == "w1"


async def test_a_full_queue_refuses_submits_until_there_is_room(cluster: Cluster) -> None:
    gw = cluster.gateway("--max-queued", "3")
    async with AsyncClient(gw.address) as client:
        accepted = [await client.submit("echo") for _ in range(3)]
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await client.submit("echo")
        cli = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "jobmesh"),
            "submit",
            "echo",
            env={**os.environ, "JOBMESH_GATEWAY": gw.address},
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await cli.communicate()
        assert cli.returncode == 3
        assert "RESOURCE_EXHAUSTED" in stderr.decode()
        assert "queue is full" in stderr.decode()
        await client.cancel(accepted[0].job.id)
        assert (await client.submit("echo")).job.state is JobState.QUEUED
        jobs, _ = await client.list()
    assert len(jobs) == 4


async def test_an_assignment_never_accepted_goes_back_to_the_queue(cluster: Cluster) -> None:
    gw = cluster.gateway("--ack-timeout", "0.5")
    async with grpc.aio.insecure_channel(gw.address) as channel:
        # A worker that answers pings (so it gets work) but loses every Assign.
        mute = dispatcher_pb2_grpc.DispatcherStub(channel).Session()
        await mute.write(
            dispatcher_pb2.SessionRequest(
                attach=dispatcher_pb2.Attach(
                    worker_id="mute", kinds=[dispatcher_pb2.KindCapacity(kind="echo")], slots=1
                )
            )
        )
        await mute.read()  # the Welcome

        async def pong() -> None:
            while (message := await mute.read()) is not grpc.aio.EOF:
                if message.HasField("ping"):
                    answer = dispatcher_pb2.Pong(seq=message.ping.seq)
                    await mute.write(dispatcher_pb2.SessionRequest(pong=answer))

        ponging = asyncio.create_task(pong())
        async with AsyncClient(gw.address) as client:
            submitted = await client.submit("echo", max_attempts=10)
            async for event in client.watch(submitted.job.id):
                if event.error and event.error.code == "ASSIGN_NOT_ACKNOWLEDGED":
                    break
            ponging.cancel()
            mute.cancel()
            cluster.worker(gw, "w1")
            job = await client.wait(submitted.job.id)
    assert job.state is JobState.SUCCEEDED
    assert job.worker_id == "w1"
    assert job.attempts[0].worker_id == "mute"
    assert job.attempts[0].error.code == "ASSIGN_NOT_ACKNOWLEDGED"


async def test_an_attempt_over_its_time_is_stopped_and_retried(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--cancel-grace", "0.5", slots=1)
    async with AsyncClient(gw.address) as client:
        slow = await client.submit(
            "sleep", params={"seconds": 60}, start_to_close_timeout=0.5, max_attempts=2
        )
        job = await client.wait(slow.job.id)
        after = await client.wait((await client.submit("echo")).job.id)
    assert job.state is JobState.FAILED
    assert job.error.code == "TIMEOUT"
    assert job.error.retryable
    assert [a.error.code for a in job.attempts] == ["TIMEOUT", "TIMEOUT"]
    assert after.state is JobState.SUCCEEDED
