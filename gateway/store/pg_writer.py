"""The PostgreSQL store's writer: one connection, one task, writes in group commits.

Writes are queued in call order. The writer takes whatever is waiting and commits it in
one transaction; consecutive saves become one statement. If the transaction fails, each
write runs again alone, so only the failing one fails. Futures are settled, and committed
events reported, in commit order.

While the server cannot be reached, a durable write (a job's state change, which the
gateway has already acted on) is kept, in order, and tried again with a growing pause
until the server is back; any other write (an insert: its caller can try again) fails at
once with `Unavailable`. Nothing a gateway did is lost to an outage, and barriers settle
only once everything before them is committed.
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
# Pauses between tries of durable writes while the server is down: from the first to the
# longest, doubling.
RETRY_FIRST = 0.1
RETRY_LONGEST = 2.0

Run = Callable[[asyncpg.Connection], Awaitable[tuple[Any, Sequence[job_pb2.JobEvent]]]]
"""A write: given the connection inside the transaction, its result and the events it
made durable (reported once the transaction commits)."""


@dataclass(frozen=True)
class SaveRow:
    """What `save` writes: a job's state, status, expiry and place, its event, its refs."""

    job_id: str
    tenant: str
    kind: str
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
    """Neither: a barrier, which writes nothing and settles once what came before did."""
    future: asyncio.Future[Any]
    tenants: Collection[str]
    """Whose counters it may change."""
    durable: bool
    """Kept and tried again while the server is down, rather than failed."""


class Fenced(Unavailable):
    """Other gateways took this one's jobs over (it could not reach the database for longer
    than its lease): nothing it writes is taken any more."""


# Channels of the notices gateways sharing a database send each other (LISTEN/NOTIFY),
# each payload "<sender>\n<body>": queues with jobs to claim ("kind\ttenant" lines), jobs
# with new events (ids, comma-separated), a cancel asked for ("job id\treason\tby").
QUEUED_CHANNEL = "jobmesh_queued"
EVENTS_CHANNEL = "jobmesh_events"
CANCEL_CHANNEL = "jobmesh_cancel"
# A notice's payload must stay under 8000 bytes; longer bodies are split.
_NOTICE_BYTES = 7000


def notices(channel: str, sender: str, items: Sequence[str], sep: str) -> list[tuple[str, str]]:
    """(channel, payload) of the notices that carry `items`, each under the size limit."""
    out: list[tuple[str, str]] = []
    body: list[str] = []
    size = 0
    for item in items:
        if body and size + len(item) + 1 > _NOTICE_BYTES:
            out.append((channel, f"{sender}\n{sep.join(body)}"))
            body, size = [], 0
        body.append(item)
        size += len(item) + 1
    if body:
        out.append((channel, f"{sender}\n{sep.join(body)}"))
    return out


