"""A watch that disconnects and resumes from after_seq misses nothing."""

from __future__ import annotations

import grpc

from jobmesh import AsyncClient, JobState
from jobmesh.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.cluster import Cluster


async def test_a_resumed_watch_misses_no_event(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        spec = job_pb2.JobSpec(kind="sleep", params_json='{"seconds": 1.0}')
        job = (await stub.Submit(job_service_pb2.SubmitRequest(spec=spec))).job

        first: list[job_pb2.JobEvent] = []
        call = stub.Watch(job_service_pb2.WatchRequest(job_id=job.id))
        async for response in call:
            first.append(response.event)
            if len(first) == 5:
                break
        call.cancel()  # the client goes away mid-job

        resumed = [
            r.event
            async for r in stub.Watch(
                job_service_pb2.WatchRequest(job_id=job.id, after_seq=first[-1].seq)
            )
        ]
        everything = [
            r.event async for r in stub.Watch(job_service_pb2.WatchRequest(job_id=job.id))
        ]
    seen = first + resumed
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen == everything
    assert seen[-1].state == job_pb2.JOB_STATE_SUCCEEDED


async def test_watching_an_ended_job_replays_it_and_ends(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        job = await client.wait((await client.submit("echo")).job.id)
        replay = [e async for e in client.watch(job.id)]
        past_the_end = [e async for e in client.watch(job.id, after_seq=job.event_seq)]
    assert replay[-1].seq == job.event_seq
    assert replay[-1].state is JobState.SUCCEEDED
    assert past_the_end == []
