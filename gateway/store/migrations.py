"""The SQLite schema's versions: numbered migrations, applied in order when the store opens.

`PRAGMA user_version` is the number of the last migration applied. A migration runs in
one transaction with the bump of the version, so a crash leaves the file at one version
or the next, never between. Files written before versions existed have version 0 and
the tables of version 1 already; migration 1 creates them only where they are missing.
A file with a version this code does not know is refused, not guessed at.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gateway.jobs import ts_seconds
from gateway.store import legacy, rows
from jobmesh.convert import TERMINAL_STATES
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)


class SchemaTooNew(Exception):
    """The database was written by a newer jobmesh than this one."""


@dataclass(frozen=True)
class Migration:
    version: int
    summary: str
    apply: Callable[[sqlite3.Connection, float], None]
    """Makes the change, given the store's default retention in seconds."""
    transaction: bool = True
    """False for what SQLite cannot do in a transaction (VACUUM); it must be idempotent."""


def _execute(conn: sqlite3.Connection, *statements: str) -> None:
    # Not executescript: it would commit the migration's transaction first.
    for statement in statements:
        conn.execute(statement)


def _jobs(conn: sqlite3.Connection, where: str = "") -> Iterator[tuple[int, bytes, bytes]]:
    """(rowid, spec, status) of each job, read one at a time: specs may be large."""
    rowids = [rowid for (rowid,) in conn.execute(f"SELECT rowid FROM jobs {where} ORDER BY rowid")]
    for rowid in rowids:
        spec, status = conn.execute(
            "SELECT spec, status FROM jobs WHERE rowid = ?", (rowid,)
        ).fetchone()
        yield rowid, spec, status


def _v1_jobs_and_events(conn: sqlite3.Connection, retention: float) -> None:
    _execute(
        conn,
        """CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            kind TEXT NOT NULL,
            state INTEGER NOT NULL,
            idempotency_key TEXT,
            labels TEXT NOT NULL,
            create_time REAL NOT NULL,
            spec BLOB NOT NULL,
            status BLOB NOT NULL
        )""",
        """CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
            ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL""",
        "CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state) WHERE state < 4",
        """CREATE TABLE IF NOT EXISTS events (
            job_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (job_id, seq)
        ) WITHOUT ROWID""",
    )


