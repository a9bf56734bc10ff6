"""Large payloads: chunked upload and download through the gateway, with their limits."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import grpc
import pytest

from jobmesh import AsyncClient, InvalidArgument, JobState, NotFound, ResourceExhausted
from jobmesh.v1 import blob_service_pb2, blob_service_pb2_grpc, job_pb2
from tests.cluster import Cluster

MiB = 1 << 20


async def test_a_large_payload_goes_up_and_comes_back_whole(cluster: Cluster) -> None:
    gw = cluster.gateway()
    data = os.urandom(20 * MiB)
    async with AsyncClient(gw.address) as client:
        ref = await client.upload(data)
        again = await client.upload(data)
        back = await client.download(ref.id)
        sink = io.BytesIO()
        await client.download(ref.id, sink)
    assert ref.id == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert again == ref  # kept once
    assert back == data
    assert sink.getvalue() == data


async def test_blob_limits_and_bad_uploads_are_refused(cluster: Cluster) -> None:
    gw = cluster.gateway("--max-blob-bytes", str(2 * MiB))
    async with AsyncClient(gw.address) as client:
        with pytest.raises(ResourceExhausted, match="at most"):
            await client.upload(b"x" * (3 * MiB))
        with pytest.raises(NotFound):
            await client.download("0" * 64)
        with pytest.raises(InvalidArgument, match="blob id"):
            await client.download("not-an-id")
        missing = job_pb2.BlobRef(id="1" * 64, size=10)
        spec = job_pb2.JobSpec(kind="echo", input_blobs={"big": missing})
        with pytest.raises(InvalidArgument, match=r"input_blobs\.big: no blob"):
            await client.submit_batch([spec])
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = blob_service_pb2_grpc.BlobServiceStub(channel)

        async def lying(size: int, sha256: str, body: bytes):  # type: ignore[no-untyped-def]
            yield blob_service_pb2.UploadRequest(size=size, sha256=sha256)
            yield blob_service_pb2.UploadRequest(chunk=body)

        for size, sha, message in (
            (5, "", "received"),
            (3, "", "more than"),
            (4, "a" * 64, "SHA-256"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                _ = [r async for r in stub.Upload(lying(size, sha, b"abcd"))]
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (raised.value.details() or "")
    assert not list(cluster.blob_dir.glob("**/.upload-*"))


async def test_a_large_input_and_output_travel_as_blobs_end_to_end(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway("--max-message-bytes", str(4 * MiB))
    cluster.worker(gw, "w1")
    data = os.urandom(24 * MiB)  # six times the message limit
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit("echo", inputs={"big": source, "small": b"hi"})
        job = await client.wait(submitted.job.id)
        outputs = await client.outputs(job)
    assert job.state is JobState.SUCCEEDED
    assert "big" in job.spec.input_blobs
    assert set(job.result.output_blobs) == {"big"}
    assert job.result.outputs["small"] == b"hi"
    assert outputs["big"] == data
