"""What a worker does with results the gateway could not take: large outputs go to blobs
before any size check, results over the shared limits fail their attempt with a code, and
long messages are cut; the session carries on either way."""

from __future__ import annotations

import json

import pytest

from jobmesh import AsyncClient
from jobmesh.limits import DEFAULT_LIMITS
from jobmesh.v1 import dispatcher_pb2 as d
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster
from tests.worker.conftest import HANDLERS
from tests.worker.fake_gateway import FakeGateway, StartWorker

MiB = 1 << 20


async def test_outputs_too_large_for_a_message_go_to_blobs_and_the_job_succeeds(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = cluster.gateway()
    monkeypatch.setenv("JOBMESH_MAX_MESSAGE_BYTES", str(2 * MiB))  # the worker's, not the gateway's
    cluster.worker(gw, "w1", "--handlers", HANDLERS)
    async with AsyncClient(gw.address) as client:
        # One output over the message limit; four under the inline limit that together are.
        one = await client.submit("test.outputs", params={"size": 3 * MiB})
        four = await client.submit("test.outputs", params={"size": 600_000, "count": 4})
        for submitted, count, size in ((one, 1, 3 * MiB), (four, 4, 600_000)):
            job = await client.wait(submitted.job.id)
            assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
            result = job.result
            assert result is not None
            assert sorted([*result.outputs, *result.output_blobs]) == [
                f"out{i}" for i in range(count)
            ]
            assert result.output_blobs, "nothing went to a blob"
            for name, ref in result.output_blobs.items():
                data = await client.download(ref.id)
                assert data == bytes([65 + int(name[3:])]) * size
            assert result.proto.ByteSize() < 2 * MiB


async def test_inline_outputs_over_what_the_gateway_takes_inline_go_to_blobs(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--handlers", HANDLERS)
    count = DEFAULT_LIMITS.max_inline_bytes // MiB + 4  # each at the inline limit, not over
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit("test.outputs", params={"size": MiB, "count": count})
        job = await client.wait(submitted.job.id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.result is not None
    assert len(job.result.outputs) + len(job.result.output_blobs) == count
    assert sum(len(data) for data in job.result.outputs.values()) <= DEFAULT_LIMITS.max_inline_bytes


async def test_a_result_still_too_large_after_offload_fails_without_retry(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    await start_worker(env={"JOBMESH_MAX_MESSAGE_BYTES": str(64 * 1024)})
    session = await gateway.session()
    session.assign("m1", "test.outputs", count=0, text=100_000)  # metadata: no blob takes it
    failed = await session.result_of("m1")
    assert isinstance(failed, d.Failed)
    assert (failed.error.code, failed.error.retryable) == ("RESULT_TOO_LARGE", False)
    assert "max_message_bytes" in failed.error.message


async def test_metadata_too_deep_fails_the_attempt_and_the_session_serves_on(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    await start_worker()
    session = await gateway.session()
    session.assign("deep", "test.deep", depth=40)
    failed = await session.result_of("deep")
    assert isinstance(failed, d.Failed)
    assert (failed.error.code, failed.error.retryable) == ("INVALID_RESULT", False)
    assert "nested deeper than 16 levels" in failed.error.message
    session.assign("e1", "echo", p="v")
    done = await session.result_of("e1")
    assert isinstance(done, d.Completed)
    assert json.loads(done.result.metadata_json) == {"p": "v"}
    assert gateway.sessions.empty()  # the same stream all along: no reconnect


async def test_long_progress_and_error_messages_are_cut(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    await start_worker()
    session = await gateway.session()
    session.assign("c1", "test.chatty", length=10_000)
    progress = await session.next(d.Progress)
    assert isinstance(progress, d.Progress)
    assert len(progress.message) <= DEFAULT_LIMITS.max_text
    assert progress.message.endswith("[... cut]")
    failed = await session.result_of("c1")
    assert isinstance(failed, d.Failed)
    assert failed.error.code == "CHATTY"
    assert len(failed.error.message) <= DEFAULT_LIMITS.max_text
    assert failed.error.message.endswith("[... cut]")
