"""The PostgreSQL store's writer: one connection, one task, writes in group commits.

Writes are queued in call order. The writer takes whatever is waiting and commits it in
one transaction; consecutive saves become one statement. If the transaction fails, each
write runs again alone, so only the failing one fails. Futures are settled, and committed
events reported, in commit order. While the server cannot be reached every write fails
with `Unavailable`; the next write connects again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.store import OnCommitted, Placement, pg_queries
from jobmesh.errors import Unavailable
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)

MAX_OPS_PER_COMMIT = 512
CLOSE_TIMEOUT = 5.0
# Tries of a write that lost a deadlock or a serialization conflict to another gateway.
_CONFLICT_TRIES = 3

Run = Callable[[asyncpg.Connection], Awaitable[tuple[Any, Sequence[job_pb2.JobEvent]]]]
"""A write: given the connection inside the transaction, its result and the events it
made durable (reported once the transaction commits)."""


@dataclass(frozen=True)
class SaveRow:
    """What `save` writes: a job's state, status, expiry and place, its event, its refs."""

    job_id: str
    tenant: str
    state: int
    status: bytes
    expire_time: float | None
    priority: int
    placement: Placement | None
    event: job_pb2.JobEvent | None
    stored_event: bytes | None
    blob_ids: Collection[str]


@dataclass(frozen=True)
class _Op:
    run: Run | None
    save: SaveRow | None
    future: asyncio.Future[Any]
    tenants: Collection[str]
    """Whose counters it may change."""


def is_down(exc: BaseException) -> bool:
    """Whether `exc` says the server cannot be reached (or went away), not that the
    statement was wrong."""
    return isinstance(
        exc,
        OSError  # refused, reset, unreachable, timed out (TimeoutError is one)
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError  # shutting down, starting up
        | asyncpg.exceptions.TooManyConnectionsError,
    )


def unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"job store unavailable: {type(exc).__name__}: {exc}")


Connect = Callable[[], Awaitable[asyncpg.Connection]]


