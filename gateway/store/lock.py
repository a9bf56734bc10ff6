"""One gateway per database: an exclusive lock, held while the gateway runs.

SQLite: a lock on `DB.lock`. PostgreSQL: a session advisory lock, until several gateways
can share one database (the lease-based dispatch of issue #11 that is still to come).

Two gateways writing one file collide on event numbers and leave jobs stuck, so a gateway
locks its database before it opens it, and a second one fails at once, or waits for the
first to exit (a rolling restart). The lock is an advisory `flock` on a file beside the
database, not on the database itself: SQLite takes POSIX locks on it, and closing any
descriptor of a file drops a process's POSIX locks on it.

The kernel releases the lock when its process ends, SIGKILL included, so a lock is never
stale and nothing needs cleaning up after a crash; the file's content (who holds it) may be
left behind and is only read while the lock is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.1


class DatabaseLocked(OSError):
    """Another gateway holds the database: a startup error, one line (exit code 3)."""


class DatabaseLock:
    """The lock of the SQLite file `db` (none for ':memory:'); `database_lock` picks the
    lock a `--db` needs."""

    def __init__(self, db: str) -> None:
        self.path = "" if db == ":memory:" else db + ".lock"
        self._db = db
        self._fd: int | None = None

    async def acquire(self, wait: float = 0.0) -> None:
        """Takes the lock; DatabaseLocked naming the holder if it is still held after `wait`
        seconds (0: fail at once)."""
        if not self.path or self._fd is not None:
            return
        # Not inherited by child processes (PEP 446): embedded workers do not hold it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait
            said = False
            while not _try_lock(fd):
                holder = self.holder()
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait:g} s" if wait else ""
                    hint = "" if wait else "; stop it first, or wait for it with --wait-for-db"
                    raise DatabaseLocked(f"{self._db} is in use by {holder}{waited}{hint}")
                if not said:
                    log.info("waiting for %s to release %s", holder, self._db)
                    said = True
                await asyncio.sleep(POLL_INTERVAL)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_me()).encode() + b"\n", 0)
        except BaseException:
            os.close(fd)  # releases the lock if it was taken
            raise
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as the lock file says: 'the gateway pid N on HOST (since T)'."""
        try:
            with open(self.path, encoding="utf-8") as f:
                who = json.loads(f.read())
            return f"the gateway pid {who['pid']} on {who['host']} (since {who['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another gateway"  # it has locked the file but not yet written to it

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _me() -> dict[str, object]:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": since}


# The advisory lock's key: one per database, the same for every jobmesh gateway, apart
# from the migrations' ("jobmesh"): "jobmesh" + "G".
PG_LOCK_KEY = 0x6A6F626D65736847
_PG_HOLDER = """SELECT a.application_name, a.client_addr, a.backend_start
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
        SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid = $1 AND l.objid = $2"""


class PostgresLock:
    """One gateway per PostgreSQL database, as `DatabaseLock` is per SQLite file: a session
    advisory lock on a connection of its own, released when the gateway exits (or dies: the
    server drops the session). Its holder is named by the connection's application_name."""

    def __init__(self, dsn: str, where: str) -> None:
        self._dsn = dsn
        self._where = where
        """The database, as messages may show it (no password)."""
        self._conn: Any = None

    async def acquire(self, wait: float = 0.0) -> None:
        import asyncpg  # the PostgreSQL extra's driver, imported only for a PostgreSQL --db

        me = _me()
        name = f"gateway pid {me['pid']} on {me['host']}"[:63]
        conn = await asyncpg.connect(self._dsn, server_settings={"application_name": name})
        try:
            deadline = time.monotonic() + wait
            said = False
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PG_LOCK_KEY):
                holder = await self._holder(conn)
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait:g} s" if wait else ""
                    hint = "" if wait else "; stop it first, or wait for it with --wait-for-db"
                    raise DatabaseLocked(
                        f"{self._where} is in use by {holder}{waited}{hint} (one gateway per "
                        "database for now)"
                    )
                if not said:
                    log.info("waiting for %s to release %s", holder, self._where)
                    said = True
                await asyncio.sleep(POLL_INTERVAL)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    @staticmethod
    async def _holder(conn: Any) -> str:
        row = await conn.fetchrow(_PG_HOLDER, PG_LOCK_KEY >> 32, PG_LOCK_KEY & 0xFFFFFFFF)
        if row is None or not str(row[0]).startswith("gateway pid "):
            return "another gateway"
        since = row[2].astimezone().isoformat(timespec="seconds")
        return f"the {row[0]} (since {since}" + (f", from {row[1]})" if row[1] else ")")

    def release(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


def database_lock(db: str) -> DatabaseLock | PostgresLock:
    """The lock that keeps a second gateway off `db`."""
    from gateway.store.open import is_postgres, shown

    return PostgresLock(db, shown(db)) if is_postgres(db) else DatabaseLock(db)
