"""Large payloads on disk, one file per blob, named by the SHA-256 of its content.

Uploads stream chunk by chunk into a temporary file while the hash is computed, and
are renamed into place only when the size and hash check out; a blob is therefore
either whole or absent. Identical payloads are kept once, whoever uploaded them: which
tenant may see which blob is `gateway.blob_service.BlobAccess`'s to say.

Nothing here knows which jobs use a blob: `sweep` asks the job store. A blob's mtime
is when it was last uploaded or referenced; one that no job references is deleted once
its mtime is older than the grace the caller gives, because the SDK uploads inputs
before it submits the job that references them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import NamedTuple, TypeVar

from jobmesh.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK_BYTES = 1 << 20
DEFAULT_UPLOAD_IDLE_TIMEOUT = 30.0
_BLOB_ID = re.compile(r"[0-9a-f]{64}")
_PARTIAL_PREFIX = ".upload-"
_PREFIXES = [f"{i:02x}" for i in range(256)]
# Blob files a sweep looks at, at most (in whole directories): a sweep's cost is bounded
# however many blobs there are.
_MAX_SCAN = 100_000

# Which of these blobs some job references.
Referenced = Callable[[Collection[str]], Awaitable[set[str]]]
# Told the blobs a sweep deleted.
Deleted = Callable[[list[str]], Awaitable[None]]


def check_id(blob_id: str) -> None:
    """InvalidArgument unless `blob_id` is one (64 lowercase hex digits)."""
    if not _BLOB_ID.fullmatch(blob_id):
        raise InvalidArgument(f"{blob_id[:80]!r} is not a blob id (64 hex digits)", "blob_id")


def not_found(blob_id: str) -> NotFound:
    """What a Download of a blob that does not exist gets, and one of a blob the caller may
    not see: the same, so that nobody learns by its hash that some content is stored."""
    return NotFound(f"no blob {blob_id}")


def missing(blob_id: str, field: str) -> InvalidArgument:
    """What a job naming a blob that does not exist (or that its tenant may not see) gets."""
    return InvalidArgument(f"no blob {blob_id}; upload it first", field)


class Saved(NamedTuple):
    ref: job_pb2.BlobRef
    created: bool
    """The blob's file was made by this upload (rather than kept once, from an earlier one)."""


