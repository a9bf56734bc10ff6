"""The PostgreSQL job store, which several gateways share.

Writes that must keep their order (`insert`, `save`, `release`, `declare_schema`) go
through one writer connection in group commits (`pg_writer`); everything else runs on a
small pool once the writes made before it are committed, so a gateway reads what it
wrote. Gateways claim queued jobs with `FOR UPDATE SKIP LOCKED` under leases that end,
so a claim never waits for another gateway's and a dead gateway's jobs come back.
Counters (each tenant's usage, each queue's depth) are kept by triggers
(`pg_migrations`).

While the server cannot be reached, calls fail with `jobmesh.errors.Unavailable`
(UNAVAILABLE to RPCs); the store connects again by itself once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar, cast

import asyncpg

from gateway.jobs import ts_seconds
from gateway.store import (
    ANY_TENANT,
    Admit,
    Inserted,
    JobFilter,
    OnCommitted,
    Page,
    Placement,
    QueueDepth,
    StoredSchema,
    Unfinished,
    Usage,
    pg_migrations,
    pg_queries,
    rows,
)
from gateway.store.open import shown
from gateway.store.pg_writer import (
    CANCEL_CHANNEL,
    CLOSE_TIMEOUT,
    EVENTS_CHANNEL,
    QUEUED_CHANNEL,
    Fenced,
    GroupWriter,
    Run,
    SaveRow,
    is_down,
    notices,
    notify,
    unavailable,
)
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RETENTION = 7 * 24 * 3600.0
POOL_SIZE = 4
CONNECT_TIMEOUT = 5.0
# A server that takes longer than this to answer is as good as gone.
COMMAND_TIMEOUT = 60.0


class PostgresStore:
    """`JobStore` on a PostgreSQL database (`dsn`: a postgresql:// URL).

    Finished jobs expire `retention` seconds after they end, unless their spec says
    otherwise; tombstones of purged jobs are kept as long again.
    """

    def __init__(
        self, dsn: str, *, retention: float = DEFAULT_RETENTION, pool_size: int = POOL_SIZE
    ) -> None:
        self._dsn = dsn
        self._where = shown(dsn)
        self._retention = retention
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._writer: GroupWriter | None = None
        self._owner: str | None = None
        """This gateway's name in the `gateways` table, once it joined."""
        self._listener: asyncpg.Connection | None = None

    async def open(self, on_committed: OnCommitted) -> None:
        # No command timeout: a migration, or the wait for another gateway's, takes what
        # it takes.
        conn = await self._connect(command_timeout=None)
        try:
            await pg_migrations.migrate(conn, self._where)
        except Exception as exc:
            conn.terminate()
            if is_down(exc):
                raise unavailable(exc) from exc
            raise
        await conn.close()
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
        except Exception as exc:
            if is_down(exc):
                raise unavailable(exc) from exc
            raise
        self._writer = GroupWriter(self._connect, on_committed)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.terminate()
            self._listener = None
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
            except Exception:  # a server gone: nothing to say goodbye to
                self._pool.terminate()
            self._pool = None

    # --- how calls reach the server -------------------------------------------

    async def _connect(self, command_timeout: float | None = COMMAND_TIMEOUT) -> asyncpg.Connection:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                self._dsn, timeout=CONNECT_TIMEOUT, command_timeout=command_timeout
            )
        except Exception as exc:
            if is_down(exc):
                raise unavailable(exc) from exc
            raise
        return conn

    def _write(
        self, run: Run, *, tenants: Collection[str] = (), unawaited: bool = False
    ) -> asyncio.Future[Any]:
        """`run` in the writer's next group commit; `tenants`: whose counters it may change;
        `unawaited`: callers may not wait for it, so it is durable (kept through an
        outage) and a failure is logged."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        future = self._writer.submit(run, tenants=tenants, durable=unawaited)
        if unawaited:
            future.add_done_callback(_log_failure)
        return future

    async def _run(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, retry: bool = True
    ) -> T:
        """`fn` on a pooled connection, once the writes made before are committed.

        `retry`: `fn` may run twice, so that a connection the server dropped while it sat
        in the pool costs no failure.
        """
        if self._pool is None or self._writer is None:
            raise RuntimeError("store is not open")
        tail = self._writer.tail
        if tail is not None and not tail.done() and self._writer.down is None:
            await asyncio.wait([tail])
        for attempt in range(2):
            try:
                async with self._pool.acquire() as conn:
                    # A proxy of a connection, which the statements cannot tell apart.
                    return await fn(cast(asyncpg.Connection, conn))
            except Exception as exc:
                if not is_down(exc):
                    raise
                if attempt or not retry:
                    raise unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *args: Any, retry: bool = True) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(sql, *args), retry=retry)

    async def _fetchrow(self, sql: str, *args: Any, retry: bool = True) -> asyncpg.Record | None:
        return await self._run(lambda conn: conn.fetchrow(sql, *args), retry=retry)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        return await self._run(lambda conn: conn.fetchval(sql, *args))

    # --- JobStore: writes in call order ---------------------------------------

    async def insert(
        self,
        jobs: Sequence[job_pb2.Job],
        events: Sequence[job_pb2.JobEvent],
        admit: Admit | None = None,
        *,
        placements: Sequence[Placement] | None = None,
    ) -> list[Inserted]:
        if not jobs:
            return []
        if placements is None:
            placements = [rows.placement_of(job, ts_seconds(job.create_time)) for job in jobs]
        new = pg_queries.NewJobs.of(jobs, events, placements)
        tenant = jobs[0].tenant

        async def admitted(conn: asyncpg.Connection) -> Exception | None:
            """The refusal of `admit`, if it refuses, before anything is written."""
            if admit is None:
                return None
            # The usage row stays locked to the commit: other gateways' inserts for this
            # tenant wait, so that the quota holds store-wide.
            keys = [job.spec.idempotency_key for job in jobs if job.spec.idempotency_key]
            locked = await conn.fetchrow(pg_queries.LOCK_USAGE, tenant, keys)
            assert locked is not None  # an upsert returns its row
            taken = set(locked["taken"])
            adding = Usage()
            for job in jobs:
                key = job.spec.idempotency_key
                if key not in taken:
                    taken.add(key or job.id)
                    # What the triggers will add: the job queued, and its inline bytes.
                    adding = Usage(
                        adding.queued + 1, adding.stored_bytes + new.input_bytes.get(job.id, 0)
                    )
            try:
                admit(Usage(locked["queued"], locked["stored_bytes"]), adding)
            except Exception as refusal:
                return refusal
            return None

        async def run(conn: asyncpg.Connection) -> tuple[Any, Sequence[job_pb2.JobEvent]]:
            refusal = await admitted(conn)
            if refusal is not None:
                return refusal, ()
            found = await conn.fetch(pg_queries.INSERT_JOBS, *new.args)
            inserted = {job_id for (job_id,) in found}
            keys = [job.spec.idempotency_key for job in jobs if job.id not in inserted]
            earlier = {
                key: rows.job_from_row(spec, status)
                for key, spec, status in (
                    await conn.fetch(pg_queries.EXISTING, tenant, keys) if keys else ()
                )
            }
            out = [
                Inserted(job)
                if job.id in inserted
                else Inserted(earlier[job.spec.idempotency_key], existing=True)
                for job in jobs
            ]
            if self._owner is not None:
                now = time.time()
                queued = {
                    f"{job.spec.kind}\t{job.tenant}"
                    for job, place in zip(jobs, placements, strict=True)
                    if job.id in inserted and not place.owner and place.ready_at <= now
                }
                await notify(conn, notices(QUEUED_CHANNEL, self._owner, sorted(queued), "\n"))
            return out, [event for event in events if event.job_id in inserted]

        result = await self._write(run, tenants=(tenant,))
        if isinstance(result, Exception):
            raise result
        done: list[Inserted] = result
        return done

    def save(
        self,
        job: job_pb2.Job,
        event: job_pb2.JobEvent | None,
        placement: Placement | None = None,
    ) -> asyncio.Future[None]:
        if self._writer is None:
            raise RuntimeError("store is not open")
        row = SaveRow(
            job.id,
            job.tenant,
            job.spec.kind,
            int(job.state),
            rows.status_blob(job),
            rows.expire_time(job, self._retention),
            job.spec.priority,
            placement,
            event,
            rows.stored_event(event) if event is not None else None,
            rows.output_blob_ids(job),
        )
        future = self._writer.submit(save=row, durable=True)
        # Callers often do not wait for a save; a failure must still be seen.
        future.add_done_callback(_log_failure)
        return future

    async def forget_leases(self) -> None:
        async def run(conn: asyncpg.Connection) -> tuple[None, Sequence[job_pb2.JobEvent]]:
            await conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner IS NOT NULL"
            )
            return None, ()

        await self._write(run)

    def release(self, job_ids: Collection[str]) -> asyncio.Future[None]:
        wanted = list(job_ids)

        async def run(conn: asyncpg.Connection) -> tuple[None, Sequence[job_pb2.JobEvent]]:
            found = await conn.fetch(pg_queries.RELEASE + " RETURNING kind, tenant", wanted)
            await self._notify_queued(conn, found)
            return None, ()

        return self._write(run, unawaited=True)

    async def _notify_queued(self, conn: asyncpg.Connection, queues: Sequence[Any]) -> None:
        if self._owner is not None and queues:
            keys = sorted({f"{kind}\t{tenant}" for kind, tenant in queues})
            await notify(conn, notices(QUEUED_CHANNEL, self._owner, keys, "\n"))

    # --- several gateways on one database -------------------------------------------
    # Each gateway joins under a name of its own and beats; the jobs it leases are live as
    # long as it does. One silent for longer than the lease is marked dead by another
    # (`take_over`): its queued jobs go back to the queue and its running attempts are
    # claimed by the gateway their worker re-attaches to (`claim_running`), or retried
    # by any once the re-attach grace has passed (`claim_orphaned`). Every write of a
    # gateway marked dead is refused (`Fenced`): a gateway cut off from the database
    # cannot commit over the work the others took over.

    shared = True
    """Several gateways may share this store."""

    async def join(self, owner: str, on_fenced: Callable[[Fenced], None]) -> None:
        """Enters the gateway in the table of gateways; from then on its writes are fenced
        by its membership, and `on_fenced` is called if it is ever marked dead."""
        now = time.time()
        await self._fetch(
            "INSERT INTO gateways (name, started_at, heartbeat_at) VALUES ($1, $2, $2)",
            owner,
            now,
        )
        self._owner = owner
        assert self._writer is not None
        self._writer.owner = owner
        self._writer.on_fenced = on_fenced

    async def leave(self) -> None:
        """Leaves the gateways at a graceful stop: its running attempts are free for the
        gateway their worker re-attaches to, at once."""
        await self._fetch(
            "UPDATE gateways SET dead = true, dead_at = $2 WHERE name = $1",
            self._owner,
            time.time(),
        )

    async def heartbeat(self, workers: bytes) -> bool:
        """Says the gateway is alive, with the workers attached to it (a ListWorkersResponse);
        False if it was marked dead meanwhile (its work taken over)."""
        alive = await self._fetchval(
            "UPDATE gateways SET heartbeat_at = $2, workers = $3 WHERE name = $1 AND NOT dead"
            " RETURNING true",
            self._owner,
            time.time(),
            workers,
        )
        return bool(alive)

    async def take_over(self, silent_for: float) -> tuple[list[str], list[tuple[str, str]]]:
        """Marks dead the gateways that did not beat for `silent_for` seconds and puts their
        queued jobs back in the queue; returns their names and those queues."""

        async def run(conn: asyncpg.Connection) -> tuple[Any, Sequence[job_pb2.JobEvent]]:
            now = time.time()
            dead = [
                name
                for (name,) in await conn.fetch(
                    "UPDATE gateways SET dead = true, dead_at = $1"
                    " WHERE NOT dead AND heartbeat_at < $2 AND name != $3 RETURNING name",
                    now,
                    now - silent_for,
                    self._owner,
                )
            ]
            found: list[Any] = []
            if dead:
                found = await conn.fetch(
                    "UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                    f" WHERE lease_owner = ANY($1::text[]) AND state = {pg_migrations.QUEUED}"
                    " RETURNING kind, tenant",
                    dead,
                )
                await self._notify_queued(conn, found)
            # Gateways dead for a day are forgotten.
            await conn.execute(
                "DELETE FROM gateways WHERE dead AND dead_at < $1 AND NOT EXISTS"
                " (SELECT 1 FROM jobs WHERE lease_owner = gateways.name)",
                now - 86400,
            )
            return (dead, sorted({(kind, tenant) for kind, tenant in found})), ()

        taken: tuple[list[str], list[tuple[str, str]]] = await self._write(run)
        return taken

    async def claim_running(self, job_id: str, attempt: int) -> Unfinished | None:
        """Takes over an attempt of a dead gateway, for the worker that re-attached here
        with it; None unless the job runs that attempt under a dead gateway's lease."""

        async def run(conn: asyncpg.Connection) -> tuple[Any, Sequence[job_pb2.JobEvent]]:
            row = await conn.fetchrow(pg_queries.RUNNING_OF_DEAD, job_id)
            if row is None:
                return None, ()
            item = pg_queries.claimed(*row)
            if item.job.attempt != attempt:
                return None, ()
            await conn.execute(
                "UPDATE jobs SET lease_owner = $1, lease_until = 'Infinity' WHERE id = $2",
                self._owner,
                job_id,
            )
            return item, ()

        found: Unfinished | None = await self._write(run)
        return found

    async def claim_orphaned(self, dead_before: float, limit: int) -> list[Unfinished]:
        """Takes over the running attempts of gateways dead since before `dead_before`
        whose workers did not re-attach anywhere: to be retried."""

        async def run(conn: asyncpg.Connection) -> tuple[Any, Sequence[job_pb2.JobEvent]]:
            found = await conn.fetch(
                pg_queries.CLAIM_RUNNING
                + " AND lease_owner IN (SELECT name FROM gateways WHERE dead AND dead_at < $2)"
                + " AND id IN (SELECT id FROM jobs WHERE lease_owner IN"
                + " (SELECT name FROM gateways WHERE dead) LIMIT $3)"
                + " RETURNING "
                + pg_queries.CLAIMED,
                self._owner,
                dead_before,
                limit,
            )
            return [pg_queries.claimed(*row) for row in found], ()

        claimed: list[Unfinished] = await self._write(run)
        return claimed

    async def total_queued(self) -> int:
        """QUEUED jobs of every queue, every gateway's."""
        total = await self._fetchval("SELECT coalesce(sum(queued), 0) FROM queue_depth")
        return int(total)

    async def mesh_workers(self) -> list[tuple[str, bytes]]:
        """(gateway, its workers as a ListWorkersResponse) of every other live gateway."""
        found = await self._fetch(
            "SELECT name, workers FROM gateways WHERE NOT dead AND name != $1 ORDER BY name",
            self._owner,
        )
        return [(name, bytes(workers)) for name, workers in found]

    async def ask_cancel(self, job_id: str, reason: str, by: str) -> None:
        """Asks the gateway running the job to cancel it."""

        async def run(conn: asyncpg.Connection) -> tuple[None, Sequence[job_pb2.JobEvent]]:
            body = [f"{job_id}\t{reason}\t{by}"]
            await notify(conn, notices(CANCEL_CHANNEL, self._owner or "", body, ""))
            return None, ()

        await self._write(run)

    async def listen(self, on_notice: Callable[[str, str, str], None]) -> None:
        """Calls `on_notice(channel, sender, body)` for each notice of another gateway."""
        conn = await self._connect(command_timeout=None)

        def heard(_: object, _pid: int, channel: str, payload: object) -> None:
            sender, _, body = str(payload).partition("\n")
            if sender != self._owner:
                on_notice(channel, sender, body)

        for channel in (QUEUED_CHANNEL, EVENTS_CHANNEL, CANCEL_CHANNEL):
            await conn.add_listener(channel, heard)
        self._listener = conn

    def declare_schema(self, schema: StoredSchema) -> asyncio.Future[None]:
        async def run(conn: asyncpg.Connection) -> tuple[None, Sequence[job_pb2.JobEvent]]:
            await conn.execute(
                "INSERT INTO kind_schemas VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (kind, tenant, digest) DO UPDATE SET last_seen = excluded.last_seen",
                schema.kind,
                schema.tenant,
                schema.digest,
                schema.schema,
                schema.first_seen,
                schema.last_seen,
            )
            return None, ()

        return self._write(run, unawaited=True)

    def barrier(self) -> asyncio.Future[None]:
        if self._writer is None:
            raise RuntimeError("store is not open")
        # Settled once every write before it is committed, after an outage too.
        done: asyncio.Future[None] = self._writer.submit()
        return done

    # --- JobStore: jobs and events --------------------------------------------

    async def get(self, tenant: str, job_id: str) -> job_pb2.Job | None:
        row = await self._fetchrow(pg_queries.GET, job_id, _tenant(tenant))
        return None if row is None else rows.job_from_row(*row)

    async def list_jobs(
        self, where: JobFilter, page_size: int, after_id: str, max_bytes: int | None = None
    ) -> Page:
        sql, args = pg_queries.list_query(where, page_size + 1, after_id)
        return rows.page_of(await self._fetch(sql, *args), page_size, max_bytes)

    async def events(self, job_id: str, after_seq: int) -> list[job_pb2.JobEvent]:
        found = await self._fetch(pg_queries.EVENTS, job_id, after_seq)
        return [job_pb2.JobEvent.FromString(data) for (data,) in found]

    async def running(self) -> list[Unfinished]:
        found = await self._fetch(
            "SELECT spec, status, coalesce(bytes, 0) FROM jobs LEFT JOIN job_inputs ON job_id = id"
            f" WHERE state IN {pg_migrations.RUNNING_STATES} ORDER BY n"
        )
        return [Unfinished(rows.job_from_row(spec, status), size) for spec, status, size in found]

    async def inputs(self, job_id: str) -> dict[str, bytes]:
        data = await self._fetchval("SELECT data FROM job_inputs WHERE job_id = $1", job_id)
        return {} if data is None else dict(job_pb2.JobSpec.FromString(data).inputs)

    # --- JobStore: the queue --------------------------------------------------
    # A claim is not retried when its connection breaks: it may have leased the jobs.

    async def claim(
        self, owner: str, kind: str, tenant: str, limit: int, now: float, lease_until: float
    ) -> list[Unfinished]:
        found = await self._fetch(
            pg_queries.CLAIM, owner, kind, tenant, limit, now, lease_until, retry=False
        )
        # RETURNING keeps no order: back to the queue's (priority, ready_at, id).
        found.sort(key=lambda r: (-r["priority"], r["ready_at"], r["id"]))
        return [pg_queries.claimed(*row[2:]) for row in found]

    async def claim_job(
        self, owner: str, tenant: str, job_id: str, lease_until: float
    ) -> Unfinished | None:
        row = await self._fetchrow(
            pg_queries.CLAIM_JOB,
            owner,
            lease_until,
            job_id,
            _tenant(tenant),
            time.time(),
            retry=False,
        )
        return None if row is None else pg_queries.claimed(*row)

    async def claim_due(
        self, owner: str, now: float, limit: int, lease_until: float
    ) -> list[Unfinished]:
        found = await self._fetch(pg_queries.CLAIM_DUE, owner, now, limit, lease_until, retry=False)
        found.sort(key=lambda r: (r["due_at"], r["id"]))
        return [pg_queries.claimed(*row[2:]) for row in found]

    async def next_times(self, now: float) -> tuple[float | None, float | None]:
        row = await self._fetchrow(pg_queries.NEXT_TIMES, now)
        assert row is not None  # two aggregates: always one row
        return row[0], row[1]

    async def queue_depths(self, now: float) -> list[QueueDepth]:
        return [QueueDepth(*row) for row in await self._fetch(pg_queries.QUEUE_DEPTHS, now)]

    # --- JobStore: retention --------------------------------------------------

    async def purge(self, now: float, limit: int) -> int:
        forget_before = now - self._retention

        async def run(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                # Other gateways purging at once take other rows.
                gone = await conn.fetch(
                    "SELECT id, tenant FROM jobs WHERE expire_time <= $1"
                    " ORDER BY expire_time LIMIT $2 FOR UPDATE SKIP LOCKED",
                    now,
                    limit,
                )
                owners = await conn.fetch(
                    "SELECT blob_id, tenant, principal FROM blob_owners WHERE upload_time <= $1"
                    " LIMIT $2 FOR UPDATE SKIP LOCKED",
                    forget_before,
                    limit,
                )
                tenants = sorted({row["tenant"] for row in (*gone, *owners)})
                if len(tenants) > 1:
                    await conn.execute(pg_queries.LOCK_TENANTS, tenants)
                ids = [job_id for job_id, _ in gone]
                if ids:
                    # Inputs before jobs: their trigger finds the tenant through the job.
                    for table in ("events", "job_inputs", "blob_refs"):
                        await conn.execute(f"DELETE FROM {table} WHERE job_id = ANY($1)", ids)
                    await conn.execute("DELETE FROM jobs WHERE id = ANY($1)", ids)
                    await conn.execute(
                        "INSERT INTO expired_jobs SELECT id, tenant, $3"
                        " FROM unnest($1::text[], $2::text[]) AS g(id, tenant)"
                        " ON CONFLICT (id) DO UPDATE SET purge_time = excluded.purge_time",
                        ids,
                        [tenant for _, tenant in gone],
                        now,
                    )
                await conn.execute(
                    "DELETE FROM expired_jobs WHERE id IN (SELECT id FROM expired_jobs"
                    " WHERE purge_time <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    forget_before,
                    limit,
                )
                if owners:
                    await conn.execute(
                        "DELETE FROM blob_owners WHERE (blob_id, tenant, principal) IN"
                        " (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
                        *(list(column) for column in zip(*owners, strict=True)),
                    )
                return len(gone)

        return await self._run(run, retry=False)

    async def expired(self, tenant: str, job_id: str) -> bool:
        return bool(
            await self._fetchval(
                "SELECT EXISTS (SELECT 1 FROM expired_jobs"
                " WHERE id = $1 AND ($2::text IS NULL OR tenant = $2))",
                job_id,
                _tenant(tenant),
            )
        )

    # --- JobStore: blobs ------------------------------------------------------

    async def referenced(self, blob_ids: Collection[str]) -> set[str]:
        if not blob_ids:
            return set()
        found = await self._fetch(
            "SELECT DISTINCT blob_id FROM blob_refs WHERE blob_id = ANY($1::text[])",
            list(blob_ids),
        )
        return {blob_id for (blob_id,) in found}

    async def own_blob(
        self, blob_id: str, tenant: str, principal: str, now: float, *, fresh: bool, size: int = 0
    ) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                if fresh:
                    found = await conn.fetch(
                        "SELECT DISTINCT tenant FROM blob_owners WHERE blob_id = $1", blob_id
                    )
                    tenants = sorted({tenant, *(row["tenant"] for row in found)})
                    if len(tenants) > 1:
                        await conn.execute(pg_queries.LOCK_TENANTS, tenants)
                    await conn.execute("DELETE FROM blob_owners WHERE blob_id = $1", blob_id)
                await conn.execute(
                    "INSERT INTO blob_owners (blob_id, tenant, principal, upload_time, bytes)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (blob_id, tenant, principal)"
                    " DO UPDATE SET upload_time = excluded.upload_time",
                    blob_id,
                    tenant,
                    principal,
                    now,
                    size,
                )

        await self._run(run)

    async def forget_owners(self, blob_ids: Collection[str], before: float) -> None:
        if blob_ids:
            await self._fetch(
                "DELETE FROM blob_owners WHERE blob_id = ANY($1::text[]) AND upload_time < $2",
                list(blob_ids),
                before,
            )

    async def usage(self, tenant: str) -> Usage:
        row = await self._fetchrow(
            "SELECT queued, stored_bytes FROM tenant_usage WHERE tenant = $1", tenant
        )
        return Usage() if row is None else Usage(row[0], row[1])

    async def blob_visible(self, tenant: str, blob_id: str) -> bool:
        if tenant == ANY_TENANT:
            return True
        return bool(
            await self._fetchval(
                "SELECT EXISTS (SELECT 1 FROM blob_owners WHERE blob_id = $1 AND tenant = $2)"
                " OR EXISTS (SELECT 1 FROM blob_refs JOIN jobs ON jobs.id = blob_refs.job_id"
                " WHERE blob_refs.blob_id = $1 AND jobs.tenant = $2)",
                blob_id,
                tenant,
            )
        )

    async def blob_uploaded_by(self, principal: str, blob_id: str) -> bool:
        return bool(
            await self._fetchval(
                "SELECT EXISTS (SELECT 1 FROM blob_owners WHERE blob_id = $1 AND principal = $2)",
                blob_id,
                principal,
            )
        )

    # --- JobStore: params schemas ---------------------------------------------

    async def schemas(self) -> list[StoredSchema]:
        found = await self._fetch(
            "SELECT kind, tenant, digest, schema, first_seen, last_seen FROM kind_schemas"
        )
        return [StoredSchema(*row) for row in found]


def _tenant(tenant: str) -> str | None:
    """A read's tenant as a parameter: NULL for every tenant's."""
    return None if tenant == ANY_TENANT else tenant


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("store write failed: %s", future.exception())
