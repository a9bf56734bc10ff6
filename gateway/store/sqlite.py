"""The SQLite job store: one file in WAL mode, written by one thread in group commits.

Every operation runs on a single database thread. The thread takes whatever
operations are waiting and runs them in one transaction: many concurrent
Submits cost one WAL commit together. If one of them fails, the batch is
rolled back and each runs again alone, so only the failing one fails.
With `synchronous=NORMAL` a committed transaction survives the gateway being
killed; only a power loss may take the last commits back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway.jobs import ts_seconds
from gateway.store import Inserted, JobFilter, OnCommitted, Page
from jobmesh.convert import TERMINAL_STATES
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_OPS_PER_COMMIT = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    state INTEGER NOT NULL,
    idempotency_key TEXT,
    labels TEXT NOT NULL,
    create_time REAL NOT NULL,
    spec BLOB NOT NULL,
    status BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
    ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state) WHERE state < 4;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""


# A job's new state and status blob, and its event row if any: what `save` writes.
_SaveRow = tuple[str, int, bytes, tuple[str, int, bytes] | None]


class _Op:
    __slots__ = ("events", "fn", "future", "save")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any] | None,
        events: Sequence[job_pb2.JobEvent],
        save: _SaveRow | None = None,
    ) -> None:
        self.fn = fn
        self.future = future
        self.events = events
        self.save = save


def _status_blob(job: job_pb2.Job) -> bytes:
    status = job_pb2.Job()
    status.CopyFrom(job)
    status.ClearField("spec")
    return status.SerializeToString()


def _stored_event(event: job_pb2.JobEvent) -> bytes:
    # The result is kept once, with the job; replay attaches it again.
    if not event.HasField("result"):
        return event.SerializeToString()
    stored = job_pb2.JobEvent()
    stored.CopyFrom(event)
    stored.ClearField("result")
    return stored.SerializeToString()


def _job_from_row(spec: bytes, status: bytes, *, light: bool = False) -> job_pb2.Job:
    job = job_pb2.Job.FromString(status)
    job.spec.ParseFromString(spec)
    if light:
        job.spec.ClearField("inputs")
        job.result.ClearField("outputs")
    return job


class SqliteStore:
    """`JobStore` on a SQLite file."""

    def __init__(self, path: str) -> None:
        self._path = path
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
        conn.executescript(_SCHEMA)
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
        statuses: dict[str, tuple[int, bytes]] = {}
        events: list[tuple[str, int, bytes]] = []

        def flush() -> None:
            if events:
                conn.executemany("INSERT INTO events VALUES (?, ?, ?)", events)
                events.clear()
            if statuses:
                conn.executemany(
                    "UPDATE jobs SET state = ?, status = ? WHERE id = ?",
                    [(state, status, job_id) for job_id, (state, status) in statuses.items()],
                )
                statuses.clear()

        conn.execute("BEGIN")
        try:
            results: list[tuple[bool, Any]] = []
            for op in batch:
                if op.save is None:
                    flush()
                    results.append((True, op.fn(conn)))
                    continue
                job_id, state, status, event_row = op.save
                statuses[job_id] = (state, status)
                if event_row is not None:
                    events.append(event_row)
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
        save: _SaveRow | None = None,
    ) -> asyncio.Future[T]:
        if self._thread is None or self._loop is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put(_Op(fn, future, events, save))
        return future

    # --- JobStore -------------------------------------------------------------

    async def insert(
        self, jobs: Sequence[job_pb2.Job], events: Sequence[job_pb2.JobEvent]
    ) -> list[Inserted]:
        rows = [
            (
                job.id,
                job.tenant,
                job.spec.kind,
                job.state,
                job.spec.idempotency_key or None,
                json.dumps(dict(job.spec.labels), sort_keys=True),
                ts_seconds(job.create_time),
                job.spec.SerializeToString(),
                _status_blob(job),
            )
            for job in jobs
        ]

        def run(conn: sqlite3.Connection) -> tuple[list[Inserted], list[job_pb2.JobEvent]]:
            out: list[Inserted] = []
            fresh: list[job_pb2.JobEvent] = []
            for job, row, event in zip(jobs, rows, events, strict=True):
                if job.spec.idempotency_key:
                    found = conn.execute(
                        "SELECT spec, status FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                        (job.tenant, job.spec.idempotency_key),
                    ).fetchone()
                    if found is not None:
                        out.append(Inserted(_job_from_row(*found), existing=True))
                        continue
                conn.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                conn.execute(
                    "INSERT INTO events VALUES (?, ?, ?)",
                    (event.job_id, event.seq, _stored_event(event)),
                )
                out.append(Inserted(job))
                fresh.append(event)
            return out, fresh

        # Which events become durable is known only inside the transaction.
        inserted, fresh = await self._call(run)
        if fresh:
            self._on_committed(fresh)
        return inserted

    def save(self, job: job_pb2.Job, event: job_pb2.JobEvent | None) -> asyncio.Future[None]:
        event_row = (event.job_id, event.seq, _stored_event(event)) if event else None
        row: _SaveRow = (job.id, job.state, _status_blob(job), event_row)
        future = self._call(_unused, (event,) if event else (), save=row)
        # Callers often do not wait for a save; a failure must still be seen.
        future.add_done_callback(_log_failure)
        return future

    def barrier(self) -> asyncio.Future[None]:
        # Operations run in order, so a no-op one finishes after all earlier writes.
        return self._call(lambda conn: None)

    async def get(self, tenant: str, job_id: str) -> job_pb2.Job | None:
        def run(conn: sqlite3.Connection) -> job_pb2.Job | None:
            row = conn.execute(
                "SELECT spec, status FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)
            ).fetchone()
            return None if row is None else _job_from_row(*row)

        return await self._call(run)

    async def list_jobs(self, where: JobFilter, page_size: int, after_id: str) -> Page:
        sql = ["SELECT spec, status, id FROM jobs WHERE tenant = ?"]
        args: list[Any] = [where.tenant]
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
            rows = conn.execute(query, args).fetchall()
            page = Page(
                [_job_from_row(spec, status, light=True) for spec, status, _ in rows[:page_size]]
            )
            if len(rows) > page_size:
                page.last_id = rows[page_size - 1][2]
            return page

        return await self._call(run)

    async def events(self, job_id: str, after_seq: int) -> list[job_pb2.JobEvent]:
        def run(conn: sqlite3.Connection) -> list[job_pb2.JobEvent]:
            rows = conn.execute(
                "SELECT data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after_seq),
            ).fetchall()
            return [job_pb2.JobEvent.FromString(data) for (data,) in rows]

        return await self._call(run)

    async def unfinished(self) -> list[job_pb2.Job]:
        terminal = tuple(TERMINAL_STATES)
        marks = ", ".join("?" * len(terminal))

        def run(conn: sqlite3.Connection) -> list[job_pb2.Job]:
            rows = conn.execute(
                f"SELECT spec, status FROM jobs WHERE state NOT IN ({marks}) ORDER BY rowid",
                terminal,
            ).fetchall()
            return [_job_from_row(*row) for row in rows]

        return await self._call(run)


def _unused(conn: sqlite3.Connection) -> None:
    raise AssertionError("a save is written from its row, not run")


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("store write failed: %s", future.exception())
