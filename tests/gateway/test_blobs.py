"""The blob directory cleans up after itself: partial uploads, stalled uploads, unused blobs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path

import grpc
import pytest

from gateway.blob_service import BlobService
from gateway.blobs import BlobStore
from gateway.interceptors import ErrorInterceptor
from jobmesh.errors import DeadlineExceeded
from jobmesh.v1 import blob_service_pb2, blob_service_pb2_grpc, job_pb2

GRACE = 3600.0
IDLE = 0.2


async def chunks(*parts: bytes, stall: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if stall:
        await asyncio.Event().wait()


async def upload(blobs: BlobStore, data: bytes) -> job_pb2.BlobRef:
    return await blobs.put(len(data), "", chunks(data))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def partials(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".upload-"))


async def nothing_referenced(blob_ids: Collection[str]) -> set[str]:
    return set()


def test_partial_uploads_left_by_a_dead_process_are_removed_at_start(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".upload-stale", tmp_path / ".upload-fresh"
    stale.write_bytes(b"half a blob")
    age(stale, 2 * IDLE)
    fresh.write_bytes(b"maybe someone's")
    BlobStore(tmp_path, 1 << 20, upload_idle_timeout=IDLE)
    assert partials(tmp_path) == [".upload-fresh"]


async def test_an_upload_that_stalls_is_dropped_with_its_partial_file(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, 1 << 20, upload_idle_timeout=IDLE)
    with pytest.raises(DeadlineExceeded, match="sent nothing"):
        await blobs.put(10, "", chunks(b"12345", stall=True))
    assert partials(tmp_path) == []


async def test_a_stalled_upload_ends_deadline_exceeded_for_its_client(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, 1 << 20, upload_idle_timeout=IDLE)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    blob_service_pb2_grpc.add_BlobServiceServicer_to_server(BlobService(blobs, 4), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    release = asyncio.Event()

    async def stalling(*first: blob_service_pb2.UploadRequest):  # type: ignore[no-untyped-def]
        for request in first:
            yield request
        await release.wait()

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = blob_service_pb2_grpc.BlobServiceStub(channel)
            announced = blob_service_pb2.UploadRequest(size=100, chunk=b"a few bytes")
            for call in (stub.Upload(stalling(announced)), stub.Upload(stalling())):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in call:
                        pass
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "sent nothing" in (caught.value.details() or "")
    finally:
        release.set()
        await server.stop(None)
    assert partials(tmp_path) == []


async def test_transfers_past_the_limit_are_refused_until_one_ends(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, 1 << 20, upload_idle_timeout=30.0)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    blob_service_pb2_grpc.add_BlobServiceServicer_to_server(BlobService(blobs, 1), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    release = asyncio.Event()

    async def holding() -> AsyncIterator[blob_service_pb2.UploadRequest]:
        yield blob_service_pb2.UploadRequest(size=4, chunk=b"ab")
        await release.wait()
        yield blob_service_pb2.UploadRequest(chunk=b"cd")

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = blob_service_pb2_grpc.BlobServiceStub(channel)
            first = stub.Upload(holding())
            assert (await first.read()).ready
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Download(blob_service_pb2.DownloadRequest(blob_id="a" * 64)).read()
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert (await first.read()).blob.size == 4
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Download(blob_service_pb2.DownloadRequest(blob_id="a" * 64)).read()
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # a slot again
    finally:
        release.set()
        await server.stop(None)


async def test_uploading_or_referencing_a_blob_again_makes_it_young(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, 1 << 20)
    ref = await upload(blobs, b"kept once")
    path = tmp_path / ref.id[:2] / ref.id
    age(path, 2 * GRACE)
    assert await upload(blobs, b"kept once") == ref
    assert path.stat().st_mtime > time.time() - GRACE
    assert partials(tmp_path) == []

    # A Submit checks the blob before its job is committed; a sweep in between keeps it.
    age(path, 2 * GRACE)
    blobs.check(ref, "input_blobs.x")
    deleted = await blobs.sweep(nothing_referenced, older_than=time.time() - GRACE)
    assert deleted == 0
    assert path.exists()


async def test_a_sweep_deletes_only_old_unreferenced_blobs_and_is_bounded(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path, 1 << 20)
    old = [await upload(blobs, f"old {i}".encode()) for i in range(5)]
    fresh = await upload(blobs, b"fresh")
    for ref in old:
        age(tmp_path / ref.id[:2] / ref.id, 2 * GRACE)
    keep = old[0].id
    asked: list[set[str]] = []

    async def referenced(blob_ids: Collection[str]) -> set[str]:
        asked.append(set(blob_ids))
        return {keep} & set(blob_ids)

    cutoff = time.time() - GRACE
    total = 0
    for _ in range(4):
        deleted = await blobs.sweep(referenced, older_than=cutoff, limit=2)
        assert deleted <= 2
        total += deleted
    assert total == 4
    assert {ref.id for ref in [*old, fresh] if blobs.size(ref.id) is not None} == {keep, fresh.id}
    assert all(fresh.id not in ids for ids in asked)  # fresh blobs are not even looked up