class BlobStore:
    """Blob files under `root`, each at most `max_bytes`.

    An upload that sends nothing for `upload_idle_timeout` seconds is dropped. Partial
    uploads nobody wrote to for that long (left by a process that died) are removed when
    the store is made and by every sweep.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.upload_idle_timeout = upload_idle_timeout
        self._uploading: set[str] = set()
        """Names of this store's partial uploads in progress."""
        self._lock = threading.Lock()
        """Held by the sweep around deciding and deleting one blob, and by whoever makes a
        blob young again, so a blob a job is about to reference is never deleted."""
        self._cursor = 0
        """Index of the prefix directory the next sweep starts at."""
        root.mkdir(parents=True, exist_ok=True)
        removed = self.clean_partial()
        if removed:
            log.info("removed %d partial uploads left in %s", removed, root)

    def _path(self, blob_id: str) -> Path:
        check_id(blob_id)
        return self.root / blob_id[:2] / blob_id

    def size(self, blob_id: str) -> int | None:
        """The blob's size, or None if there is no such blob."""
        try:
            return self._path(blob_id).stat().st_size
        except FileNotFoundError:
            return None

    def check(self, ref: job_pb2.BlobRef, field: str) -> None:
        """Raises InvalidArgument unless the blob exists with the size the ref claims.

        The blob is made young again: a job is about to reference it, and a sweep that
        has not seen that reference yet must keep it.
        """
        size = self._touch(self._path(ref.id))
        if size is None:
            raise missing(ref.id, field)
        if size != ref.size:
            raise InvalidArgument(f"blob {ref.id} has {size} bytes, not {ref.size}", field)

    def admit(self, size: int, sha256: str) -> None:
        """Raises unless an upload of this size (and hash, if given) may go ahead."""
        if size > self.max_bytes:
            raise ResourceExhausted(f"a blob may have at most {self.max_bytes} bytes, not {size}")
        if sha256 and not _BLOB_ID.fullmatch(sha256):
            raise InvalidArgument("must be 64 lowercase hex digits", "sha256")

    async def receive(self, items: AsyncIterator[T]) -> T:
        """The next message of an upload; DeadlineExceeded if none comes in time."""
        timer = asyncio.timeout(self.upload_idle_timeout)
        try:
            async with timer:
                return await anext(items)
        except TimeoutError:
            if not timer.expired():
                raise
            raise DeadlineExceeded(
                f"the upload sent nothing for {self.upload_idle_timeout:g} s and was dropped"
            ) from None

    async def put(self, size: int, sha256: str, chunks: AsyncIterator[bytes]) -> job_pb2.BlobRef:
        return (await self.save(size, sha256, chunks)).ref

    async def save(self, size: int, sha256: str, chunks: AsyncIterator[bytes]) -> Saved:
        """Stores an upload of `size` bytes (and hash `sha256`, if given) whole or not at all."""
        self.admit(size, sha256)
        created = False
        digest = hashlib.sha256()
        received = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_PARTIAL_PREFIX)
        self._uploading.add(os.path.basename(tmp))
        chunks = aiter(chunks)
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    try:
                        chunk = await self.receive(chunks)
                    except StopAsyncIteration:
                        break
                    received += len(chunk)
                    if received > size:
                        raise InvalidArgument(f"more than the {size} bytes announced", "chunk")
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
            if received != size:
                raise InvalidArgument(f"{received} bytes received, {size} announced", "size")
            blob_id = digest.hexdigest()
            if sha256 and sha256 != blob_id:
                raise InvalidArgument(f"the content's SHA-256 is {blob_id}", "sha256")
            path = self._path(blob_id)
            # Kept once: an upload of a blob that exists makes it young again.
            if self._touch(path) is None:
                path.parent.mkdir(exist_ok=True)
                os.replace(tmp, path)
                created = True
        finally:
            self._uploading.discard(os.path.basename(tmp))
            with contextlib.suppress(FileNotFoundError):  # renamed into place: nothing left
                os.unlink(tmp)
        return Saved(job_pb2.BlobRef(id=blob_id, size=size), created)

    async def read(self, blob_id: str, offset: int) -> AsyncIterator[bytes]:
        path = self._path(blob_id)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise not_found(blob_id) from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if offset > size:
                raise InvalidArgument(f"past the end of the blob ({size} bytes)", "offset")
            handle.seek(offset)
            while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield chunk

    # --- clean-up --------------------------------------------------------------

    def _touch(self, path: Path) -> int | None:
        """Sets the blob's mtime to now; returns its size, or None if there is no such blob."""
        with self._lock:
            try:
                os.utime(path)
                return path.stat().st_size
            except FileNotFoundError:
                return None

    def clean_partial(self, now: float | None = None) -> int:
        """Removes partial uploads that are not this store's and were not written for
        `upload_idle_timeout` seconds (left by a process that died); returns how many."""
        older_than = (time.time() if now is None else now) - self.upload_idle_timeout
        removed = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.startswith(_PARTIAL_PREFIX) or entry.name in self._uploading:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < older_than:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    async def sweep(
        self,
        referenced: Referenced,
        *,
        older_than: float,
        limit: int = 1000,
        deleted: Deleted | None = None,
    ) -> int:
        """Deletes up to `limit` blobs that no job references and that were last uploaded or
        referenced before `older_than` (time.time() seconds); returns how many, after
        passing their ids to `deleted`.

        Each call walks prefix directories until it has `limit` candidates or has looked
        at `_MAX_SCAN` files; the next call goes on from there. Partial uploads left behind
        are removed too. Directory walks and deletions run off the event loop.
        """
        candidates = await asyncio.to_thread(self._old_blobs, older_than, limit)
        await asyncio.to_thread(self.clean_partial)
        if not candidates:
            return 0
        kept = await referenced(candidates)
        unused = [blob_id for blob_id in candidates if blob_id not in kept]
        gone = await asyncio.to_thread(self._delete, unused, older_than)
        if gone and deleted is not None:
            await deleted(gone)
        return len(gone)

    def _old_blobs(self, older_than: float, limit: int) -> list[str]:
        found: list[str] = []
        scanned = 0
        for _ in range(len(_PREFIXES)):
            directory = self.root / _PREFIXES[self._cursor]
            self._cursor = (self._cursor + 1) % len(_PREFIXES)
            try:
                entries = os.scandir(directory)
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    if not _BLOB_ID.fullmatch(entry.name):
                        continue
                    scanned += 1
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < older_than:
                            found.append(entry.name)
            if len(found) >= limit or scanned >= _MAX_SCAN:
                break
        return found[:limit]

    def _delete(self, blob_ids: list[str], older_than: float) -> list[str]:
        deleted = []
        for blob_id in blob_ids:
            path = self._path(blob_id)
            # Looked at again under the lock: a Submit or an upload may have made it young.
            with self._lock, contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < older_than:
                    path.unlink()
                    deleted.append(blob_id)
        return deleted
