"""Inline inputs beyond the gateway's memory budget wait in the database, not in memory, and
reach their workers intact, across a restart too."""

from __future__ import annotations

import os

from jobmesh import AsyncClient
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster

SIZE = 600 << 10  # under the SDK's 1 MiB inline limit: sent inside Submit


async def test_inputs_past_the_budget_are_read_from_the_store_when_assigned(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway("--max-inline-memory", str(1 << 20))
    payloads = [os.urandom(SIZE) for _ in range(4)]
    async with AsyncClient(gw.address) as client:
        # No worker yet: they queue; only the first fits the budget.
        ids = [(await client.submit("echo", inputs={"in": p})).job.id for p in payloads]
        cluster.worker(gw, "w1")
        jobs = [await client.wait(job_id) for job_id in ids]
    assert [j.state for j in jobs] == [job_pb2.JOB_STATE_SUCCEEDED] * 4
    assert [j.result.outputs["in"] for j in jobs] == payloads


async def test_queued_inputs_survive_a_restart_without_being_loaded(cluster: Cluster) -> None:
    gw = cluster.gateway()
    payloads = [os.urandom(SIZE) for _ in range(3)]
    async with AsyncClient(gw.address) as client:
        ids = [(await client.submit("echo", inputs={"in": p})).job.id for p in payloads]
    gw.stop()
    gw = cluster.gateway()
    assert "3 unfinished jobs recovered" in gw.output()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        jobs = [await client.wait(job_id) for job_id in ids]
        assert [j.result.outputs["in"] for j in jobs] == payloads
        # Get still shows each job's inputs.
        assert [(await client.get(job_id)).spec.inputs["in"] for job_id in ids] == payloads
