"""What the gateway knows of each attached worker replica."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from google.protobuf import timestamp_pb2

from gateway.jobs import now
from jobmesh.errors import JobmeshError
from jobmesh.outbox import Outbox
from jobmesh.v1 import admin_service_pb2, dispatcher_pb2

AttemptKey = tuple[str, int]


class SessionReplaced(JobmeshError):
    """A newer session of the same worker identity took this one's place; its stream ends
    with this status (ABORTED), so the worker it belonged to can say why."""

    code = grpc.StatusCode.ABORTED


@dataclass(eq=False)
class WorkerSession:
    """One attached replica: its capacity, what it runs, how it last answered a ping."""

    session_id: str
    worker_id: str
    kinds: dict[str, int]
    """Kind -> most jobs of it at once (0: up to `slots`)."""
    slots: int
    labels: dict[str, str] = field(default_factory=dict)
    version: str = ""
    peer: str = ""
    principal: str = ""
    """Name of the credential the worker attached with: with `worker_id`, its identity."""
    tenant: str = "*"
    """The tenant whose jobs the credential may run ("*": every tenant's)."""
    schemas: dict[str, str] = field(default_factory=dict)
    """Kind -> version (digest) of the params schema the worker declared for it, if any."""
    outbox: Outbox[dispatcher_pb2.SessionResponse] = field(default_factory=Outbox)
    inflight: dict[AttemptKey, str] = field(default_factory=dict)
    """Attempts handed to the worker and not yet ended -> their kind. They hold its slots."""
    per_kind: Counter[str] = field(default_factory=Counter)
    draining: bool = False
    paused: bool = False
    """The worker refused a job for want of a slot; it gets no more until its next pong."""
    stalled: bool = False
    """An Assign went unacknowledged; the worker gets no more until it says something of a
    job again (a black hole that answers pings must not draw job after job)."""
    connect_time: timestamp_pb2.Timestamp = field(default_factory=now)
    last_pong_time: timestamp_pb2.Timestamp | None = None
    last_heard: float = field(default_factory=time.monotonic)
    """Monotonic time of the last pong answering a ping (or of the attach)."""
    pinged: int = 0
    """Sequence number of the last ping sent."""
    answered: int = 0
    """Sequence number of the last ping answered."""
    stats: dispatcher_pb2.WorkerStats = field(default_factory=dispatcher_pb2.WorkerStats)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by `close`: the stream is to end with `close_error`."""
    close_error: JobmeshError | None = None

    def close(self, error: JobmeshError) -> None:
        """Ends the session's stream with `error`'s status (the Dispatcher does it)."""
        if self.close_error is None:
            self.close_error = error
        self.closed.set()

    @property
    def load(self) -> float:
        return len(self.inflight) / self.slots

    def can_take(self, kind: str) -> bool:
        # Only a worker that has answered a ping gets work: one that attaches and then says
        # nothing would hold its jobs until it is declared dead.
        if not self.answered or self.draining or self.paused or self.stalled:
            return False
        if len(self.inflight) >= self.slots:
            return False
        if kind not in self.kinds:
            return False
        limit = self.kinds[kind]
        return limit == 0 or self.per_kind[kind] < limit

    def hold(self, key: AttemptKey, kind: str) -> None:
        self.inflight[key] = kind
        self.per_kind[kind] += 1

    def release(self, key: AttemptKey) -> bool:
        """Frees the attempt's slot; False if the worker did not hold it."""
        kind = self.inflight.pop(key, None)
        if kind is None:
            return False
        self.per_kind[kind] -= 1
        return True

    def heard(self, pong: dispatcher_pb2.Pong) -> bool:
        """Takes a pong; False (and ignored) unless it answers a ping not answered before.
        Whatever else a worker sends, only answered pings keep it alive."""
        if not self.answered < pong.seq <= self.pinged:
            return False
        self.answered = pong.seq
        self.last_heard = time.monotonic()
        self.last_pong_time = now()
        self.paused = False
        self.stats.CopyFrom(pong.stats)
        return True

    def to_proto(self) -> admin_service_pb2.Worker:
        worker = admin_service_pb2.Worker(
            worker_id=self.worker_id,
            session_id=self.session_id,
            kinds=[
                dispatcher_pb2.KindCapacity(kind=k, max_concurrency=n)
                for k, n in sorted(self.kinds.items())
            ],
            slots=self.slots,
            active_jobs=len(self.inflight),
            labels=self.labels,
            version=self.version,
            peer=self.peer,
            state=(
                admin_service_pb2.WORKER_STATE_DRAINING
                if self.draining
                else admin_service_pb2.WORKER_STATE_ACTIVE
            ),
            stats=self.stats,
        )
        worker.connect_time.CopyFrom(self.connect_time)
        if self.last_pong_time is not None:
            worker.last_pong_time.CopyFrom(self.last_pong_time)
        return worker
