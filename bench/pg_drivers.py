"""asyncpg against psycopg 3 (async) on the PostgreSQL store's hot statements, as JSON:
operations per second for each driver and operation. Never part of the test run.

It starts no server: point it at one with --dsn. It works in a schema of its own
(`jobmesh_bench`, created with the store's schema and dropped at the end), so any
database will do. The statements are the store's own (`gateway.store.pg_queries`).

Usage: python bench/pg_drivers.py --dsn postgresql://postgres@127.0.0.1:5433/postgres
    [--seconds 2] [--drivers asyncpg,psycopg]
(psycopg is not a jobmesh dependency: pip install 'psycopg[binary]' psycopg_pool first.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The repo root is on the path only now.
from gateway.jobs import S, new_job_id, next_event, now  # noqa: E402
from gateway.store import Placement, pg_migrations, pg_queries, rows  # noqa: E402
from jobmesh.v1 import job_pb2  # noqa: E402

SCHEMA = "jobmesh_bench"
BATCH = 100
CLAIM = 10
CONCURRENCY = 16
POOL = 4


def new_job(kind: str = "bench") -> job_pb2.Job:
    job = job_pb2.Job(
        id=new_job_id(),
        tenant="bench",
        spec=job_pb2.JobSpec(kind=kind, inputs={"in": b"x" * 1024}),
        state=S.JOB_STATE_QUEUED,
        attempt=1,
    )
    job.create_time.CopyFrom(now())
    return job


def new_batch(kind: str = "bench") -> list[Any]:
    jobs = [new_job(kind) for _ in range(BATCH)]
    events = [next_event(j) for j in jobs]
    placements = [Placement(ready_at=time.time()) for _ in jobs]
    return pg_queries.NewJobs.of(jobs, events, placements).args


def save_args(job: job_pb2.Job) -> list[Any]:
    job.state = S.JOB_STATE_RUNNING
    job.progress = (job.progress + 0.01) % 1
    event = next_event(job, job_pb2.JOB_EVENT_TYPE_PROGRESS)
    saves = pg_queries.Saves()
    saves.add(
        job.id,
        job.state,
        rows.status_blob(job),
        None,
        job.spec.priority,
        None,
        (event.job_id, event.seq, rows.stored_event(event)),
        (),
    )
    return saves.args()


class Driver:
    """One driver's way to run a statement: on one connection, and on a pool."""

    name = ""

    async def open(self, dsn: str) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, sql: str, args: Sequence[Any]) -> None: ...

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Any]: ...

    async def in_transaction(self, steps: Sequence[tuple[str, Sequence[Any]]]) -> None: ...

    async def pool_fetch(self, sql: str, args: Sequence[Any]) -> list[Any]: ...


class Asyncpg(Driver):
    name = "asyncpg"

    async def open(self, dsn: str) -> None:
        import asyncpg

        settings = {"search_path": SCHEMA}
        self.conn = await asyncpg.connect(dsn, server_settings=settings)
        self.pool = await asyncpg.create_pool(
            dsn, min_size=POOL, max_size=POOL, server_settings=settings
        )

    async def close(self) -> None:
        await self.conn.close()
        await self.pool.close()

    async def execute(self, sql: str, args: Sequence[Any]) -> None:
        await self.conn.execute(sql, *args)

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        return list(await self.conn.fetch(sql, *args))

    async def in_transaction(self, steps: Sequence[tuple[str, Sequence[Any]]]) -> None:
        async with self.conn.transaction():
            for sql, args in steps:
                await self.conn.fetch(sql, *args)

    async def pool_fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        return list(await self.pool.fetch(sql, *args))


def _named(sql: str) -> str:
    """$1-style placeholders as psycopg's %(p1)s, so that one may repeat."""
    return re.sub(r"\$(\d+)", r"%(p\1)s", sql.replace("%", "%%"))


def _params(args: Sequence[Any]) -> dict[str, Any]:
    return {f"p{i}": value for i, value in enumerate(args, 1)}


