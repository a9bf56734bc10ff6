"""Large payloads on disk, one file per blob, named by the SHA-256 of its content.

Uploads stream chunk by chunk into a temporary file while the hash is computed, and
are renamed into place only when the size and hash check out; a blob is therefore
either whole or absent. Identical payloads are kept once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from jobmesh.errors import InvalidArgument, NotFound, ResourceExhausted
from jobmesh.v1 import job_pb2

CHUNK_BYTES = 1 << 20
_BLOB_ID = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, blob_id: str) -> Path:
        if not _BLOB_ID.fullmatch(blob_id):
            raise InvalidArgument(f"{blob_id[:80]!r} is not a blob id (64 hex digits)", "blob_id")
        return self.root / blob_id[:2] / blob_id

    def size(self, blob_id: str) -> int | None:
        """The blob's size, or None if there is no such blob."""
        try:
            return self._path(blob_id).stat().st_size
        except FileNotFoundError:
            return None

    def check(self, ref: job_pb2.BlobRef, field: str) -> None:
        """Raises InvalidArgument unless the blob exists with the size the ref claims."""
        size = self.size(ref.id)
        if size is None:
            raise InvalidArgument(f"no blob {ref.id}; upload it first", field)
        if size != ref.size:
            raise InvalidArgument(f"blob {ref.id} has {size} bytes, not {ref.size}", field)

    def admit(self, size: int, sha256: str) -> None:
        """Raises unless an upload of this size (and hash, if given) may go ahead."""
        if size > self.max_bytes:
            raise ResourceExhausted(f"a blob may have at most {self.max_bytes} bytes, not {size}")
        if sha256 and not _BLOB_ID.fullmatch(sha256):
            raise InvalidArgument("must be 64 lowercase hex digits", "sha256")

    async def put(self, size: int, sha256: str, chunks: AsyncIterator[bytes]) -> job_pb2.BlobRef:
        self.admit(size, sha256)
        digest = hashlib.sha256()
        received = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
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
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):  # renamed into place: nothing left
                os.unlink(tmp)
        return job_pb2.BlobRef(id=blob_id, size=size)

    async def read(self, blob_id: str, offset: int) -> AsyncIterator[bytes]:
        path = self._path(blob_id)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise NotFound(f"no blob {blob_id}") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if offset > size:
                raise InvalidArgument(f"past the end of the blob ({size} bytes)", "offset")
            handle.seek(offset)
            while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield chunk
