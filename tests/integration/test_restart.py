"""The gateway restarted on the same SQLite file loses no accepted job."""

from __future__ import annotations

import asyncio

from jobmesh import AsyncClient
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster


async def test_jobs_queued_before_a_graceful_restart_still_complete(cluster: Cluster) -> None:
    gw = cluster.gateway()
    async with AsyncClient(gw.address) as client:
        ids = [(await client.submit("echo", params={"i": i})).job.id for i in range(5)]
    assert gw.stop() == 0

    gw2 = cluster.gateway()
    cluster.worker(gw2, "w1")
    async with AsyncClient(gw2.address) as client:
        jobs = await asyncio.gather(*(client.wait(i) for i in ids))
    assert [j.state for j in jobs] == [job_pb2.JOB_STATE_SUCCEEDED] * 5
    assert [j.result.metadata["i"] for j in jobs] == [0, 1, 2, 3, 4]


async def test_jobs_survive_a_killed_gateway(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=1, wait=True)
    async with AsyncClient(gw.address) as client:
        running = (await client.submit("sleep", params={"seconds": 30})).job.id
        async for event in client.watch(running):
            if event.state == job_pb2.JOB_STATE_RUNNING:
                break
        queued = [(await client.submit("echo", params={"i": i})).job.id for i in range(3)]
    gw.kill()

    gw2 = cluster.gateway()
    cluster.worker(gw2, "w2", slots=2)
    async with AsyncClient(gw2.address) as client:
        jobs = await asyncio.gather(*(client.wait(i) for i in queued))
        assert [j.state for j in jobs] == [job_pb2.JOB_STATE_SUCCEEDED] * 3
        # The attempt that was running when the gateway died is tried again.
        interrupted = await client.get(running)
        assert interrupted.attempt == 2
        assert interrupted.attempts[0].error.code == "WORKER_LOST"
        await client.cancel(running)
