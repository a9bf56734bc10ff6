"""jobmesh.v1.BlobService: large payloads in chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from gateway.blobs import BlobStore
from jobmesh.errors import InvalidArgument
from jobmesh.v1 import blob_service_pb2, blob_service_pb2_grpc


class BlobService(blob_service_pb2_grpc.BlobServiceServicer):
    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs

    async def Upload(
        self,
        request_iterator: AsyncIterator[blob_service_pb2.UploadRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[blob_service_pb2.UploadResponse]:
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("an upload starts with a message carrying its size") from None
        self._blobs.admit(first.size, first.sha256)
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
        async for chunk in self._blobs.read(request.blob_id, request.offset):
            yield blob_service_pb2.DownloadResponse(chunk=chunk)
