"""The job store a `--db` setting names: a PostgreSQL URL, or a SQLite file."""

from __future__ import annotations

import urllib.parse

from gateway.store import JobStore

PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: str) -> bool:
    return db.startswith(PG_SCHEMES)


def check_db(db: str) -> None:
    """Raises ValueError unless `db` names a SQLite file, ':memory:' or a PostgreSQL URL."""
    if not db:
        raise ValueError("db must name a SQLite file, ':memory:' or a postgresql:// URL")
    if is_postgres(db):
        try:
            urllib.parse.urlsplit(db).port  # noqa: B018  # parsing it is the check
        except ValueError as e:
            # The message shows no part of the URL: it may hold a password.
            raise ValueError(f"db is not a valid PostgreSQL URL: {e}") from None
    elif "://" in db:
        raise ValueError(
            "db: a URL must be postgresql:// or postgres:// (anything else is a SQLite file)"
        )


def shown(db: str) -> str:
    """`db` as errors and logs may show it: a URL without its password."""
    if not is_postgres(db):
        return db
    parts = urllib.parse.urlsplit(db)
    if parts.password is None:
        return db
    netloc = f"{parts.username}@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def open_store(db: str, *, retention: float) -> JobStore:
    """A PostgresStore for a postgresql:// or postgres:// URL, else a SqliteStore on the
    file `db` (':memory:' for one in memory). Not opened yet: call its `open`."""
    if is_postgres(db):
        # Imported here: a SQLite gateway runs without the PostgreSQL driver installed.
        from gateway.store.postgres import PostgresStore

        return PostgresStore(db, retention=retention)
    from gateway.store.sqlite import SqliteStore

    return SqliteStore(db, retention=retention)
