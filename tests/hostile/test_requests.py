"""Hostile and careless requests get INVALID_ARGUMENT naming the field and the limit; the
gateway keeps serving and nothing accepted is lost."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from jobmesh import AsyncClient, InvalidArgument, ResourceExhausted
from jobmesh.errors import from_rpc_error
from jobmesh.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.cluster import Cluster


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def nested_json(depth: int) -> str:
    return '{"x":' * (depth - 1) + '{"leaf":1}' + "}" * (depth - 1)


async def submit(address: str, spec: job_pb2.JobSpec) -> job_pb2.Job:
    """Submits the spec as it is: not through the SDK, which may check params itself."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        try:
            response = await stub.Submit(job_service_pb2.SubmitRequest(spec=spec))
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
    return response.job


async def get(address: str, job_id: str) -> job_pb2.Job:
    """The job as the gateway answers Get, message and all."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        response = await stub.Get(job_service_pb2.GetRequest(job_id=job_id))
    return response.job


async def run(address: str, spec: job_pb2.JobSpec) -> None:
    """Runs the spec as it is, until the stream's first answer."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        try:
            async for _ in stub.Run(job_service_pb2.RunRequest(spec=spec)):
                return
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None


async def test_params_too_deep_or_too_large_are_refused_and_list_still_works(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        deep = r"spec\.params_json: nested deeper than 16 levels"
        with pytest.raises(InvalidArgument, match=deep):
            await submit(gw.address, _spec("echo", nested_json(32)))
        with pytest.raises(InvalidArgument, match=deep):
            await submit(gw.address, _spec("echo", nested_json(100_000)))  # past Python's stack
        large = json.dumps({"blob": "x" * (2 << 20)})
        with pytest.raises(InvalidArgument, match=r"spec\.params_json: \d+ bytes; at most 1048576"):
            await submit(gw.address, _spec("echo", large))
        with pytest.raises(InvalidArgument, match=r"specs\[1\]\.params_json: nested deeper"):
            await client.submit_batch(
                [job_pb2.JobSpec(kind="echo"), _spec("echo", nested_json(17))]
            )
        with pytest.raises(InvalidArgument, match=r"spec\.idempotency_key: 300 characters"):
            await client.submit("echo", idempotency_key="k" * 300)
        with pytest.raises(InvalidArgument, match=r"spec\.inputs: 300 entries; at most 256"):
            await client.submit("echo", inputs={f"in{i}": b"" for i in range(300)})
        with pytest.raises(InvalidArgument, match=r"specs\[0\]\.retention: must be positive"):
            await client.submit_batch([_spec("echo", retention=-5)])
        with pytest.raises(InvalidArgument, match=r"reason: 5000 characters; at most 4096"):
            await client.cancel("0123456789abcdef0123456789abcdef", reason="r" * 5000)

        # The deepest params allowed still make a job whose Get, List and Watch work.
        deepest = await client.wait((await client.submit("echo", params=nested(16))).job.id)
        assert deepest.state == job_pb2.JOB_STATE_SUCCEEDED
        assert deepest.spec.params == nested(16)
        jobs, _ = await client.list()
        assert [j.id for j in jobs] == [deepest.id]
        events = [e async for e in client.watch(deepest.id)]
        assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED


async def test_params_come_back_exactly_as_sent(cluster: Cluster) -> None:
    gw = cluster.gateway()  # no worker: the jobs wait, and Get shows what was stored
    text = '{ "n": 9007199254740991, "neg": -9007199254740991,\n  "f": 1.50, "s": "\\u00e9" }'
    raw = await submit(gw.address, _spec("echo", text))
    # Checked, then stored and returned as the client wrote it: never re-encoded.
    assert (await get(gw.address, raw.id)).spec.params_json == text
    async with AsyncClient(gw.address) as client:
        sdk = (await client.submit("echo", params={"n": 2**53 - 1})).job
        params = (await client.get(sdk.id)).spec.params
        assert (await client.get(raw.id)).spec.params == {
            "n": 2**53 - 1,
            "neg": -(2**53 - 1),
            "f": 1.5,
            "s": "é",
        }
    assert params == {"n": 2**53 - 1}
    assert type(params["n"]) is int


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('{"n": 9007199254740993}', "spec.params_json.n", r"beyond \+-\(2\^53 - 1\)"),
        ('{"a": 1, "a": 2}', "spec.params_json", "the key 'a' appears twice"),
        ("[1]", "spec.params_json", "must be a JSON object"),
        ('{"a": 1,}', "spec.params_json", "not JSON"),
        ('{"a": NaN}', "spec.params_json", "NaN is not a JSON number"),
    ],
)
async def test_params_json_that_is_not_one_exact_object_is_refused_never_read_as_empty(
    cluster: Cluster, text: str, field: str, message: str
) -> None:
    gw = cluster.gateway()
    spec = _spec("echo", text)
    with pytest.raises(InvalidArgument, match=message) as raised:
        await submit(gw.address, spec)
    assert raised.value.message.startswith(f"{field}: ")
    with pytest.raises(InvalidArgument, match=message):
        await run(gw.address, spec)
    async with AsyncClient(gw.address) as client:
        with pytest.raises(InvalidArgument, match=rf"specs\[1\]\.params_json.*{message}"):
            await client.submit_batch([_spec("echo"), spec])
        jobs, _ = await client.list()
        assert jobs == []  # nothing of a refused batch is kept


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
        big = [_spec("echo", inputs={"in": bytes(600 << 10)}) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="inline inputs"):
            await client.submit_batch(big)
        jobs, _ = await client.list()
        assert jobs == []


def _spec(
    kind: str,
    params_json: str = "",
    *,
    inputs: dict[str, bytes] | None = None,
    retention: float | None = None,
) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(kind=kind, inputs=inputs or {}, params_json=params_json)
    if retention is not None:
        spec.retention.FromNanoseconds(int(retention * 1e9))
    return spec
