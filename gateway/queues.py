"""Priority queues of job ids, one per kind: higher priority first, FIFO within one."""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterator

# (-priority, order, job id, attempt)
Entry = tuple[int, int, str, int]


class KindQueues:
    def __init__(self) -> None:
        self._heaps: defaultdict[str, list[Entry]] = defaultdict(list)
        self._order = itertools.count()

    def push(self, kind: str, priority: int, job_id: str, attempt: int) -> None:
        heapq.heappush(self._heaps[kind], (-priority, next(self._order), job_id, attempt))

    def kinds(self) -> list[str]:
        return list(self._heaps)

    def head(self, kind: str) -> Entry | None:
        """The entry `pop` would return next, without removing it."""
        heap = self._heaps.get(kind)
        return heap[0] if heap else None

    def pop(self, kind: str) -> tuple[str, int] | None:
        """The next (job id, attempt) of the kind, or None when it has none."""
        heap = self._heaps.get(kind)
        if not heap:
            return None
        _, _, job_id, attempt = heapq.heappop(heap)
        if not heap:
            del self._heaps[kind]
        return job_id, attempt

    def __iter__(self) -> Iterator[str]:
        return iter(self._heaps)
