"""jobmesh.v1.BlobService: large payloads in chunks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc

from gateway.blobs import BlobStore
from jobmesh.errors import InvalidArgument, ResourceExhausted
from jobmesh.v1 import blob_service_pb2, blob_service_pb2_grpc


class BlobService(blob_service_pb2_grpc.BlobServiceServicer):
    def __init__(self, blobs: BlobStore, max_transfers: int) -> None:
        self._blobs = blobs
        self._max_transfers = max_transfers
        self._transfers = 0

    @contextlib.contextmanager
    def _transfer(self) -> Iterator[None]:
        """Each transfer holds a file open: at most `max_transfers` at once."""
        if self._transfers >= self._max_transfers:
            raise ResourceExhausted(
                f"{self._transfers} uploads and downloads are running (limit "
                f"{self._max_transfers}); retry later"
            )
        self._transfers += 1
        try:
            yield
        finally:
            self._transfers -= 1

    async def Upload(
        self,
        request_iterator: AsyncIterator[blob_service_pb2.UploadRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[blob_service_pb2.UploadResponse]:
        requests = aiter(request_iterator)
        try:
            first = await self._blobs.receive(requests)
        except StopAsyncIteration:
            raise InvalidArgument("an upload starts with a message carrying its size") from None
        self._blobs.admit(first.size, first.sha256)
        with self._transfer():
            yield blob_service_pb2.UploadResponse(ready=True)

            async def chunks() -> AsyncIterator[bytes]:
                yield first.chunk
                async for request in requests:
                    yield request.chunk

            blob = await self._blobs.put(first.size, first.sha256, chunks())
            yield blob_service_pb2.UploadResponse(blob=blob)

    async def Download(
        self,
        request: blob_service_pb2.DownloadRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[blob_service_pb2.DownloadResponse]:
        with self._transfer():
            async for chunk in self._blobs.read(request.blob_id, request.offset):
                yield blob_service_pb2.DownloadResponse(chunk=chunk)
