"""The SQLite job store: one file in WAL mode, written by one thread in group commits.

Every operation runs on a single database thread. The thread takes whatever
operations are waiting and runs them in one transaction: many concurrent
Submits cost one WAL commit together. If one of them fails, the batch is
rolled back and each runs again alone, so only the failing one fails.
With `synchronous=NORMAL` a committed transaction survives the gateway being
killed; only a power loss may take the last commits back.

The schema is versioned (`gateway.store.migrations`); opening a file upgrades it.
Finished jobs are purged in bounded batches, and the file gives the space back a
bounded number of pages at a time (incremental auto-vacuum).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple, TypeVar

from gateway.jobs import ts_seconds
from gateway.store import (
    ANY_TENANT,
    CLAIM_INPUT_BYTES,
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
    migrations,
    rows,
)
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
_QUEUED = int(job_pb2.JOB_STATE_QUEUED)
_MAX_OPS_PER_COMMIT = 512

DEFAULT_RETENTION = 7 * 24 * 3600.0
# Pages given back after each purge: about 16 MiB of 4 KiB pages, so that the writer
# thread is never held long; what is left goes with the next purges.
_VACUUM_PAGES = 4096
# Largest WAL kept on disk after a checkpoint.
_JOURNAL_SIZE_LIMIT = 64 << 20
# Host parameters per statement, well below SQLite's limit.
_MAX_PARAMS = 500


class _Save(NamedTuple):
    """What `save` writes: the job's state, status and expiry, its event, its new blob refs,
    and its place in its queue if it (re)enters it."""

    job_id: str
    state: int
    status: bytes
    expire_time: float | None
    event: tuple[str, int, bytes] | None
    blob_ids: Collection[str]
    placement: tuple[int, float, float | None, str | None, float | None] | None


class _Op:
    __slots__ = ("alone", "events", "fn", "future", "save")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any] | None,
        events: Sequence[job_pb2.JobEvent],
        save: _Save | None = None,
        alone: bool = False,
    ) -> None:
        self.fn = fn
        self.future = future
        self.events = events
        self.save = save
        self.alone = alone
        """Runs outside any transaction (as PRAGMA incremental_vacuum must)."""


class SqliteStore:
    """`JobStore` on a SQLite file.

    Finished jobs expire `retention` seconds after they end, unless their spec says
    otherwise; tombstones of purged jobs are kept as long again.
    """

    def __init__(self, path: str, *, retention: float = DEFAULT_RETENTION) -> None:
        self._path = path
        self._retention = retention
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_committed: OnCommitted = lambda events: None

    async def open(self, on_committed: OnCommitted) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_committed = on_committed
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="jobmesh-sqlite", daemon=True
        )
        self._thread.start()
        await opened

    async def close(self) -> None:
        if self._thread is None:
            return
        self._ops.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # --- the database thread -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
        try:
            migrations.migrate(conn, self._path, retention=self._retention)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, opened: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except Exception as exc:  # reported to open()'s caller
            self._loop.call_soon_threadsafe(opened.set_exception, exc)
            return
        self._loop.call_soon_threadsafe(opened.set_result, None)
        stopping = False
        while not stopping:
            batch: list[_Op] = []
            op = self._ops.get()
            while True:
                if op is None:
                    stopping = True
                    break
                if op.alone:
                    # What came before it is committed first, so order is kept.
                    if batch:
                        self._commit(conn, batch)
                        batch = []
                    self._commit_alone(conn, op)
                else:
                    batch.append(op)
                    if len(batch) >= _MAX_OPS_PER_COMMIT:
                        break
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(conn, batch)
        conn.close()

    def _commit_alone(self, conn: sqlite3.Connection, op: _Op) -> None:
        assert self._loop is not None
        outcome: tuple[bool, Any]
        try:
            outcome = (True, op.fn(conn))
        except Exception as exc:
            outcome = (False, exc)
        self._loop.call_soon_threadsafe(self._settle, [op], [outcome])

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        assert self._loop is not None
        try:
            outcomes = self._transaction(conn, batch)
        except Exception:
            # One operation failed: run each alone, so only it fails.
            outcomes = []
            for op in batch:
                try:
                    outcomes.extend(self._transaction(conn, [op]))
                except Exception as exc:
                    outcomes.append((False, exc))
        self._loop.call_soon_threadsafe(self._settle, batch, outcomes)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, batch: list[_Op]) -> list[tuple[bool, Any]]:
        # A job changes state several times within one batch (assigned, running, done):
        # consecutive saves are written together, each job's status once, its events in one
        # executemany. Any other operation first flushes them, so order is kept.
        statuses: dict[str, tuple[int, bytes, float | None]] = {}
        events: list[tuple[str, int, bytes]] = []
        refs: list[tuple[str, str]] = []
        places: dict[str, tuple[int, float, float | None, str | None, float | None]] = {}

        def flush() -> None:
            if events:
                conn.executemany("INSERT INTO events VALUES (?, ?, ?)", events)
                events.clear()
            if statuses:
                conn.executemany(
                    "UPDATE jobs SET state = ?, status = ?, expire_time = ? WHERE id = ?",
                    [(*row, job_id) for job_id, row in statuses.items()],
                )
                statuses.clear()
            if refs:
                conn.executemany("INSERT OR IGNORE INTO blob_refs VALUES (?, ?)", refs)
                refs.clear()
            if places:
                conn.executemany(
                    "UPDATE jobs SET priority = ?, ready_at = ?, due_at = ?, lease_owner = ?,"
                    " lease_until = ? WHERE id = ?",
                    [(*row, job_id) for job_id, row in places.items()],
                )
                places.clear()

        conn.execute("BEGIN")
        try:
            results: list[tuple[bool, Any]] = []
            for op in batch:
                if op.save is None:
                    flush()
                    results.append((True, op.fn(conn)))
                    continue
                save = op.save
                statuses[save.job_id] = (save.state, save.status, save.expire_time)
                if save.event is not None:
                    events.append(save.event)
                refs.extend((blob_id, save.job_id) for blob_id in save.blob_ids)
                if save.placement is not None:
                    places[save.job_id] = save.placement
                results.append((True, None))
            flush()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results

    def _settle(self, batch: list[_Op], outcomes: list[tuple[bool, Any]]) -> None:
        committed: list[job_pb2.JobEvent] = []
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                if op.events:
                    committed.extend(op.events)
                if op.future is not None and not op.future.done():
                    op.future.set_result(value)
            elif op.future is not None and not op.future.done():
                op.future.set_exception(value)
        if committed:
            self._on_committed(committed)

    def _call(
        self,
        fn: Callable[[sqlite3.Connection], T],
        events: Sequence[job_pb2.JobEvent] = (),
        save: _Save | None = None,
        *,
        alone: bool = False,
    ) -> asyncio.Future[T]:
        if self._thread is None or self._loop is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put(_Op(fn, future, events, save, alone))
        return future

    # --- JobStore -------------------------------------------------------------

    async def insert(
        self,
        jobs: Sequence[job_pb2.Job],
        events: Sequence[job_pb2.JobEvent],
        admit: Admit | None = None,
        *,
        placements: Sequence[Placement] | None = None,
    ) -> list[Inserted]:
        if placements is None:
            placements = [rows.placement_of(job, ts_seconds(job.create_time)) for job in jobs]
        prepared = [
            (
                (
                    job.id,
                    job.tenant,
                    job.spec.kind,
                    job.state,
                    job.spec.idempotency_key or None,
                    json.dumps(dict(job.spec.labels), sort_keys=True),
                    ts_seconds(job.create_time),
                    rows.spec_blob(job.spec),
                    rows.status_blob(job),
                    rows.expire_time(job, self._retention),
                    *_place(job, placement),
                ),
                rows.inputs_row(job.spec),
                [(blob_id, job.id) for blob_id in rows.input_blob_ids(job.spec)],
            )
            for job, placement in zip(jobs, placements, strict=True)
        ]

        def run(
            conn: sqlite3.Connection,
        ) -> tuple[list[Inserted], list[job_pb2.JobEvent], Exception | None]:
            if admit is not None and jobs:
                # Checked after the writes, which the usage counters follow, and undone
                # alone if refused: the other writes of the group commit stand.
                before = _usage(conn, jobs[0].tenant)
                conn.execute("SAVEPOINT quota")
                inserted, fresh = write(conn)
                after = _usage(conn, jobs[0].tenant)
                adding = Usage(
                    after.queued - before.queued, after.stored_bytes - before.stored_bytes
                )
                try:
                    admit(before, adding)
                except Exception as refusal:
                    conn.execute("ROLLBACK TO quota")
                    conn.execute("RELEASE quota")
                    return [], [], refusal
                conn.execute("RELEASE quota")
                return inserted, fresh, None
            return (*write(conn), None)

        def write(conn: sqlite3.Connection) -> tuple[list[Inserted], list[job_pb2.JobEvent]]:
            out: list[Inserted] = []
            fresh: list[job_pb2.JobEvent] = []
            for job, (row, inputs, refs), event in zip(jobs, prepared, events, strict=True):
                if job.spec.idempotency_key:
                    found = conn.execute(
                        "SELECT spec, status FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                        (job.tenant, job.spec.idempotency_key),
                    ).fetchone()
                    if found is not None:
                        out.append(Inserted(rows.job_from_row(*found), existing=True))
                        continue
                conn.execute(
                    "INSERT INTO jobs (id, tenant, kind, state, idempotency_key, labels,"
                    " create_time, spec, status, expire_time, priority, ready_at, due_at,"
                    " lease_owner, lease_until)"
                    f" VALUES ({', '.join('?' * 15)})",
                    row,
                )
                if inputs is not None:
                    conn.execute("INSERT INTO job_inputs VALUES (?, ?, ?)", (job.id, *inputs))
                conn.executemany("INSERT OR IGNORE INTO blob_refs VALUES (?, ?)", refs)
                conn.execute(
                    "INSERT INTO events VALUES (?, ?, ?)",
                    (event.job_id, event.seq, rows.stored_event(event)),
                )
                out.append(Inserted(job))
                fresh.append(event)
            return out, fresh

        # Which events become durable is known only inside the transaction.
        inserted, fresh, refusal = await self._call(run)
        if refusal is not None:
            raise refusal
        if fresh:
            self._on_committed(fresh)
        return inserted

    def save(
        self,
        job: job_pb2.Job,
        event: job_pb2.JobEvent | None,
        placement: Placement | None = None,
    ) -> asyncio.Future[None]:
        row = _Save(
            job.id,
            job.state,
            rows.status_blob(job),
            rows.expire_time(job, self._retention),
            (event.job_id, event.seq, rows.stored_event(event)) if event else None,
            rows.output_blob_ids(job),
            None if placement is None else _place(job, placement),
        )
        future = self._call(_unused, (event,) if event else (), save=row)
        # Callers often do not wait for a save; a failure must still be seen.
        future.add_done_callback(_log_failure)
        return future

    def barrier(self) -> asyncio.Future[None]:
        # Operations run in order, so a no-op one finishes after all earlier writes.
        return self._call(lambda conn: None)

    async def get(self, tenant: str, job_id: str) -> job_pb2.Job | None:
        where, args = _of_tenant(tenant, "id = ?", job_id)

        def run(conn: sqlite3.Connection) -> job_pb2.Job | None:
            row = conn.execute(
                "SELECT spec, status, data FROM jobs LEFT JOIN job_inputs ON job_id = id"
                f" WHERE {where}",
                args,
            ).fetchone()
            return None if row is None else rows.job_from_row(*row)

        return await self._call(run)

    async def list_jobs(
        self, where: JobFilter, page_size: int, after_id: str, max_bytes: int | None = None
    ) -> Page:
        condition, first = _of_tenant(where.tenant, "true")
        sql = [f"SELECT spec, status FROM jobs WHERE {condition}"]
        args: list[Any] = list(first)
        if where.states:
            sql.append(f"AND state IN ({', '.join('?' * len(where.states))})")
            args.extend(where.states)
        if where.kind:
            sql.append("AND kind = ?")
            args.append(where.kind)
        for key, value in where.labels:
            sql.append("AND json_extract(labels, ?) = ?")
            # Label keys are validated to [A-Za-z0-9._/-], so quoting them is enough.
            args.extend((f"$.{json.dumps(key)}", value))
        if where.created_after is not None:
            sql.append("AND create_time > ?")
            args.append(where.created_after)
        if where.created_before is not None:
            sql.append("AND create_time < ?")
            args.append(where.created_before)
        if after_id:
            sql.append("AND id < ?")
            args.append(after_id)
        sql.append("ORDER BY id DESC LIMIT ?")
        args.append(page_size + 1)
        query = " ".join(sql)

        def run(conn: sqlite3.Connection) -> Page:
            return rows.page_of(conn.execute(query, args).fetchall(), page_size, max_bytes)

        return await self._call(run)

    async def events(self, job_id: str, after_seq: int) -> list[job_pb2.JobEvent]:
        def run(conn: sqlite3.Connection) -> list[job_pb2.JobEvent]:
            found = conn.execute(
                "SELECT data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after_seq),
            ).fetchall()
            return [job_pb2.JobEvent.FromString(data) for (data,) in found]

        return await self._call(run)

    async def running(self) -> list[Unfinished]:
        running = (int(job_pb2.JOB_STATE_ASSIGNED), int(job_pb2.JOB_STATE_RUNNING))

        def run(conn: sqlite3.Connection) -> list[Unfinished]:
            found = conn.execute(
                "SELECT spec, status, coalesce(bytes, 0)"
                " FROM jobs LEFT JOIN job_inputs ON job_id = id"
                " WHERE state IN (?, ?) ORDER BY jobs.rowid",
                running,
            ).fetchall()
            return [
                Unfinished(rows.job_from_row(spec, status), size) for spec, status, size in found
            ]

        return await self._call(run)

    async def claim(
        self, owner: str, kind: str, tenant: str, limit: int, now: float, lease_until: float
    ) -> list[Unfinished]:
        def run(conn: sqlite3.Connection) -> list[Unfinished]:
            # The queue's index in order, skipping what is leased or not ready yet.
            ids = [
                job_id
                for (job_id,) in conn.execute(
                    "SELECT id FROM jobs INDEXED BY jobs_queue"
                    f" WHERE state = {_QUEUED} AND kind = ? AND tenant = ? AND ready_at <= ?"
                    " AND (lease_owner IS NULL OR lease_until < ?)"
                    " ORDER BY priority DESC, ready_at, id LIMIT ?",
                    (kind, tenant, now, now, limit),
                )
            ]
            return _lease(conn, ids, owner, lease_until)

        return await self._call(run)

    async def claim_job(
        self, owner: str, tenant: str, job_id: str, lease_until: float
    ) -> Unfinished | None:
        where, args = _of_tenant(tenant, "id = ?", job_id)

        def run(conn: sqlite3.Connection) -> Unfinished | None:
            now = time.time()
            found = conn.execute(
                f"SELECT id FROM jobs WHERE {where} AND state = ?"
                " AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)",
                (*args, _QUEUED, owner, now),
            ).fetchone()
            claimed = _lease(conn, [found[0]], owner, lease_until) if found else []
            return claimed[0] if claimed else None

        return await self._call(run)

    async def claim_due(
        self, owner: str, now: float, limit: int, lease_until: float
    ) -> list[Unfinished]:
        def run(conn: sqlite3.Connection) -> list[Unfinished]:
            ids = [
                job_id
                for (job_id,) in conn.execute(
                    "SELECT id FROM jobs INDEXED BY jobs_queue_due"
                    f" WHERE state = {_QUEUED} AND due_at IS NOT NULL AND due_at <= ?"
                    " AND (lease_owner IS NULL OR lease_until < ?) ORDER BY due_at LIMIT ?",
                    (now, now, limit),
                )
            ]
            return _lease(conn, ids, owner, lease_until)

        return await self._call(run)

    async def next_times(self, now: float) -> tuple[float | None, float | None]:
        def run(conn: sqlite3.Connection) -> tuple[float | None, float | None]:
            ready: float | None = None
            for kind, tenant in conn.execute(
                "SELECT kind, tenant FROM queue_depth WHERE queued > 0"
            ).fetchall():
                (first,) = conn.execute(
                    "SELECT min(ready_at) FROM jobs INDEXED BY jobs_queue_age"
                    f" WHERE state = {_QUEUED} AND kind = ? AND tenant = ? AND ready_at > ?",
                    (kind, tenant, now),
                ).fetchone()
                if first is not None and (ready is None or first < ready):
                    ready = first
            (due,) = conn.execute(
                "SELECT min(due_at) FROM jobs INDEXED BY jobs_queue_due"
                f" WHERE state = {_QUEUED} AND due_at IS NOT NULL AND lease_owner IS NULL",
            ).fetchone()
            return ready, due

        return await self._call(run)

    async def forget_leases(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner IS NOT NULL"
            )

        await self._call(run)

    def release(self, job_ids: Collection[str]) -> asyncio.Future[None]:
        wanted = [(job_id, _QUEUED) for job_id in job_ids]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND state = ?",
                wanted,
            )

        future = self._call(run)
        future.add_done_callback(_log_failure)
        return future

    async def queue_depths(self, now: float) -> list[QueueDepth]:
        def run(conn: sqlite3.Connection) -> list[QueueDepth]:
            depths = []
            for kind, tenant, queued in conn.execute(
                "SELECT kind, tenant, queued FROM queue_depth WHERE queued > 0"
                " ORDER BY kind, tenant"
            ).fetchall():
                (oldest,) = conn.execute(
                    "SELECT min(ready_at) FROM jobs INDEXED BY jobs_queue_age"
                    f" WHERE state = {_QUEUED} AND kind = ? AND tenant = ?",
                    (kind, tenant),
                ).fetchone()
                ready = oldest if oldest is not None and oldest <= now else None
                depths.append(QueueDepth(kind, tenant, queued, ready))
            return depths

        return await self._call(run)

    async def inputs(self, job_id: str) -> dict[str, bytes]:
        def run(conn: sqlite3.Connection) -> dict[str, bytes]:
            row = conn.execute("SELECT data FROM job_inputs WHERE job_id = ?", (job_id,)).fetchone()
            return {} if row is None else dict(job_pb2.JobSpec.FromString(row[0]).inputs)

        return await self._call(run)

    async def purge(self, now: float, limit: int) -> int:
        forget_before = now - self._retention

        def run(conn: sqlite3.Connection) -> int:
            gone = conn.execute(
                "SELECT id, tenant FROM jobs WHERE expire_time <= ? ORDER BY expire_time LIMIT ?",
                (now, limit),
            ).fetchall()
            ids = [(job_id,) for job_id, _ in gone]
            conn.executemany("DELETE FROM events WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM job_inputs WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM blob_refs WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM jobs WHERE id = ?", ids)
            conn.executemany(
                "INSERT OR REPLACE INTO expired_jobs VALUES (?, ?, ?)",
                [(job_id, tenant, now) for job_id, tenant in gone],
            )
            conn.execute(
                "DELETE FROM expired_jobs WHERE id IN"
                " (SELECT id FROM expired_jobs WHERE purge_time <= ? LIMIT ?)",
                (forget_before, limit),
            )
            conn.execute(
                "DELETE FROM blob_owners WHERE (blob_id, tenant, principal) IN"
                " (SELECT blob_id, tenant, principal FROM blob_owners"
                " WHERE upload_time <= ? LIMIT ?)",
                (forget_before, limit),
            )
            return len(gone)

        purged = await self._call(run)
        await self._call(_give_space_back, alone=True)
        return purged

    async def expired(self, tenant: str, job_id: str) -> bool:
        where, args = _of_tenant(tenant, "id = ?", job_id)

        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(f"SELECT 1 FROM expired_jobs WHERE {where}", args).fetchone()
            return row is not None

        return await self._call(run)

    async def referenced(self, blob_ids: Collection[str]) -> set[str]:
        wanted = list(blob_ids)

        def run(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(wanted), _MAX_PARAMS):
                chunk = wanted[start : start + _MAX_PARAMS]
                marks = ", ".join("?" * len(chunk))
                found.update(
                    blob_id
                    for (blob_id,) in conn.execute(
                        f"SELECT DISTINCT blob_id FROM blob_refs WHERE blob_id IN ({marks})", chunk
                    )
                )
            return found

        return await self._call(run)

    async def own_blob(
        self, blob_id: str, tenant: str, principal: str, now: float, *, fresh: bool, size: int = 0
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if fresh:
                conn.execute("DELETE FROM blob_owners WHERE blob_id = ?", (blob_id,))
            # An upsert, not INSERT OR REPLACE: a replaced row would count its bytes twice
            # in tenant_usage (REPLACE's delete fires no trigger).
            conn.execute(
                "INSERT INTO blob_owners (blob_id, tenant, principal, upload_time, bytes)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (blob_id, tenant, principal)"
                " DO UPDATE SET upload_time = excluded.upload_time",
                (blob_id, tenant, principal, now, size),
            )

        await self._call(run)

    async def forget_owners(self, blob_ids: Collection[str], before: float) -> None:
        wanted = list(blob_ids)

        def run(conn: sqlite3.Connection) -> None:
            for start in range(0, len(wanted), _MAX_PARAMS):
                chunk = wanted[start : start + _MAX_PARAMS]
                marks = ", ".join("?" * len(chunk))
                conn.execute(
                    f"DELETE FROM blob_owners WHERE blob_id IN ({marks}) AND upload_time < ?",
                    (*chunk, before),
                )

        if wanted:
            await self._call(run)

    async def usage(self, tenant: str) -> Usage:
        return await self._call(lambda conn: _usage(conn, tenant))

    async def blob_visible(self, tenant: str, blob_id: str) -> bool:
        if tenant == ANY_TENANT:
            return True

        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM blob_owners WHERE blob_id = ? AND tenant = ?"
                " UNION ALL SELECT 1 FROM blob_refs JOIN jobs ON jobs.id = blob_refs.job_id"
                " WHERE blob_refs.blob_id = ? AND jobs.tenant = ? LIMIT 1",
                (blob_id, tenant, blob_id, tenant),
            ).fetchone()
            return row is not None

        return await self._call(run)

    async def blob_uploaded_by(self, principal: str, blob_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM blob_owners WHERE blob_id = ? AND principal = ? LIMIT 1",
                (blob_id, principal),
            ).fetchone()
            return row is not None

        return await self._call(run)

    def declare_schema(self, schema: StoredSchema) -> asyncio.Future[None]:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO kind_schemas VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, tenant, digest) DO UPDATE SET last_seen = excluded.last_seen",
                (
                    schema.kind,
                    schema.tenant,
                    schema.digest,
                    schema.schema,
                    schema.first_seen,
                    schema.last_seen,
                ),
            )

        future = self._call(run)
        future.add_done_callback(_log_failure)
        return future

    async def schemas(self) -> list[StoredSchema]:
        def run(conn: sqlite3.Connection) -> list[StoredSchema]:
            found = conn.execute(
                "SELECT kind, tenant, digest, schema, first_seen, last_seen FROM kind_schemas"
            ).fetchall()
            return [StoredSchema(*row) for row in found]

        return await self._call(run)


def _place(
    job: job_pb2.Job, placement: Placement
) -> tuple[int, float, float | None, str | None, float | None]:
    """The queue columns of a job: (priority, ready_at, due_at, lease_owner, lease_until)."""
    return (
        job.spec.priority,
        placement.ready_at,
        placement.due_at,
        placement.owner or None,
        placement.lease_until if placement.owner else None,
    )


def _lease(
    conn: sqlite3.Connection, ids: Sequence[str], owner: str, lease_until: float
) -> list[Unfinished]:
    """Leases these jobs to `owner` and reads them back, in the order given."""
    found: dict[str, Unfinished] = {}
    for start in range(0, len(ids), _MAX_PARAMS):
        chunk = ids[start : start + _MAX_PARAMS]
        marks = ", ".join("?" * len(chunk))
        conn.execute(
            f"UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id IN ({marks})",
            (owner, lease_until, *chunk),
        )
        for job_id, spec, status, size, ready_at, inputs in conn.execute(
            "SELECT id, spec, status, coalesce(bytes, 0), ready_at,"
            f" iif(bytes <= {CLAIM_INPUT_BYTES}, data, NULL)"
            f" FROM jobs LEFT JOIN job_inputs ON job_id = id WHERE id IN ({marks})",
            chunk,
        ):
            found[job_id] = Unfinished(rows.job_from_row(spec, status), size, ready_at, inputs)
    return [found[job_id] for job_id in ids if job_id in found]


def _usage(conn: sqlite3.Connection, tenant: str) -> Usage:
    # Kept by triggers (migration 8) as jobs, inputs and blob owners come and go.
    row = conn.execute(
        "SELECT queued, stored_bytes FROM tenant_usage WHERE tenant = ?", (tenant,)
    ).fetchone()
    return Usage() if row is None else Usage(*row)


def _of_tenant(tenant: str, condition: str, *args: Any) -> tuple[str, tuple[Any, ...]]:
    """`condition` (with its `args`) narrowed to `tenant`'s rows, unless it is ANY_TENANT."""
    if tenant == ANY_TENANT:
        return condition, args
    return f"{condition} AND tenant = ?", (*args, tenant)


def _give_space_back(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA freelist_count").fetchone()[0]:
        # Python's execute() would free a single page; executescript() steps it to the end.
        conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_PAGES})")


def _unused(conn: sqlite3.Connection) -> None:
    raise AssertionError("a save is written from its row, not run")


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("store write failed: %s", future.exception())
