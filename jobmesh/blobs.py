"""Large payloads through jobmesh.v1.BlobService, in chunks: used by clients and workers.

A payload over the inline limit (1 MiB by default) does not ride in the job's
messages: it is uploaded first and the job carries a `BlobRef` to it. Files are
streamed from and to disk, so a payload is never held in memory whole when it
need not be.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, TypeAlias

import grpc

from jobmesh.errors import Internal, InvalidArgument, file_error, from_rpc_error
from jobmesh.v1 import blob_service_pb2, blob_service_pb2_grpc, job_pb2

CHUNK_BYTES = 1 << 20
DEFAULT_INLINE_LIMIT = 1 << 20
# Uploads of one submit at once: enough to fill a link, few enough to leave the gateway's
# transfer slots (`--max-transfers`) to others.
MAX_UPLOADS = 4

Payload = bytes | str | os.PathLike[str]
"""Bytes, or a file's path."""
Metadata = tuple[tuple[str, str], ...]
"""Call metadata sent with each transfer: the caller's token and trace context."""

if TYPE_CHECKING:  # the async stub exists in the generated stubs only
    Stub: TypeAlias = blob_service_pb2_grpc.BlobServiceAsyncStub


async def _chunks(source: bytes | BinaryIO) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        view = memoryview(source)
        for start in range(0, len(source), CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])
        return
    while chunk := await asyncio.to_thread(source.read, CHUNK_BYTES):
        yield chunk


async def upload(
    stub: Stub, source: Payload, field: str = "source", *, metadata: Metadata = ()
) -> job_pb2.BlobRef:
    """Uploads bytes or a file and returns the reference a job can carry; a file that cannot
    be read is an InvalidArgument naming `field`."""
    if isinstance(source, bytes):
        return await _upload(stub, source, len(source), metadata)
    try:
        handle = await asyncio.to_thread(open, source, "rb")
    except OSError as e:
        raise file_error(e, source, field) from e
    try:
        with handle:
            return await _upload(stub, handle, os.fstat(handle.fileno()).st_size, metadata)
    except OSError as e:
        raise file_error(e, source, field) from e


async def _upload(
    stub: Stub, source: bytes | BinaryIO, size: int, metadata: Metadata
) -> job_pb2.BlobRef:
    call = stub.Upload(metadata=metadata)  # type: ignore[call-arg]  # written with call.write()
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
    finally:
        call.cancel()  # a no-op once it ended; else (a local error) the stream is dropped
    if not isinstance(response, blob_service_pb2.UploadResponse) or not response.HasField("blob"):
        raise Internal("the gateway ended the upload without a blob")
    return response.blob


async def download(
    stub: Stub,
    blob_id: str,
    sink: BinaryIO | str | os.PathLike[str] | None = None,
    *,
    metadata: Metadata = (),
) -> bytes:
    """The blob's content; with `sink` (a binary file, or a path) written there chunk by
    chunk instead, and b'' returned. A path gets the whole blob or nothing: it is written
    aside and renamed into place. A sink that cannot be written is an InvalidArgument."""
    if sink is None:
        parts: list[bytes] = []
        async for chunk in _download(stub, blob_id, metadata):
            parts.append(chunk)
        return b"".join(parts)
    if isinstance(sink, str | os.PathLike):
        await _download_to_path(stub, blob_id, Path(sink), metadata)
        return b""
    async for chunk in _download(stub, blob_id, metadata):
        try:
            await asyncio.to_thread(sink.write, chunk)
        except OSError as e:
            raise InvalidArgument(f"cannot write: {e.strerror or e}", "sink") from e
    return b""


async def _download(stub: Stub, blob_id: str, metadata: Metadata) -> AsyncIterator[bytes]:
    request = blob_service_pb2.DownloadRequest(blob_id=blob_id)
    try:
        async for response in stub.Download(request, metadata=metadata):
            yield response.chunk
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from e


async def _download_to_path(stub: Stub, blob_id: str, path: Path, metadata: Metadata) -> None:
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        handle = await asyncio.to_thread(part.open, "xb")
    except OSError as e:
        raise file_error(e, path, "sink") from e
    try:
        with handle:
            async for chunk in _download(stub, blob_id, metadata):
                await asyncio.to_thread(handle.write, chunk)
        await asyncio.to_thread(os.replace, part, path)
    except OSError as e:
        raise file_error(e, path, "sink") from e
    finally:
        part.unlink(missing_ok=True)


class Uploads:
    """The uploads of one submit: at most MAX_UPLOADS at once, and each file once however
    many of its jobs name it. Use it with `async with`: leaving cancels what is still
    running."""

    def __init__(
        self, stub: Stub, concurrency: int = MAX_UPLOADS, *, metadata: Metadata = ()
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: dict[object, asyncio.Task[job_pb2.BlobRef]] = {}

    async def __aenter__(self) -> Uploads:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def upload(self, source: Payload, field: str) -> job_pb2.BlobRef:
        key = object() if isinstance(source, bytes) else os.fspath(source)
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.create_task(self._upload(source, field))
        return await asyncio.shield(task)

    async def _upload(self, source: Payload, field: str) -> job_pb2.BlobRef:
        async with self._slots:
            return await upload(self._stub, source, field, metadata=self._metadata)

    async def resolve(
        self, spec: job_pb2.JobSpec, files: Mapping[str, Path], inline_limit: int
    ) -> job_pb2.JobSpec:
        """A copy of `spec` with `files` among its inputs, read into it when they are at
        most `inline_limit` bytes, else uploaded; inline inputs over the limit are uploaded
        too. A file that cannot be read is an InvalidArgument naming the input."""
        out = job_pb2.JobSpec()
        out.CopyFrom(spec)
        large: dict[str, Payload] = {}
        for name, path in files.items():
            where = f"inputs.{name}"
            try:
                size = (await asyncio.to_thread(os.stat, path)).st_size
                if size > inline_limit:
                    large[name] = path
                    continue
                out.inputs[name] = await asyncio.to_thread(path.read_bytes)
            except OSError as e:
                raise file_error(e, path, where) from e
        for name, data in out.inputs.items():
            if len(data) > inline_limit:
                large[name] = data  # bytes, or a file that grew since its size was taken
        refs = await asyncio.gather(
            *(self.upload(source, f"inputs.{name}") for name, source in large.items())
        )
        for name, ref in zip(large, refs, strict=True):
            if name in out.inputs:
                del out.inputs[name]
            out.input_blobs[name].CopyFrom(ref)
        return out


async def fetch(
    stub: Stub, refs: Mapping[str, job_pb2.BlobRef], *, metadata: Metadata = ()
) -> dict[str, bytes]:
    """Downloads every referenced blob into memory."""
    names = list(refs)
    contents = await asyncio.gather(*(download(stub, refs[n].id, metadata=metadata) for n in names))
    return dict(zip(names, contents, strict=True))