async def notify(conn: asyncpg.Connection, sent: Sequence[tuple[str, str]]) -> None:
    """Sends notices within the transaction: they reach listeners once it commits."""
    if sent:
        await conn.execute(
            "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)",
            [c for c, _ in sent],
            [p for _, p in sent],
        )


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
        """The future of the last durable write queued: once it is done, every write is."""
        self.down: Unavailable | None = None
        """Why the server cannot be reached, while it cannot."""
        self.owner: str | None = None
        """The gateway's name once it shares the database (`PostgresStore.join`): then every
        transaction first checks that it is still a live member (`Fenced` if not), and
        sends notices of what other gateways care about."""
        self.on_fenced: Callable[[Fenced], None] = lambda error: None

    def submit(
        self,
        run: Run | None = None,
        save: SaveRow | None = None,
        tenants: Collection[str] = (),
        *,
        durable: bool = False,
    ) -> asyncio.Future[Any]:
        """Queues a write: `run`, or `save` (durable), or neither: a barrier (durable);
        `tenants`: whose counters `run` may change. A write that is not durable fails at
        once while the server is down."""
        if self._closing:
            raise RuntimeError("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        durable = durable or run is None
        if self.down is not None and (not durable or isinstance(self.down, Fenced)):
            future.set_exception(self.down)
            return future
        if save is not None:
            tenants = (save.tenant,)
        self._ops.append(_Op(run, save, future, tenants, durable))
        if durable:
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
        pause = RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                batch = [
                    self._ops.popleft() for _ in range(min(len(self._ops), MAX_OPS_PER_COMMIT))
                ]
                kept = await self._commit(batch)
                if not kept:
                    pause = RETRY_FIRST
                    continue
                # The server is down: the durable writes go back first, in order.
                self._ops.extendleft(reversed(kept))
                if self._closing:
                    self._give_up()
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_LONGEST)
            if self._closing:
                return

    def _give_up(self) -> None:
        """Fails what is left at close, the server still down."""
        error = self.down or Unavailable("job store unavailable")
        log.error("closing with %d writes the job store never took: %s", len(self._ops), error)
        while self._ops:
            op = self._ops.popleft()
            if not op.future.done():
                op.future.set_exception(error)

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

    async def _commit(self, batch: list[_Op]) -> list[_Op]:
        """Commits the batch; returns its durable writes not committed if the server was
        down, to be tried again (the others failed)."""
        try:
            conn = await self._connection()
            outcomes = await self._transaction(conn, batch)
        except Fenced as fenced:
            return self._fenced(batch, fenced)
        except Exception as exc:
            if self._lost(exc):
                return self._went_down(batch, self._failure(exc))
            if len(batch) == 1 and not isinstance(exc, asyncpg.TransactionRollbackError):
                outcomes = [self._failure(exc)]
            else:
                # One write failed (or lost to another gateway's): run each alone, so
                # only the failing one fails.
                outcomes = []
                for i, op in enumerate(batch):
                    outcome = await self._alone(op)
                    if isinstance(outcome[1], Fenced):
                        self._settle(batch[:i], outcomes)
                        return self._fenced(batch[i:], outcome[1])
                    if isinstance(outcome[1], Unavailable):
                        self._settle(batch[:i], outcomes)
                        return self._went_down(batch[i:], outcome)
                    outcomes.append(outcome)
        if self.down is not None:
            log.info("the job store is back")
            self.down = None
        self._settle(batch, outcomes)
        return []

    def _fenced(self, batch: list[_Op], fenced: Fenced) -> list[_Op]:
        """This gateway was taken over: nothing it writes is taken, now or later."""
        waiting = [*batch, *self._ops]
        self._ops.clear()
        self._settle(waiting, [(False, fenced, ())] * len(waiting))
        self.down = fenced  # what is submitted from now on fails at once
        self.on_fenced(fenced)
        return []

    def _went_down(
        self, batch: list[_Op], failure: tuple[bool, Any, Sequence[job_pb2.JobEvent]]
    ) -> list[_Op]:
        """The server went away before `batch` committed: what may fail fails (what is
        queued too, rather than wait for the server); the durable writes come back."""
        if self.down is None:
            log.error("the job store is down (%s); its writes wait for it", failure[1])
        self.down = failure[1]
        waiting = [op for op in self._ops if not op.durable]
        self._ops = collections.deque(op for op in self._ops if op.durable)
        failed = [op for op in batch if not op.durable] + waiting
        self._settle(failed, [failure] * len(failed))
        return [op for op in batch if op.durable]

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
        if isinstance(exc, Fenced):
            return False
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
        if self.owner is None and len(tenants) < 2 and all(op.run is None for op in batch):
            # Saves (and barriers) alone are one statement: its own transaction, one round
            # trip; barriers alone, none.
            rows = [op.save for op in batch if op.save is not None]
            if rows:
                await self._save_all(conn, rows)
            return [(True, None, _events(op.save)) for op in batch]
        results: list[tuple[bool, Any, Sequence[job_pb2.JobEvent]]] = []
        saves: list[SaveRow] = []
        async with conn.transaction():
            if self.owner is not None:
                dead = await conn.fetchval(
                    "SELECT dead FROM gateways WHERE name = $1 FOR SHARE", self.owner
                )
                if dead is not False:
                    raise Fenced(
                        f"gateway {self.owner} lost its jobs to the other gateways (it could "
                        "not reach the database for longer than its lease)"
                    )
            if len(tenants) > 1:
                # The triggers lock each tenant's counters as they go: taken here first,
                # in one order, two gateways' writes cannot deadlock on them.
                await conn.execute(pg_queries.LOCK_TENANTS, tenants)
            for op in batch:
                if op.run is None:
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
            if self.owner is not None:
                await notify(conn, self._notices(batch))
        return results

    def _notices(self, batch: list[_Op]) -> list[tuple[str, str]]:
        """What the saves of a batch tell other gateways: jobs with new events, queues with
        jobs put back in them."""
        assert self.owner is not None
        saves = [op.save for op in batch if op.save is not None]
        events = sorted({s.job_id for s in saves if s.event is not None})
        queued = sorted(
            {
                f"{s.kind}\t{s.tenant}"
                for s in saves
                if s.placement is not None
                and not s.placement.owner
                and s.state == job_pb2.JOB_STATE_QUEUED
            }
        )
        return [
            *notices(EVENTS_CHANNEL, self.owner, events, ","),
            *notices(QUEUED_CHANNEL, self.owner, queued, "\n"),
        ]

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
