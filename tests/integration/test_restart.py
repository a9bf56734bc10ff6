"""The gateway restarted on the same SQLite file loses no accepted job."""

from __future__ import annotations

import asyncio
from pathlib import Path

from jobmesh import AsyncClient, JobState
from tests.cluster import Cluster, until


async def test_jobs_queued_before_a_graceful_restart_still_complete(cluster: Cluster) -> None:
    gw = cluster.gateway()
    async with AsyncClient(gw.address) as client:
        ids = [(await client.submit("echo", params={"i": i})).job.id for i in range(5)]
    assert gw.stop() == 0

    gw2 = cluster.gateway()
    cluster.worker(gw2, "w1")
    async with AsyncClient(gw2.address) as client:
        jobs = await asyncio.gather(*(client.wait(i) for i in ids))
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 5
    assert [j.result.metadata["i"] for j in jobs] == [0, 1, 2, 3, 4]


async def test_a_killed_gateway_restarted_on_its_port_loses_and_repeats_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--handlers", "tests.integration.handlers", slots=1)
    runs = tmp_path / "runs.log"
    async with AsyncClient(gw.address) as client:
        running = (await client.submit("count", params={"log": str(runs), "seconds": 2})).job.id
        await until(lambda: runs.exists() and runs.read_text() != "")
        queued = [(await client.submit("echo", params={"i": i})).job.id for i in range(3)]
    gw.kill()

    # The worker re-attaches to the new gateway and carries on with its job.
    gw2 = cluster.gateway(port=gw.port)
    async with AsyncClient(gw2.address) as client:
        jobs = await asyncio.gather(*(client.wait(i) for i in [running, *queued]))
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 4
    assert jobs[0].attempt == 1
    assert runs.read_text().split() == [running, "1"]  # it ran once


async def test_a_lost_workers_job_is_retried_after_the_reattach_grace(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=1)
    async with AsyncClient(gw.address) as client:
        running = (await client.submit("sleep", params={"seconds": 30})).job.id
        async for event in client.watch(running):
            if event.state is JobState.RUNNING:
                break
    gw.kill()

    # On another port w1 cannot come back: after the grace the job runs on w2.
    gw2 = cluster.gateway("--reattach-grace", "0.5")
    cluster.worker(gw2, "w2", slots=1)
    async with AsyncClient(gw2.address) as client:
        async for event in client.watch(running):
            if event.attempt == 2 and event.state is JobState.RUNNING:
                break
        job = await client.get(running)
        await client.cancel(running)
    assert job.worker_id == "w2"
    assert job.attempts[0].error.code == "WORKER_LOST"
    assert "did not come back" in job.attempts[0].error.message
