"""Where jobs and their events are kept: SQLite for one gateway, PostgreSQL for several.

The queue lives here too. A QUEUED job stays in the store until a gateway claims it: a
claim leases the job to that gateway (its `owner` name) until the lease expires, which
keeps every other gateway's claims off it. A gateway keeps in memory only the jobs it has
claimed (a bounded window of each queue's head, and the running attempts), so its memory
does not grow with the queue and a restart does not read the queue back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from jobmesh.v1 import job_pb2

# Called, in commit order, with the events a write made durable.
OnCommitted = Callable[[Sequence[job_pb2.JobEvent]], None]

ANY_TENANT = "*"
"""As the tenant of a read (`get`, `expired`, `JobFilter.tenant`, `blob_visible`): every
tenant's, for an admin of them all. Never a tenant's name: the auth file refuses it as one."""


@dataclass(frozen=True)
class JobFilter:
    """What List selects; empty fields select everything."""

    tenant: str
    """The tenant whose jobs are listed; `ANY_TENANT` for every tenant's."""
    states: tuple[int, ...] = ()
    kind: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    created_after: float | None = None
    created_before: float | None = None


@dataclass(frozen=True)
class Inserted:
    job: job_pb2.Job
    existing: bool = False
    """The idempotency key matched this earlier job; nothing was inserted."""


@dataclass(frozen=True)
class Usage:
    """What a tenant holds in the store, counted store-wide (every gateway's jobs)."""

    queued: int = 0
    """Its jobs in state QUEUED."""
    stored_bytes: int = 0
    """The inline inputs of its jobs not yet purged, and the blobs it owns (uploaded within
    a retention and not deleted since), each once at its size."""


Admit = Callable[[Usage, Usage], None]
"""Called in an insert's transaction with the tenant's usage and what the new jobs would
add (idempotent repeats excluded); raising refuses the whole insert with that error."""


@dataclass(frozen=True)
class Unfinished:
    """A job to take back at start, without its inline inputs: `JobStore.inputs` reads them."""

    job: job_pb2.Job
    inline_bytes: int
    """Bytes of the inline inputs left in the store (their values' lengths together)."""
    ready_at: float = 0.0
    """Of a QUEUED job: its `Placement.ready_at`."""
    inputs: bytes | None = None
    """Its inline inputs (a JobSpec carrying only them), when a claim read them with the job:
    those of at most `CLAIM_INPUT_BYTES`; the others are read when the job is assigned."""


CLAIM_INPUT_BYTES = 64 << 10
"""Inline inputs a claim reads with their job, at most (a window's jobs, read at once)."""


@dataclass(frozen=True)
class StoredSchema:
    """A version of a kind's params schema, as workers of a tenant declared it."""

    kind: str
    tenant: str
    """The tenant of the credential that declared it; `ANY_TENANT` for one of every tenant."""
    digest: str
    """Its version: `jobmesh.params.schema_digest`."""
    schema: bytes
    """The ParamsSchema, encoded (`jobmesh.params.schema_bytes`)."""
    first_seen: float
    """When a worker first declared it (time.time() seconds)."""
    last_seen: float
    """When a worker last attached declaring it."""


@dataclass(frozen=True)
class Placement:
    """Where a job stands in its queue while QUEUED; written with the job when it enters
    the queue (insert, or a save that puts it back)."""

    ready_at: float
    """time.time() from which it may be claimed, and from which its age in the queue counts:
    now for a job queued at once, later for `not_before` or a retry's backoff. A queue is
    taken by priority (highest first), then `ready_at`, then id."""
    due_at: float | None = None
    """When it fails if still queued (its schedule-to-close deadline, or its
    schedule-to-start limit from `ready_at`); None for never."""
    owner: str = ""
    """The gateway it stays leased to (it keeps it in memory); "" puts it in the store for
    any gateway to claim."""
    lease_until: float | None = None
    """When the owner's lease ends (time.time()); None: when it is released, or the store
    reopened by a gateway that owns the store alone (SQLite)."""


@dataclass(frozen=True)
class QueueDepth:
    """One queue (kind, tenant) of the store, counted store-wide."""

    kind: str
    tenant: str
    queued: int
    """Its QUEUED jobs, ready or not, claimed or not."""
    oldest_ready_at: float | None
    """The `ready_at` of its oldest ready job (ready by the `now` asked), None when it has
    none: how long the queue has kept someone waiting."""


@dataclass
class Page:
    jobs: list[job_pb2.Job] = field(default_factory=list)
    last_id: str = ""
    """Id of the last job when more may follow; empty on the last page."""


