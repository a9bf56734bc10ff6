"""Bad requests get the right status code and the gateway keeps serving."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobmesh import AsyncClient, InvalidArgument, JobState, NotFound, ResourceExhausted
from jobmesh.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.cluster import Cluster

LIMIT = 64 * 1024


async def test_bad_requests_are_answered_and_the_gateway_keeps_serving(cluster: Cluster) -> None:
    gw = cluster.gateway("--max-message-bytes", str(LIMIT))
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        with pytest.raises(InvalidArgument, match=r"spec\.kind"):
            await client.submit("")
        with pytest.raises(InvalidArgument, match=r"spec\.kind"):
            await client.submit("no spaces allowed")
        with pytest.raises(ResourceExhausted):
            await client.submit("echo", inputs={"big": b"x" * (2 * LIMIT)})
        with pytest.raises(NotFound):
            await client.get("0123456789abcdef0123456789abcdef")
        with pytest.raises(NotFound):
            await client.cancel("no-such-job")
        with pytest.raises(InvalidArgument, match="page_token"):
            await client.list(page_token="not a token")
        with pytest.raises(InvalidArgument, match=r"specs\[1\]\.kind"):
            await client.submit_batch([job_pb2.JobSpec(kind="echo"), job_pb2.JobSpec(kind="")])
        with pytest.raises(InvalidArgument, match="input name"):
            await client.submit("echo", inputs={"../escape": b""})

        # Still serving, and nothing from the bad batch was accepted.
        job = await client.wait((await client.submit("echo")).job.id)
        assert job.state is JobState.SUCCEEDED
        jobs, _ = await client.list()
        assert [j.id for j in jobs] == [job.id]

    async with grpc.aio.insecure_channel(gw.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await (
                job_service_pb2_grpc.JobServiceStub(channel)
                .Watch(job_service_pb2.WatchRequest(job_id=""))
                .read()
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_kind_no_worker_serves_waits_in_the_queue(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit("nobody.serves.this")
        assert submitted.warnings
        assert "nobody.serves.this" in submitted.warnings[0]
        queued, _ = await client.list(states=["QUEUED"])
        assert [j.id for j in queued] == [submitted.job.id]
        # A served kind still runs while it waits.
        assert (await client.wait((await client.submit("echo")).job.id)).state == (
            JobState.SUCCEEDED
        )
        assert (await client.get(submitted.job.id)).state is JobState.QUEUED
        cancelled = await client.cancel(submitted.job.id, reason="typo in kind")
        assert cancelled.state is JobState.CANCELLED
        assert cancelled.error.message == "typo in kind"
        again = await client.cancel(submitted.job.id)
        assert again.state is JobState.CANCELLED


async def test_params_a_kind_does_not_take_are_refused_at_submit(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--products", "builtin,images")
    async with AsyncClient(gw.address) as client:
        with pytest.raises(InvalidArgument, match=r"spec\.params_json\.seconds: must be a number"):
            await client.submit("sleep", params={"seconds": "long"})
        with pytest.raises(
            InvalidArgument, match=r"spec\.params_json: image\.thumbnail takes no param 'colour'"
        ):
            await client.submit("image.thumbnail", params={"colour": "red"})
        with pytest.raises(
            InvalidArgument, match=r"spec\.params_json\.size: must be at most 10000"
        ):
            await client.submit("image.thumbnail", params={"size": 10**6})
        # echo declares no schema: anything goes.
        job = await client.wait((await client.submit("echo", params={"any": [1, 2]})).job.id)
    assert job.state is JobState.SUCCEEDED