class Psycopg(Driver):
    name = "psycopg"

    async def open(self, dsn: str) -> None:
        import psycopg
        import psycopg_pool

        options = f"-c search_path={SCHEMA}"
        self.conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, options=options, prepare_threshold=0
        )
        self.pool = psycopg_pool.AsyncConnectionPool(
            dsn,
            min_size=POOL,
            max_size=POOL,
            kwargs={"autocommit": True, "options": options, "prepare_threshold": 0},
            open=False,
        )
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.conn.close()
        await self.pool.close()

    async def execute(self, sql: str, args: Sequence[Any]) -> None:
        await self.conn.execute(_named(sql), _params(args))

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        cur = await self.conn.execute(_named(sql), _params(args), binary=True)
        return await cur.fetchall()

    async def in_transaction(self, steps: Sequence[tuple[str, Sequence[Any]]]) -> None:
        async with self.conn.transaction():
            for sql, args in steps:
                await self.conn.execute(_named(sql), _params(args), binary=True)

    async def pool_fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(_named(sql), _params(args), binary=True)
            return await cur.fetchall()


async def rate(
    seconds: float,
    op: Callable[[Any], Awaitable[object]],
    prepare: Callable[[], Any] = lambda: None,
    per_call: int = 1,
) -> float:
    """Operations per second of `op` run back to back for about `seconds` (of its own
    time: making its argument with `prepare` is not counted)."""
    for _ in range(3):
        await op(prepare())  # warm: statements prepared, pool connections made
    calls = 0
    spent = 0.0
    while spent < seconds:
        arg = prepare()
        start = time.perf_counter()
        await op(arg)
        spent += time.perf_counter() - start
        calls += 1
    return round(calls * per_call / spent, 1)


async def measure(driver: Driver, dsn: str, seconds: float) -> dict[str, float]:
    await driver.open(dsn)
    try:
        kind = f"bench-{driver.name}"
        results: dict[str, float] = {}
        results["insert_batch_of_100"] = await rate(
            seconds,
            lambda batch: driver.in_transaction(
                [(pg_queries.LOCK_USAGE, ["bench", []]), (pg_queries.INSERT_JOBS, batch)]
            ),
            lambda: new_batch(kind),
        )
        job = new_job(kind)
        await driver.execute(
            pg_queries.INSERT_JOBS,
            pg_queries.NewJobs.of([job], [next_event(job)], [Placement(ready_at=time.time())]).args,
        )
        results["save_with_event"] = await rate(
            seconds,
            lambda args: driver.execute(pg_queries.SAVE_JOBS, args),
            lambda: save_args(job),
        )
        results["get"] = await rate(seconds, lambda _: driver.fetch(pg_queries.GET, [job.id, None]))
        # The job has hundreds of events by now; a Watch reads those after the last seen.
        after = max(job.event_seq - 20, 0)
        results["events_last_20"] = await rate(
            seconds, lambda _: driver.fetch(pg_queries.EVENTS, [job.id, after])
        )

        async def claim(_: None) -> None:
            # Leases that end at once: the next claim takes the queue's head again.
            at = time.time()
            found = await driver.fetch(pg_queries.CLAIM, ["bench", kind, "bench", CLAIM, at, at])
            assert len(found) == CLAIM, found

        results["claim_10"] = await rate(seconds, claim)

        async def gets(_: None) -> None:
            await asyncio.gather(
                *(driver.pool_fetch(pg_queries.GET, [job.id, None]) for _ in range(CONCURRENCY))
            )

        results[f"get_x{CONCURRENCY}_on_pool_of_{POOL}"] = await rate(
            seconds, gets, per_call=CONCURRENCY
        )
        return results
    finally:
        await driver.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="a PostgreSQL URL, e.g. postgresql://...")
    parser.add_argument("--seconds", type=float, default=2.0, help="per driver and operation")
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    opts = parser.parse_args()

    import asyncpg

    admin = await asyncpg.connect(opts.dsn)
    try:
        await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await admin.execute(f"CREATE SCHEMA {SCHEMA}")
        await admin.execute(f"SET search_path = {SCHEMA}")
        for migration in pg_migrations.MIGRATIONS:
            for statement in migration.statements:
                await admin.execute(statement)
        drivers: dict[str, Driver] = {"asyncpg": Asyncpg(), "psycopg": Psycopg()}
        out: dict[str, Any] = {"unit": "operations per second", "seconds": opts.seconds}
        for name in opts.drivers.split(","):
            try:
                out[name] = await measure(drivers[name], opts.dsn, opts.seconds)
            except ImportError as e:  # psycopg is not among jobmesh's dependencies
                out[name] = f"not installed ({e.name}): pip install 'psycopg[binary]' psycopg_pool"
        print(json.dumps(out, indent=2))
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
