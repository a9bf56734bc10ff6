"""Several gateways on one PostgreSQL database, all active: any gateway takes any call, a job
submitted at one runs on a worker of another, Watch, Cancel and ListWorkers see the whole
mesh, and a gateway that dies leaves its work to the others."""

from __future__ import annotations

import asyncio
import signal
import urllib.parse

import pytest

from jobmesh import AsyncClient, JobState, job_spec
from tests.cluster import Cluster, Gateway, until
from tests.faults.proxy import TcpProxy
from tests.integration.test_telemetry import jobmesh

pytestmark = [
    pytest.mark.one_store,
    pytest.mark.parametrize("cluster", ["postgresql"], indirect=True),
    pytest.mark.timeout(120),
]

LEASE = "2"


def gateways(cluster: Cluster, n: int, *extra: str) -> list[Gateway]:
    return [cluster.gateway("--lease", LEASE, *extra) for _ in range(n)]


async def test_a_job_submitted_at_one_gateway_runs_on_a_worker_of_another(cluster: Cluster) -> None:
    a, b, _ = gateways(cluster, 3)
    cluster.worker(b, "w1")
    async with AsyncClient(a.address) as client:
        submitted = await client.submit("echo", params={"n": 1})
        # Watched at A while it runs at B: every event, live, in order, the result with it.
        events = [e async for e in client.watch(submitted.job.id)]
    assert [e.seq for e in events] == list(range(1, events[-1].seq + 1))
    assert events[-1].state == JobState.SUCCEEDED
    assert events[-1].result is not None


async def test_every_gateway_lists_the_whole_mesh_with_each_workers_gateway(
    cluster: Cluster,
) -> None:
    a, b, c = gateways(cluster, 3)
    cluster.worker(a, "wa")
    cluster.worker(c, "wc")
    async with AsyncClient(b.address) as client:

        async def listed() -> dict[str, str]:  # each gateway says its workers every beat
            return {w.worker_id: w.gateway for w in await client.list_workers()}

        found: dict[str, str] = {}
        async with asyncio.timeout(30):
            while set(found) != {"wa", "wc"}:
                found = await listed()
                await asyncio.sleep(0.2)
    assert found["wa"] != found["wc"]
    assert all(found.values())
    shown = await asyncio.to_thread(jobmesh, b.address, "workers")
    assert shown.returncode == 0, shown.stderr
    [header, *rows] = shown.stdout.splitlines()
    assert header.split()[-1] == "GATEWAY"
    assert sorted(row.split()[0] for row in rows) == ["wa", "wc"]


async def test_a_cancel_at_one_gateway_stops_the_job_on_another(cluster: Cluster) -> None:
    a, b = gateways(cluster, 2)
    worker = cluster.worker(b, "w1")
    async with AsyncClient(a.address) as client:
        job = (await client.submit("sleep", params={"seconds": 30})).job
        await until_running(client, job.id)
        cancelled = await client.cancel(job.id, reason="not needed")
        assert cancelled.state == JobState.CANCELLED
    await until(lambda: "cancelled after" in worker.output())


async def test_a_killed_gateways_jobs_are_finished_by_the_others(cluster: Cluster) -> None:
    a, b, c = gateways(cluster, 3, "--reattach-grace", "2")
    cluster.worker(a, "wa")
    cluster.worker(b, "wb")
    async with AsyncClient(c.address) as client:
        spec = job_spec("sleep", params={"seconds": 0.1})
        # About 2 s of work on two workers.
        ids = [s.job.id for s in await client.submit_batch([spec] * 40)]
        await until_running(client, ids[0])
        a.signal(signal.SIGKILL)
        a.wait()
        async with asyncio.timeout(60):
            jobs = [await client.wait(i) for i in ids]
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * len(ids)


async def until_running(client: AsyncClient, job_id: str) -> None:
    async with asyncio.timeout(30):
        while (await client.get(job_id)).state != JobState.RUNNING:  # noqa: ASYNC110  # a worker makes it true
            await asyncio.sleep(0.05)


async def test_a_dead_gateways_worker_carries_its_attempts_to_a_survivor(cluster: Cluster) -> None:
    a, b = gateways(cluster, 2)
    # The worker dials a Service: the proxy, which sends new connections to B once A died.
    with TcpProxy(a.address) as service:
        worker = cluster.worker(a, "w1", slots=2, wait=False, address=service.address)
        a.wait_for_workers({"w1"})
        async with AsyncClient(b.address) as client:
            spec = job_spec("sleep", params={"seconds": 4})
            ids = [s.job.id for s in await client.submit_batch([spec, spec])]
            for job_id in ids:
                await until_running(client, job_id)
            a.signal(signal.SIGKILL)
            a.wait()
            service.retarget(b.address)
            service.cut()
            async with asyncio.timeout(60):
                jobs = [await client.wait(i) for i in ids]
    # Each ran once, by its first attempt, carried on at B.
    assert [(j.state, j.attempt) for j in jobs] == [(JobState.SUCCEEDED, 1)] * 2
    assert worker.alive()


async def test_a_gateway_cut_off_from_the_database_stops_and_its_work_moves_on(
    cluster: Cluster, pg_dsn: str
) -> None:
    b = gateways(cluster, 1)[0]
    parts = urllib.parse.urlsplit(pg_dsn)
    with (
        TcpProxy(f"{parts.hostname}:{parts.port}") as database,
        TcpProxy(b.address) as service,
    ):
        # A reaches the database through a link the test cuts; its worker, through a
        # Service that sends new connections to B once A is gone.
        cut_off = urllib.parse.urlunsplit(parts._replace(netloc=f"postgres@{database.address}"))
        a = cluster.gateway("--lease", LEASE, "--db", cut_off, "--blob-dir", str(cluster.blob_dir))
        service.retarget(a.address)
        cluster.worker(a, "w1", slots=2, wait=False, address=service.address)
        a.wait_for_workers({"w1"})
        async with AsyncClient(b.address) as client:
            spec = job_spec("sleep", params={"seconds": 1})
            ids = [s.job.id for s in await client.submit_batch([spec] * 6)]
            await until_running(client, ids[0])
            database.blackhole()
            # B declares A dead after its lease; A, once it reaches the database, stops.
            await until(lambda: "took over from gateways" in b.output())
            service.retarget(b.address)
            database.restore()
            assert await asyncio.to_thread(a.wait, 30) == 3
            assert "stopped" in a.output()
            async with asyncio.timeout(60):
                jobs = [await client.wait(i) for i in ids]
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * len(ids)