class JobStore(Protocol):
    """Durable jobs and events. Writes are applied in the order they are made."""

    async def open(self, on_committed: OnCommitted) -> None: ...

    async def close(self) -> None: ...

    async def insert(
        self,
        jobs: Sequence[job_pb2.Job],
        events: Sequence[job_pb2.JobEvent],
        admit: Admit | None = None,
        *,
        placements: Sequence[Placement] | None = None,
    ) -> list[Inserted]:
        """Inserts new QUEUED jobs (of one tenant) with their first event and their place in
        the queue (`placements`, one per job; None: each ready from its create time, due as
        `rows.placement_of` says, leased to no one), all or none.

        A job whose (tenant, idempotency key) exists already is not inserted;
        the earlier job comes back, without its inline inputs, with `existing=True`,
        and its event is dropped. Each new job references its input blobs. `admit` sees the
        tenant's usage in the same transaction, so that a quota holds across gateways.
        """
        ...

    def save(
        self,
        job: job_pb2.Job,
        event: job_pb2.JobEvent | None,
        placement: Placement | None = None,
    ) -> Awaitable[None]:
        """Writes the job's status (not its spec) and appends the event; `placement` puts a
        QUEUED job (back) in its queue.

        Takes effect in call order even when the caller does not await it. The save that
        ends the job sets when it expires; one that makes it SUCCEEDED references its
        output blobs.
        """
        ...

    def barrier(self) -> Awaitable[None]:
        """Done once every write made before it is committed."""
        ...

    async def get(self, tenant: str, job_id: str) -> job_pb2.Job | None:
        """The job whole, inline inputs and outputs included; None unless it is `tenant`'s
        (any tenant's for `ANY_TENANT`)."""
        ...

    async def list_jobs(
        self, where: JobFilter, page_size: int, after_id: str, max_bytes: int | None = None
    ) -> Page:
        """Jobs newest first, without inline inputs or outputs: at most `page_size`, and
        at most `max_bytes` serialized (but always one, so paging goes on)."""
        ...

    async def events(self, job_id: str, after_seq: int) -> list[job_pb2.JobEvent]: ...

    async def running(self) -> list[Unfinished]:
        """Jobs ASSIGNED or RUNNING, in submit order; their inputs are not read. (Queued
        jobs stay in the store: `claim` takes them.)"""
        ...

    async def claim(
        self, owner: str, kind: str, tenant: str, limit: int, now: float, lease_until: float
    ) -> list[Unfinished]:
        """Leases to `owner`, until `lease_until`, the next `limit` QUEUED jobs of the queue
        (kind, tenant) that are ready by `now` and not leased (or whose lease expired), by
        priority, then `ready_at`, then id; returns them in that order, inputs unread."""
        ...

    async def claim_job(
        self, owner: str, tenant: str, job_id: str, lease_until: float
    ) -> Unfinished | None:
        """Leases this QUEUED job of `tenant` (any tenant's for ANY_TENANT) to `owner`,
        ready or not, if no other gateway holds a live lease on it; None otherwise."""
        ...

    async def claim_due(
        self, owner: str, now: float, limit: int, lease_until: float
    ) -> list[Unfinished]:
        """Leases to `owner` up to `limit` QUEUED jobs not leased whose `due_at` has passed
        by `now`, so that it fails them."""
        ...

    async def next_times(self, now: float) -> tuple[float | None, float | None]:
        """(the earliest `ready_at` after `now`, the earliest `due_at`) among QUEUED jobs not
        leased: when the next delayed job becomes ready, when the next one falls due."""
        ...

    async def forget_leases(self) -> None:
        """Frees every lease, as if each had ended: called at start by a gateway that holds
        the database alone (`gateway.store.lock`), for what an earlier one held."""
        ...

    def release(self, job_ids: Collection[str]) -> Awaitable[None]:
        """Gives these QUEUED jobs' leases up: they stay in the store for any gateway to
        claim. Takes effect in call order, as `save`."""
        ...

    async def queue_depths(self, now: float) -> list[QueueDepth]:
        """Every queue that holds QUEUED jobs, counted store-wide."""
        ...

    async def inputs(self, job_id: str) -> dict[str, bytes]:
        """The job's inline inputs; empty if it has none."""
        ...

    async def purge(self, now: float, limit: int) -> int:
        """Deletes up to `limit` jobs that expired by `now` (time.time() seconds), with
        their events, inputs and blob references; returns how many. Blob ownership older
        than a retention goes too.

        Each leaves a tombstone for `expired`, itself deleted one retention later.
        """
        ...

    async def expired(self, tenant: str, job_id: str) -> bool:
        """Whether `tenant`'s job (any tenant's for `ANY_TENANT`) existed and was purged,
        as opposed to never existing."""
        ...

    async def referenced(self, blob_ids: Collection[str]) -> set[str]:
        """Those of the blobs some job references."""
        ...

    async def own_blob(
        self, blob_id: str, tenant: str, principal: str, now: float, *, fresh: bool, size: int = 0
    ) -> None:
        """Records that `principal` of `tenant` uploaded the blob of `size` bytes at `now`
        (time.time()); the tenant's stored bytes count it once.

        `fresh`: the blob's file was just made, so the owners of an earlier file of the
        same content (swept since) are forgotten. Ownership lasts a retention; `purge`
        forgets it after that, when the tenant still sees the blob through its jobs.
        """
        ...

    async def forget_owners(self, blob_ids: Collection[str], before: float) -> None:
        """Forgets who uploaded these blobs before `before` (time.time()): their files were
        deleted. Uploads since then made new files, whose owners stay."""
        ...

    async def usage(self, tenant: str) -> Usage:
        """What the tenant holds in the store now."""
        ...

    async def blob_visible(self, tenant: str, blob_id: str) -> bool:
        """Whether `tenant` uploaded the blob or one of its jobs references it; any blob
        for `ANY_TENANT`. Whether the blob's file exists is the BlobStore's to say."""
        ...

    async def blob_uploaded_by(self, principal: str, blob_id: str) -> bool:
        """Whether `principal` uploaded the blob (within the owners' retention)."""
        ...

    def declare_schema(self, schema: StoredSchema) -> Awaitable[None]:
        """Keeps a version of a kind's params schema: added with its `first_seen`, or its
        `last_seen` moved if it is kept already. Takes effect in call order, as `save`."""
        ...

    async def schemas(self) -> list[StoredSchema]:
        """Every version of every kind's params schema kept."""
        ...
