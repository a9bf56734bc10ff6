"""jobmesh.v1.BlobService: large payloads in chunks, each seen only by whom it concerns."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc

from gateway import auth
from gateway.auth import Principal, Role
from gateway.blobs import BlobStore, Saved, check_id, missing, not_found
from gateway.quotas import QuotaOf, check_bytes, unlimited
from gateway.store import JobStore
from jobmesh.errors import InvalidArgument, ResourceExhausted
from jobmesh.v1 import blob_service_pb2, blob_service_pb2_grpc, job_pb2

Holds = Callable[[str, str, str], bool]
"""(principal, tenant, blob id): whether a worker session of the principal holds a live
attempt of a job of the tenant (ANY_TENANT: any) that takes the blob as an input
(`Scheduler.holds_blob`)."""

_TENANT_ROLES = frozenset({Role.CLIENT, Role.ADMIN})


class BlobAccess:
    """Which blobs a principal may see.

    A client or admin sees the blobs its tenant uploaded or its tenant's jobs reference
    (an admin of every tenant sees all); a worker sees the inputs of the attempts it
    holds. Content is stored once whoever uploads it, but a blob someone may not see is
    answered exactly as one that does not exist: nobody learns from a hash that another
    tenant has the content.
    """

    def __init__(
        self, store: JobStore, blobs: BlobStore, holds: Holds, *, quotas: QuotaOf = unlimited
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._holds = holds
        self._quota = quotas

    async def visible(self, who: Principal, blob_id: str) -> bool:
        if who.may(_TENANT_ROLES) and await self._store.blob_visible(who.tenant, blob_id):
            return True
        return who.may({Role.WORKER}) and self._holds(who.name, who.tenant, blob_id)

    async def check(self, tenant: str, ref: job_pb2.BlobRef, field: str) -> None:
        """InvalidArgument unless a job of `tenant` may take the blob as an input: the
        tenant sees it, and it exists with the size the ref claims."""
        check_id(ref.id)
        if not await self._store.blob_visible(tenant, ref.id):
            raise missing(ref.id, field)
        self._blobs.check(ref, field)

    async def admit(self, who: Principal, size: int) -> None:
        """ResourceExhausted if an upload of `size` bytes would take a client's or admin's
        tenant past its max_stored_bytes. Checked as the upload starts: uploads running at
        once may pass it together. A worker's outputs are counted, never refused."""
        if not who.may(_TENANT_ROLES):
            return
        tenant = who.home_tenant
        quota = self._quota(tenant)
        if quota.max_stored_bytes is not None:
            usage = await self._store.usage(tenant)
            check_bytes(tenant, quota, usage, size, "in an upload")

    async def uploaded(self, who: Principal, saved: Saved) -> None:
        # A client's or admin's upload is its tenant's (default for an admin of them all);
        # a worker's output is the worker's tenant's ("*" for a worker of every tenant, a
        # tenant nobody is), and its job's tenant's once the job references it.
        tenant = who.home_tenant if who.may(_TENANT_ROLES) else who.tenant
        await self._store.own_blob(
            saved.ref.id, tenant, who.name, time.time(), fresh=saved.created, size=saved.ref.size
        )


class BlobService(blob_service_pb2_grpc.BlobServiceServicer):
    def __init__(
        self, blobs: BlobStore, max_transfers: int, access: BlobAccess | None = None
    ) -> None:
        """Without `access`, every caller sees every blob (a server of one tenant, in tests)."""
        self._blobs = blobs
        self._max_transfers = max_transfers
        self._access = access
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
        if self._access is not None:
            await self._access.admit(auth.principal(), first.size)
        with self._transfer():
            yield blob_service_pb2.UploadResponse(ready=True)

            async def chunks() -> AsyncIterator[bytes]:
                yield first.chunk
                async for request in requests:
                    yield request.chunk

            saved = await self._blobs.save(first.size, first.sha256, chunks())
            if self._access is not None:
                # Before the answer: the caller's Submit may name the blob right after.
                await self._access.uploaded(auth.principal(), saved)
            yield blob_service_pb2.UploadResponse(blob=saved.ref)

    async def Download(
        self,
        request: blob_service_pb2.DownloadRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[blob_service_pb2.DownloadResponse]:
        with self._transfer():
            check_id(request.blob_id)
            if self._access is not None and not await self._access.visible(
                auth.principal(), request.blob_id
            ):
                raise not_found(request.blob_id)
            async for chunk in self._blobs.read(request.blob_id, request.offset):
                yield blob_service_pb2.DownloadResponse(chunk=chunk)
