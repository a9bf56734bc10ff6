"""Hostile and careless requests get INVALID_ARGUMENT naming the field and the limit; the
gateway keeps serving and nothing accepted is lost."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from jobmesh import AsyncClient, InvalidArgument, ResourceExhausted
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


async def test_params_too_deep_or_too_large_are_refused_and_list_still_works(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        with pytest.raises(InvalidArgument, match=r"spec\.params: nested deeper than 16 levels"):
            await client.submit("echo", params=nested(32))
        with pytest.raises(InvalidArgument, match=r"spec\.params: \d+ bytes; at most 1048576"):
            await client.submit("echo", params={"blob": "x" * (2 << 20)})
        with pytest.raises(InvalidArgument, match=r"specs\[1\]\.params: nested deeper"):
            await client.submit_batch([job_pb2.JobSpec(kind="echo"), _spec("echo", nested(17))])
        with pytest.raises(InvalidArgument, match=r"spec\.idempotency_key: 300 characters"):
            await client.submit("echo", idempotency_key="k" * 300)
        with pytest.raises(InvalidArgument, match=r"spec\.inputs: 300 entries; at most 256"):
            await client.submit("echo", inputs={f"in{i}": b"" for i in range(300)})
        with pytest.raises(InvalidArgument, match=r"specs\[0\]\.retention: must be positive"):
            await client.submit_batch([_spec("echo", {}, retention=-5)])
        with pytest.raises(InvalidArgument, match=r"reason: 5000 characters; at most 4096"):
            await client.cancel("0123456789abcdef0123456789abcdef", reason="r" * 5000)

        # The deepest params allowed still make a job whose Get, List and Watch work.
        deep = await client.wait((await client.submit("echo", params=nested(16))).job.id)
        assert deep.state == job_pb2.JOB_STATE_SUCCEEDED
        jobs, _ = await client.list()
        assert [j.id for j in jobs] == [deep.id]
        events = [e async for e in client.watch(deep.id)]
        assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED


async def test_list_pages_by_bytes_so_large_jobs_never_break_it(cluster: Cluster) -> None:
    limit = 2 << 20
    gw = cluster.gateway("--max-message-bytes", str(limit))
    async with AsyncClient(gw.address) as client:
        # No worker: the jobs stay queued. Together they are more than one message.
        ids = {
            (await client.submit("echo", params={"text": "p" * (400 << 10), "i": i})).job.id
            for i in range(8)
        }
        pages: list[list[str]] = []
        token = ""
        while True:
            page, token = await client.list(page_token=token)
            pages.append([j.id for j in page])
            if not token:
                break
    assert all(pages), "a page is never empty while more follow"
    assert len(pages) > 1
    assert sorted(i for page in pages for i in page) == sorted(ids)


async def test_a_request_that_does_not_parse_is_invalid_argument_without_traceback(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    async with grpc.aio.insecure_channel(gw.address) as channel:
        submit = channel.unary_unary("/jobmesh.v1.JobService/Submit")
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await submit(b"\x0a\xff\xff\xff\xff\x0f")  # a field longer than the message
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse" in (raised.value.details() or "")
    async with AsyncClient(gw.address) as client:
        assert (await client.submit("echo")).job.state == job_pb2.JOB_STATE_QUEUED
    log = gw.output()
    assert "Traceback" not in log
    # One line for the first, the rest folded into the next report (rate-limited).
    assert 1 <= log.count("malformed request") < 20


async def test_inline_inputs_arriving_past_the_memory_budget_are_refused(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway("--max-inline-memory", str(1 << 20))
    async with AsyncClient(gw.address) as client:
        big = [_spec("echo", {}, inputs={"in": bytes(600 << 10)}) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="inline inputs"):
            await client.submit_batch(big)
        jobs, _ = await client.list()
        assert jobs == []


def _spec(
    kind: str,
    params: dict[str, Any],
    *,
    inputs: dict[str, bytes] | None = None,
    retention: float | None = None,
) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(kind=kind, inputs=inputs or {})
    spec.params.update(params)
    if retention is not None:
        spec.retention.FromNanoseconds(int(retention * 1e9))
    return spec
