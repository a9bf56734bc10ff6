"""Priority queues of job ids, one per kind and tenant: higher priority first, FIFO within
one. A queue per tenant lets a worker whose credential serves one tenant take that tenant's
next job without waiting behind another tenant's (and is where fair turns between tenants
will go)."""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterator

# (-priority, order, job id, attempt); `order` is global, so entries of different queues
# compare by priority, then age.
Entry = tuple[int, int, str, int]
# (kind, tenant)
QueueKey = tuple[str, str]


class KindQueues:
    def __init__(self) -> None:
        self._heaps: defaultdict[QueueKey, list[Entry]] = defaultdict(list)
        self._order = itertools.count()

    def push(self, key: QueueKey, priority: int, job_id: str, attempt: int) -> None:
        heapq.heappush(self._heaps[key], (-priority, next(self._order), job_id, attempt))

    def queues(self) -> list[QueueKey]:
        """The keys of the queues that hold entries (a copy: popping may remove some)."""
        return list(self._heaps)

    def head(self, key: QueueKey) -> Entry | None:
        """The entry `pop` would return next, without removing it."""
        heap = self._heaps.get(key)
        return heap[0] if heap else None

    def pop(self, key: QueueKey) -> tuple[str, int] | None:
        """The next (job id, attempt) of the queue, or None when it has none."""
        heap = self._heaps.get(key)
        if not heap:
            return None
        _, _, job_id, attempt = heapq.heappop(heap)
        if not heap:
            del self._heaps[key]
        return job_id, attempt

    def __iter__(self) -> Iterator[QueueKey]:
        return iter(self._heaps)
