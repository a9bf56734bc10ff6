"""Priority queues of job ids, one per kind and tenant: higher priority first, FIFO within
one. A queue per tenant lets a worker whose credential serves one tenant take that tenant's
next job without waiting behind another tenant's, and `Turns` take tenants in weighted
turns among jobs of one priority."""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterator

# (-priority, ready_at, order, job id, attempt): entries of different queues compare by
# priority, then age (time.time() from which the job was ready), then arrival here.
Entry = tuple[int, float, int, str, int]
# (kind, tenant)
QueueKey = tuple[str, str]


class KindQueues:
    def __init__(self) -> None:
        self._heaps: defaultdict[QueueKey, list[Entry]] = defaultdict(list)
        self._order = itertools.count()

    def push(
        self, key: QueueKey, priority: int, ready_at: float, job_id: str, attempt: int
    ) -> None:
        entry = (-priority, ready_at, next(self._order), job_id, attempt)
        heapq.heappush(self._heaps[key], entry)

    def size(self, key: QueueKey) -> int:
        """Entries of the queue, some perhaps of jobs that left it meanwhile."""
        heap = self._heaps.get(key)
        return len(heap) if heap else 0

    def worst(self, key: QueueKey) -> Entry | None:
        """The entry `pop` would return last."""
        heap = self._heaps.get(key)
        return max(heap) if heap else None

    def remove(self, key: QueueKey, entry: Entry) -> None:
        heap = self._heaps[key]
        heap.remove(entry)
        heapq.heapify(heap)
        if not heap:
            del self._heaps[key]

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
        _, _, _, job_id, attempt = heapq.heappop(heap)
        if not heap:
            del self._heaps[key]
        return job_id, attempt

    def __iter__(self) -> Iterator[QueueKey]:
        return iter(self._heaps)


class Turns:
    """Weighted turns between tenants, by start-time fair queuing: each tenant has a tag
    that advances by 1/weight at each job it is given; among jobs of one priority, the
    tenant with the lowest tag goes first (ties: the oldest job). With weights 2:1 and
    both backlogged, the first gets two turns for each of the second's.

    A tag is never behind the tag of the last turn given: a tenant that had nothing
    queued for a while gets its share from then on, not the turns it missed; one served
    at a higher priority meanwhile owes nothing at the lower one.
    """

    _PRUNE_AT = 1024

    def __init__(self) -> None:
        self._tags: dict[str, float] = {}
        self._now = 0.0
        """The tag of the last turn given."""

    def tag(self, tenant: str) -> float:
        """Where the tenant's next turn stands; lower goes first."""
        tag = self._tags.get(tenant, 0.0)
        return tag if tag > self._now else self._now

    def took(self, tenant: str, weight: float) -> None:
        """The tenant was given a job."""
        start = self.tag(tenant)
        self._now = start
        self._tags[tenant] = start + 1.0 / weight
        if len(self._tags) > self._PRUNE_AT:
            # Tags at or behind the last turn's read as it: forget them.
            self._tags = {t: v for t, v in self._tags.items() if v > self._now}
