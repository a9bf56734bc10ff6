"""A send queue that coalesces protobuf messages.

Both ends of a worker session queue small messages (an Assign, a Progress, a
Completed) faster than one stream write each would carry them. `Outbox.take`
merges what is waiting into one message: repeated fields concatenate and
singular fields take the newest value (`Message.MergeFrom`).
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

# Stop merging once a message is this large, well under gRPC's message limits.
MAX_COALESCED_BYTES = 1 << 20


class Outbox(Generic[M]):
    def __init__(self, max_coalesced_bytes: int = MAX_COALESCED_BYTES) -> None:
        self._queue: asyncio.Queue[M] = asyncio.Queue()
        self._held: M | None = None
        self._max = max_coalesced_bytes

    def put(self, message: M) -> None:
        self._queue.put_nowait(message)

    def __len__(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    async def take(self) -> M:
        """Waits for one message, then merges in whatever else is already queued."""
        if self._held is not None:
            merged, self._held = self._held, None
        else:
            merged = await self._queue.get()
        size = merged.ByteSize()
        while size < self._max and not self._queue.empty():
            nxt = self._queue.get_nowait()
            nxt_size = nxt.ByteSize()
            if size + nxt_size > self._max:
                self._held = nxt
                break
            merged.MergeFrom(nxt)
            size += nxt_size
        return merged
