"""A poison result (metadata nested past what protobuf parses inside a worker's message)
fails its own job with a code; the worker keeps its one session and serves the next job."""

from __future__ import annotations

import pytest

from jobmesh import AsyncClient
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster


@pytest.mark.parametrize("kind", ["hostile.deep", "hostile.deep_async"])
async def test_a_result_nested_40_deep_fails_its_job_and_the_worker_keeps_its_session(
    cluster: Cluster, kind: str
) -> None:
    gw = cluster.gateway()
    worker = cluster.worker(gw, "w1", "--handlers", "tests.hostile.handlers")
    [before] = gw.workers()
    async with AsyncClient(gw.address) as client:
        poison = await client.wait((await client.submit(kind, params={"depth": 40})).job.id)
        assert poison.state == job_pb2.JOB_STATE_FAILED
        assert (poison.error.code, poison.error.retryable) == ("INVALID_RESULT", False)
        assert "nested deeper than 16 levels" in poison.error.message
        assert len(poison.attempts) == 1

        normal = await client.wait((await client.submit("echo", params={"p": "v"})).job.id)
        assert normal.state == job_pb2.JOB_STATE_SUCCEEDED
        assert normal.worker_id == "w1"
    [after] = gw.workers()
    assert (after.worker_id, after.session_id) == ("w1", before.session_id)
    assert worker.output().count("attached to") == 1
