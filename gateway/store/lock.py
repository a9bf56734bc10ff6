"""One gateway per SQLite file: an exclusive lock on `DB.lock`, held while the gateway runs.
(Gateways share a PostgreSQL database: `gateway.mesh`.)

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

from gateway.store.open import is_postgres

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.1


class DatabaseLocked(OSError):
    """Another gateway holds the database: a startup error, one line (exit code 3)."""


class DatabaseLock:
    """The lock of the SQLite file `db` (none for ':memory:', nor for a PostgreSQL URL:
    gateways share that database, `gateway.mesh`)."""

    def __init__(self, db: str) -> None:
        self.path = "" if db == ":memory:" or is_postgres(db) else db + ".lock"
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