def _v2_payloads_apart(conn: sqlite3.Connection, retention: float) -> None:
    _execute(
        conn,
        # `bytes` comes before `data` so that reading it leaves the payload on disk.
        """CREATE TABLE job_inputs (
            job_id TEXT PRIMARY KEY,
            bytes INTEGER NOT NULL,
            data BLOB NOT NULL
        )""",
        """CREATE TABLE blob_refs (
            blob_id TEXT NOT NULL,
            job_id TEXT NOT NULL,
            PRIMARY KEY (blob_id, job_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX blob_refs_job ON blob_refs (job_id)",
    )
    for rowid, spec_data, status_data in _jobs(conn):
        job = rows.job_from_row(spec_data, status_data)
        inputs = rows.inputs_row(job.spec)
        if inputs is not None:
            conn.execute("INSERT INTO job_inputs VALUES (?, ?, ?)", (job.id, *inputs))
            conn.execute(
                "UPDATE jobs SET spec = ? WHERE rowid = ?", (rows.spec_blob(job.spec), rowid)
            )
        conn.executemany(
            "INSERT OR IGNORE INTO blob_refs VALUES (?, ?)",
            [
                (blob_id, job.id)
                for blob_id in rows.input_blob_ids(job.spec) | rows.output_blob_ids(job)
            ],
        )


def _v3_retention(conn: sqlite3.Connection, retention: float) -> None:
    _execute(
        conn,
        "ALTER TABLE jobs ADD COLUMN expire_time REAL",
        "CREATE INDEX jobs_expiry ON jobs (expire_time) WHERE expire_time IS NOT NULL",
        # What is left of a purged job: enough to tell "expired" from "never existed".
        """CREATE TABLE expired_jobs (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            purge_time REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX expired_jobs_time ON expired_jobs (purge_time)",
    )
    terminal = ", ".join(str(int(state)) for state in sorted(TERMINAL_STATES))
    for rowid, spec_data, status_data in _jobs(conn, f"WHERE state IN ({terminal})"):
        expire = rows.expire_time(rows.job_from_row(spec_data, status_data), retention)
        conn.execute("UPDATE jobs SET expire_time = ? WHERE rowid = ?", (expire, rowid))


def _v4_incremental_vacuum(conn: sqlite3.Connection, retention: float) -> None:
    # Purges then give space back a bounded number of pages at a time. An existing file
    # changes mode only by being rewritten whole; a new one is empty here, so that is quick.
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")


def _v5_params_as_json(conn: sqlite3.Connection, retention: float) -> None:
    # Params and result metadata were Structs; now they are JSON text (see legacy.py).
    for rowid, spec_data, status_data in _jobs(conn):
        spec, status = _legacy(legacy.spec, spec_data), _legacy(legacy.status, status_data)
        if spec != spec_data or status != status_data:
            conn.execute(
                "UPDATE jobs SET spec = ?, status = ? WHERE rowid = ?", (spec, status, rowid)
            )
    # Events keep a result only if an old version stored it with them; read a page at a
    # time, by key, as there may be many.
    after: tuple[str, int] = ("", -1)
    while True:
        page = conn.execute(
            "SELECT job_id, seq, data FROM events WHERE (job_id, seq) > (?, ?) "
            "ORDER BY job_id, seq LIMIT 1000",
            after,
        ).fetchall()
        if not page:
            return
        for job_id, seq, data in page:
            rewritten = _legacy(legacy.event, data)
            if rewritten != data:
                conn.execute(
                    "UPDATE events SET data = ? WHERE job_id = ? AND seq = ?",
                    (rewritten, job_id, seq),
                )
        after = page[-1][0], page[-1][1]


def _v6_blob_owners(conn: sqlite3.Connection, retention: float) -> None:
    # Who uploaded each blob: a tenant sees the blobs it uploaded and those its jobs
    # reference (blob_refs), no others. Blobs uploaded before have no owner; the SDK
    # references what it uploads at once, so at most an upload in flight is to redo.
    _execute(
        conn,
        """CREATE TABLE blob_owners (
            blob_id TEXT NOT NULL,
            tenant TEXT NOT NULL,
            principal TEXT NOT NULL,
            upload_time REAL NOT NULL,
            PRIMARY KEY (blob_id, tenant, principal)
        ) WITHOUT ROWID""",
        "CREATE INDEX blob_owners_time ON blob_owners (upload_time)",
    )


def _v7_kind_schemas(conn: sqlite3.Connection, retention: float) -> None:
    # Each version of a kind's params schema that workers declared, so that a restarted
    # gateway checks params at Submit before any worker attaches again.
    _execute(
        conn,
        """CREATE TABLE kind_schemas (
            kind TEXT NOT NULL,
            tenant TEXT NOT NULL,
            digest TEXT NOT NULL,
            schema BLOB NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            PRIMARY KEY (kind, tenant, digest)
        ) WITHOUT ROWID""",
    )


def _v8_tenant_usage(conn: sqlite3.Connection, retention: float) -> None:
    # Each tenant's queued jobs and stored bytes, for its quotas: counted store-wide (as
    # gateways sharing the store see it) and kept by triggers, so a Submit reads one row.
    # Stored bytes: inline inputs of its jobs, and each blob it owns once at its size
    # (blobs owned before this version count 0 bytes: their size is on disk only).
    queued = int(job_pb2.JOB_STATE_QUEUED)

    def add(column: str, tenant: str, amount: str, where: str = "") -> str:
        # An upsert from a SELECT needs a WHERE to parse: "WHERE true" at least.
        return (
            f"INSERT INTO tenant_usage (tenant, {column}) SELECT {tenant}, {amount}"
            f" {where or 'WHERE true'}"
            f" ON CONFLICT (tenant) DO UPDATE SET {column} = {column} + excluded.{column};"
        )

    _execute(
        conn,
        """CREATE TABLE tenant_usage (
            tenant TEXT PRIMARY KEY,
            queued INTEGER NOT NULL DEFAULT 0,
            stored_bytes INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        "ALTER TABLE blob_owners ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
        f"""CREATE TRIGGER usage_job_added AFTER INSERT ON jobs WHEN new.state = {queued}
        BEGIN {add("queued", "new.tenant", "1")} END""",
        f"""CREATE TRIGGER usage_job_moved AFTER UPDATE OF state ON jobs
        WHEN (old.state = {queued}) != (new.state = {queued})
        BEGIN {add("queued", "new.tenant", f"iif(new.state = {queued}, 1, -1)")} END""",
        f"""CREATE TRIGGER usage_job_deleted AFTER DELETE ON jobs WHEN old.state = {queued}
        BEGIN UPDATE tenant_usage SET queued = queued - 1 WHERE tenant = old.tenant; END""",
        f"""CREATE TRIGGER usage_inputs_added AFTER INSERT ON job_inputs
        BEGIN {add("stored_bytes", "tenant", "new.bytes", "FROM jobs WHERE id = new.job_id")}
        END""",
        """CREATE TRIGGER usage_inputs_deleted AFTER DELETE ON job_inputs
        BEGIN UPDATE tenant_usage SET stored_bytes = stored_bytes - old.bytes
            WHERE tenant = (SELECT tenant FROM jobs WHERE id = old.job_id); END""",
        # A blob counts once per tenant, however many of its principals uploaded it.
        f"""CREATE TRIGGER usage_blob_owned AFTER INSERT ON blob_owners
        WHEN NOT EXISTS (SELECT 1 FROM blob_owners WHERE blob_id = new.blob_id
            AND tenant = new.tenant AND principal != new.principal)
        BEGIN {add("stored_bytes", "new.tenant", "new.bytes")} END""",
        """CREATE TRIGGER usage_blob_disowned AFTER DELETE ON blob_owners
        WHEN NOT EXISTS (SELECT 1 FROM blob_owners WHERE blob_id = old.blob_id
            AND tenant = old.tenant)
        BEGIN UPDATE tenant_usage SET stored_bytes = stored_bytes - old.bytes
            WHERE tenant = old.tenant; END""",
        add("queued", "tenant", "count(*)", f"FROM jobs WHERE state = {queued} GROUP BY tenant"),
        add(
            "stored_bytes",
            "jobs.tenant",
            "sum(job_inputs.bytes)",
            "FROM job_inputs JOIN jobs ON jobs.id = job_inputs.job_id WHERE true"
            " GROUP BY jobs.tenant",
        ),
    )


def _v9_queue(conn: sqlite3.Connection, retention: float) -> None:
    # Queued jobs stay in the store and gateways claim them (`JobStore.claim`): each queued
    # job's place (priority, ready_at) and when it falls due, who holds it leased, and each
    # queue's length kept by triggers, as tenant_usage is.
    queued = int(job_pb2.JOB_STATE_QUEUED)

    def count(kind: str, tenant: str, amount: str, where: str = "WHERE true") -> str:
        return (
            f"INSERT INTO queue_depth (kind, tenant, queued) SELECT {kind}, {tenant}, {amount}"
            f" {where} ON CONFLICT (kind, tenant) DO UPDATE SET queued = queued + excluded.queued;"
        )

    _execute(
        conn,
        "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN ready_at REAL",
        "ALTER TABLE jobs ADD COLUMN due_at REAL",
        "ALTER TABLE jobs ADD COLUMN lease_owner TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_until REAL",
        f"""CREATE INDEX jobs_queue ON jobs (kind, tenant, priority DESC, ready_at, id)
            WHERE state = {queued}""",
        f"CREATE INDEX jobs_queue_age ON jobs (kind, tenant, ready_at) WHERE state = {queued}",
        "CREATE INDEX jobs_leased ON jobs (lease_owner) WHERE lease_owner IS NOT NULL",
        f"""CREATE INDEX jobs_queue_due ON jobs (due_at)
            WHERE state = {queued} AND due_at IS NOT NULL""",
        """CREATE TABLE queue_depth (
            kind TEXT NOT NULL,
            tenant TEXT NOT NULL,
            queued INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (kind, tenant)
        ) WITHOUT ROWID""",
        f"""CREATE TRIGGER queue_job_added AFTER INSERT ON jobs WHEN new.state = {queued}
        BEGIN {count("new.kind", "new.tenant", "1")} END""",
        f"""CREATE TRIGGER queue_job_moved AFTER UPDATE OF state ON jobs
        WHEN (old.state = {queued}) != (new.state = {queued})
        BEGIN {count("new.kind", "new.tenant", f"iif(new.state = {queued}, 1, -1)")} END""",
        f"""CREATE TRIGGER queue_job_deleted AFTER DELETE ON jobs WHEN old.state = {queued}
        BEGIN UPDATE queue_depth SET queued = queued - 1
            WHERE kind = old.kind AND tenant = old.tenant; END""",
        count(
            "kind", "tenant", "count(*)", f"FROM jobs WHERE state = {queued} GROUP BY kind, tenant"
        ),
    )
    for rowid, spec_data, status_data in list(_jobs(conn, f"WHERE state = {queued}")):
        job = rows.job_from_row(spec_data, status_data)
        placement = rows.placement_of(job, ts_seconds(job.create_time))
        conn.execute(
            "UPDATE jobs SET priority = ?, ready_at = ?, due_at = ? WHERE rowid = ?",
            (job.spec.priority, placement.ready_at, placement.due_at, rowid),
        )


def _legacy(rewrite: Callable[[bytes], bytes], data: bytes) -> bytes:
    """The row rewritten; as it was if it does not parse (it would not read either way, and
    one damaged row must not keep the gateway from starting)."""
    try:
        return rewrite(data)
    except (ValueError, DecodeError) as e:
        log.warning("a stored row does not parse (%s); left as it was", e)
        return data


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "jobs and events", _v1_jobs_and_events),
    Migration(2, "inline inputs and blob references apart from the spec", _v2_payloads_apart),
    Migration(3, "expiry of finished jobs, tombstones of purged ones", _v3_retention),
    Migration(4, "incremental auto-vacuum", _v4_incremental_vacuum, transaction=False),
    Migration(5, "params and result metadata as JSON text", _v5_params_as_json),
    Migration(6, "who uploaded each blob, for tenants", _v6_blob_owners),
    Migration(7, "the params schemas workers declared", _v7_kind_schemas),
    Migration(8, "queued jobs and stored bytes of each tenant, for quotas", _v8_tenant_usage),
    Migration(9, "the queue in the store: places, leases, depths", _v9_queue),
)
LATEST = MIGRATIONS[-1].version


def version(conn: sqlite3.Connection) -> int:
    found: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return found


def migrate(conn: sqlite3.Connection, path: str, *, retention: float) -> int:
    """Brings the database up to `LATEST`; returns the version it had.

    `retention` (seconds) sets when jobs that finished before retention existed expire.
    Raises SchemaTooNew for a database of a newer jobmesh.
    """
    found = version(conn)
    if found > LATEST:
        raise SchemaTooNew(
            f"{path} has schema version {found}, but this jobmesh knows versions up to "
            f"{LATEST}: run the newer jobmesh that wrote it, or another database file"
        )
    # A file with jobs in it may take a while to upgrade: say what is going on.
    existing = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
    for migration in MIGRATIONS[found:]:
        if existing:
            log.info("%s: schema version %d: %s", path, migration.version, migration.summary)
        if not migration.transaction:
            migration.apply(conn, retention)
            conn.execute(f"PRAGMA user_version = {migration.version}")
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            migration.apply(conn, retention)
            conn.execute(f"PRAGMA user_version = {migration.version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found
