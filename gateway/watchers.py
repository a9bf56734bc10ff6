"""Live job events for Watch: published after they are durable, fanned out per job."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Sequence

from jobmesh.v1 import job_pb2

# A watcher further behind than this re-reads from the store instead.
MAX_BACKLOG = 1024


class Subscription:
    def __init__(self) -> None:
        self.backlog: deque[job_pb2.JobEvent] = deque()
        self.lagged = False
        self._ready = asyncio.Event()

    def push(self, event: job_pb2.JobEvent) -> None:
        if len(self.backlog) >= MAX_BACKLOG:
            self.backlog.clear()
            self.lagged = True
        else:
            self.backlog.append(event)
        self._ready.set()

    def push_nothing(self) -> None:
        """Wakes the watcher with nothing new: it looks at `lagged`."""
        self._ready.set()

    async def wait(self) -> None:
        await self._ready.wait()
        self._ready.clear()


class EventHub:
    def __init__(self) -> None:
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)

    def subscribe(self, job_id: str) -> Subscription:
        sub = Subscription()
        self._subs[job_id].add(sub)
        return sub

    def unsubscribe(self, job_id: str, sub: Subscription) -> None:
        subs = self._subs.get(job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[job_id]

    def poke(self, job_id: str) -> None:
        """The job has new events this gateway did not publish (another gateway wrote them):
        its watchers read them from the store."""
        for sub in self._subs.get(job_id, ()):
            sub.lagged = True
            sub.push_nothing()

    def publish(self, events: Sequence[job_pb2.JobEvent]) -> None:
        for event in events:
            for sub in self._subs.get(event.job_id, ()):
                sub.push(event)