class GroupWriter:
    """Commits queued writes in order, many per transaction."""

    def __init__(self, connect: Connect, on_committed: OnCommitted) -> None:
        self._connect = connect
        self._on_committed = on_committed
        self._ops: collections.deque[_Op] = collections.deque()
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._closing = False
        self._task = asyncio.create_task(self._loop(), name="jobmesh-pg-writer")
        self.tail: asyncio.Future[Any] | None = None
        """The future of the last write queued: once it is done, every write is."""

    def submit(
        self, run: Run | None = None, save: SaveRow | None = None, tenants: Collection[str] = ()
    ) -> asyncio.Future[Any]:
        """Queues a write: `run`, or `save`; `tenants`: whose counters `run` may change."""
        if self._closing:
            raise RuntimeError("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if save is not None:
            tenants = (save.tenant,)
        self._ops.append(_Op(run, save, future, tenants))
        self.tail = future
        self._wake.set()
        return future

    async def close(self) -> None:
        """Commits what is queued, then closes the connection."""
        self._closing = True
        self._wake.set()
        await self._task
        if self._conn is not None:
            try:
                await self._conn.close(timeout=CLOSE_TIMEOUT)
            except Exception:  # a server gone: nothing to say goodbye to
                self._conn.terminate()
            self._conn = None

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                batch = [
                    self._ops.popleft() for _ in range(min(len(self._ops), MAX_OPS_PER_COMMIT))
                ]
                await self._commit(batch)
            if self._closing:
                return

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and self._conn.is_closed():
            self._conn = None
        if self._conn is None:
            try:
                self._conn = await self._connect()
            except Exception as exc:
                if is_down(exc):
                    raise unavailable(exc) from exc
                raise
        return self._conn

    async def _commit(self, batch: list[_Op]) -> None:
        try:
            conn = await self._connection()
            outcomes = await self._transaction(conn, batch)
        except Exception as exc:
            if self._lost(exc):
                outcomes = [self._failure(exc)] * len(batch)
            elif len(batch) == 1 and not isinstance(exc, asyncpg.TransactionRollbackError):
                outcomes = [self._failure(exc)]
            else:
                # One write failed (or lost to another gateway's): run each alone, so
                # only the failing one fails.
                outcomes = []
                for op in batch:
                    outcome = await self._alone(op)
                    outcomes.append(outcome)
                    if isinstance(outcome[1], Unavailable):
                        outcomes.extend([outcome] * (len(batch) - len(outcomes)))
                        break
        self._settle(batch, outcomes)

    async def _alone(self, op: _Op) -> tuple[bool, Any, Sequence[job_pb2.JobEvent]]:
        for attempt in range(_CONFLICT_TRIES):
            try:
                conn = await self._connection()
                return (await self._transaction(conn, [op]))[0]
            except asyncpg.TransactionRollbackError as exc:
                if attempt == _CONFLICT_TRIES - 1:
                    return self._failure(exc)
            except Exception as exc:
                return self._failure(exc)
        raise AssertionError("unreachable")

    def _lost(self, exc: BaseException) -> bool:
        """Whether the connection is gone (then so is the transaction, whatever failed)."""
        if isinstance(exc, Unavailable) or is_down(exc):
            return True
        return self._conn is not None and self._conn.is_closed()

    def _failure(self, exc: Exception) -> tuple[bool, Any, Sequence[job_pb2.JobEvent]]:
        if self._lost(exc):
            if self._conn is not None and not self._conn.is_closed():
                self._conn.terminate()
            self._conn = None
            if not isinstance(exc, Unavailable):
                exc = unavailable(exc)
        return False, exc, ()

    async def _transaction(
        self, conn: asyncpg.Connection, batch: list[_Op]
    ) -> list[tuple[bool, Any, Sequence[job_pb2.JobEvent]]]:
        tenants = sorted({tenant for op in batch for tenant in op.tenants})
        if len(tenants) < 2 and all(op.save is not None for op in batch):
            # Saves alone are one statement: its own transaction, one round trip.
            await self._save_all(conn, [op.save for op in batch if op.save is not None])
            return [(True, None, _events(op.save)) for op in batch]
        results: list[tuple[bool, Any, Sequence[job_pb2.JobEvent]]] = []
        saves: list[SaveRow] = []
        async with conn.transaction():
            if len(tenants) > 1:
                # The triggers lock each tenant's counters as they go: taken here first,
                # in one order, two gateways' writes cannot deadlock on them.
                await conn.execute(pg_queries.LOCK_TENANTS, tenants)
            for op in batch:
                if op.save is not None:
                    saves.append(op.save)
                    results.append((True, None, _events(op.save)))
                    continue
                if saves:
                    await self._save_all(conn, saves)
                    saves = []
                assert op.run is not None
                value, events = await op.run(conn)
                results.append((True, value, events))
            if saves:
                await self._save_all(conn, saves)
        return results

    @staticmethod
    async def _save_all(conn: asyncpg.Connection, rows: list[SaveRow]) -> None:
        saves = pg_queries.Saves()
        for row in rows:
            saves.add(
                row.job_id,
                row.state,
                row.status,
                row.expire_time,
                row.priority,
                row.placement,
                None
                if row.event is None or row.stored_event is None
                else (row.event.job_id, row.event.seq, row.stored_event),
                row.blob_ids,
            )
        await conn.execute(pg_queries.SAVE_JOBS, *saves.args())

    def _settle(
        self, batch: list[_Op], outcomes: list[tuple[bool, Any, Sequence[job_pb2.JobEvent]]]
    ) -> None:
        committed: list[job_pb2.JobEvent] = []
        for op, (ok, value, events) in zip(batch, outcomes, strict=True):
            if ok:
                committed.extend(events)
                if not op.future.done():
                    op.future.set_result(value)
            elif not op.future.done():
                op.future.set_exception(value)
        if committed:
            try:
                self._on_committed(committed)
            except Exception:
                log.exception("on_committed failed")


def _events(save: SaveRow | None) -> Sequence[job_pb2.JobEvent]:
    return () if save is None or save.event is None else (save.event,)
