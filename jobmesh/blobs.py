"""Large payloads through jobmesh.v1.BlobService, in chunks: used by clients and workers.

A payload over the inline limit (1 MiB by default) does not ride in the job's
messages: it is uploaded first and the job carries a `BlobRef` to it. Files are
streamed from and to disk, so a payload is never held in memory whole when it
need not be.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import BinaryIO

import grpc

from jobmesh.errors import Internal, from_rpc_error
from jobmesh.v1 import blob_service_pb2, blob_service_pb2_grpc, job_pb2

CHUNK_BYTES = 1 << 20
DEFAULT_INLINE_LIMIT = 1 << 20

Payload = bytes | os.PathLike[str]


async def _chunks(source: Payload) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        view = memoryview(source)
        for start in range(0, len(source), CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])
        return
    with open(source, "rb") as handle:  # noqa: ASYNC230  # each read goes to a thread below
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk


def payload_size(source: Payload) -> int:
    return len(source) if isinstance(source, bytes) else os.stat(source).st_size


async def upload(
    stub: blob_service_pb2_grpc.BlobServiceAsyncStub, source: Payload
) -> job_pb2.BlobRef:
    """Uploads bytes or a file and returns the reference a job can carry."""
    size = payload_size(source)
    call = stub.Upload()  # type: ignore[call-arg]  # written to with call.write()
    try:
        await call.write(blob_service_pb2.UploadRequest(size=size))
        # Content goes only once the gateway said it will take it: a refusal then comes
        # back as the gateway's own status, not as a failed write.
        await call.read()
        async for chunk in _chunks(source):
            await call.write(blob_service_pb2.UploadRequest(chunk=chunk))
        await call.done_writing()
        response = await call.read()
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from e
    if not isinstance(response, blob_service_pb2.UploadResponse) or not response.HasField("blob"):
        raise Internal("the gateway ended the upload without a blob")
    return response.blob


async def download(
    stub: blob_service_pb2_grpc.BlobServiceAsyncStub, blob_id: str, sink: BinaryIO | None = None
) -> bytes:
    """The blob's content; with `sink`, written there chunk by chunk instead (returns b'')."""
    parts: list[bytes] = []
    try:
        async for response in stub.Download(blob_service_pb2.DownloadRequest(blob_id=blob_id)):
            if sink is None:
                parts.append(response.chunk)
            else:
                await asyncio.to_thread(sink.write, response.chunk)
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from e
    return b"".join(parts)


async def offload(
    stub: blob_service_pb2_grpc.BlobServiceAsyncStub,
    spec: job_pb2.JobSpec,
    files: Mapping[str, Path],
    inline_limit: int,
) -> None:
    """Moves the spec's inputs over `inline_limit`, and all `files`, into uploaded blobs."""
    large = {name: data for name, data in spec.inputs.items() if len(data) > inline_limit}
    uploads: dict[str, Payload] = {**large, **files}
    refs = await asyncio.gather(*(upload(stub, source) for source in uploads.values()))
    for name, ref in zip(uploads, refs, strict=True):
        if name in spec.inputs:
            del spec.inputs[name]
        spec.input_blobs[name].CopyFrom(ref)


async def fetch(
    stub: blob_service_pb2_grpc.BlobServiceAsyncStub, refs: Mapping[str, job_pb2.BlobRef]
) -> dict[str, bytes]:
    """Downloads every referenced blob into memory."""
    names = list(refs)
    contents = await asyncio.gather(*(download(stub, refs[n].id) for n in names))
    return dict(zip(names, contents, strict=True))
