"""The PostgreSQL schema's versions: numbered migrations, applied in order when a store opens.

The `schema_version` table holds the number of the last migration applied. Gateways that
start at once take a session advisory lock first, so each migration runs once, in one
transaction with the bump of the version. A database with a version this code does not
know is refused (`SchemaTooNew`), not guessed at.

Migration 1 is the whole schema of SQLite's version 9: jobs (with their place in the
queue and its lease), events, inline inputs, blob references and owners, tombstones,
params schemas, and per-tenant and per-queue counters kept by triggers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from gateway.store.migrations import SchemaTooNew
from jobmesh.v1 import job_pb2

__all__ = ["LATEST", "MIGRATIONS", "Migration", "SchemaTooNew", "migrate", "version"]

log = logging.getLogger(__name__)

# pg_advisory_lock's key: "jobmesh" in ASCII, so that it names us in pg_locks.
LOCK_KEY = 0x6A6F626D657368

QUEUED = int(job_pb2.JOB_STATE_QUEUED)
RUNNING_STATES = (int(job_pb2.JOB_STATE_ASSIGNED), int(job_pb2.JOB_STATE_RUNNING))


@dataclass(frozen=True)
class Migration:
    version: int
    summary: str
    statements: tuple[str, ...]
    """Plain SQL, run in order in the migration's transaction."""


_TABLES = (
    f"""CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        -- Submit order across gateways (ids sort by each gateway's clock only).
        n BIGINT GENERATED ALWAYS AS IDENTITY,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        state INTEGER NOT NULL,
        idempotency_key TEXT,
        labels JSONB NOT NULL,
        create_time DOUBLE PRECISION NOT NULL,
        spec BYTEA NOT NULL,
        status BYTEA NOT NULL,
        expire_time DOUBLE PRECISION,
        -- The job's place in its queue and its lease: meaningful while state = {QUEUED}.
        priority INTEGER NOT NULL DEFAULT 0,
        ready_at DOUBLE PRECISION,
        due_at DOUBLE PRECISION,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION
    )""",
    """CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key)
        WHERE idempotency_key IS NOT NULL""",
    f"CREATE INDEX jobs_running ON jobs (n) WHERE state IN {RUNNING_STATES}",
    "CREATE INDEX jobs_tenant ON jobs (tenant, id)",
    "CREATE INDEX jobs_expiry ON jobs (expire_time) WHERE expire_time IS NOT NULL",
    f"""CREATE INDEX jobs_queue ON jobs (kind, tenant, priority DESC, ready_at, id)
        WHERE state = {QUEUED}""",
    f"CREATE INDEX jobs_ready ON jobs (ready_at) WHERE state = {QUEUED}",
    f"CREATE INDEX jobs_queue_age ON jobs (kind, tenant, ready_at) WHERE state = {QUEUED}",
    f"CREATE INDEX jobs_due ON jobs (due_at) WHERE state = {QUEUED} AND due_at IS NOT NULL",
    "CREATE INDEX jobs_leased ON jobs (lease_owner) WHERE lease_owner IS NOT NULL",
    """CREATE TABLE events (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (job_id, seq)
    )""",
    """CREATE TABLE job_inputs (
        job_id TEXT PRIMARY KEY,
        bytes BIGINT NOT NULL,
        data BYTEA NOT NULL
    )""",
    """CREATE TABLE blob_refs (
        blob_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        PRIMARY KEY (blob_id, job_id)
    )""",
    "CREATE INDEX blob_refs_job ON blob_refs (job_id)",
    # What is left of a purged job: enough to tell "expired" from "never existed".
    """CREATE TABLE expired_jobs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        purge_time DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX expired_jobs_time ON expired_jobs (purge_time)",
    """CREATE TABLE blob_owners (
        blob_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        principal TEXT NOT NULL,
        upload_time DOUBLE PRECISION NOT NULL,
        bytes BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (blob_id, tenant, principal)
    )""",
    "CREATE INDEX blob_owners_time ON blob_owners (upload_time)",
    """CREATE TABLE kind_schemas (
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        digest TEXT NOT NULL,
        schema BYTEA NOT NULL,
        first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, tenant, digest)
    )""",
    """CREATE TABLE tenant_usage (
        tenant TEXT PRIMARY KEY,
        queued BIGINT NOT NULL DEFAULT 0,
        stored_bytes BIGINT NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE queue_depth (
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        queued BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (kind, tenant)
    )""",
    # The gateways sharing the database: a lease of a job is its gateway's, live while the
    # gateway beats (`heartbeat_at`); one silent too long is marked dead by another, which
    # takes its work over.
    """CREATE TABLE gateways (
        name TEXT PRIMARY KEY,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        dead_at DOUBLE PRECISION,
        dead BOOLEAN NOT NULL DEFAULT false,
        workers BYTEA NOT NULL DEFAULT ''
    )""",
)

# The counters follow the rows they count. Jobs come and go many at a time (a batch, a
# purge): statement triggers add up each statement's rows once. A job leaves or enters
# its queue one row at a time (saves), filtered by the trigger's WHEN before any call.
# Blob bytes count once per (blob, tenant) however many principals own it: the tenant's
# counter row is locked before looking, so concurrent uploads and deletes see each other.
_COUNTERS = (
    """CREATE FUNCTION jobmesh_count_queued(t TEXT, k TEXT, delta BIGINT) RETURNS void
    LANGUAGE sql AS $$
        INSERT INTO tenant_usage AS u (tenant, queued) VALUES (t, delta)
            ON CONFLICT (tenant) DO UPDATE SET queued = u.queued + excluded.queued;
        INSERT INTO queue_depth AS q (kind, tenant, queued) VALUES (k, t, delta)
            ON CONFLICT (kind, tenant) DO UPDATE SET queued = q.queued + excluded.queued;
    $$""",
    f"""CREATE FUNCTION jobmesh_jobs_added() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM jobmesh_count_queued(tenant, kind, n)
            FROM (SELECT tenant, kind, count(*) AS n FROM added WHERE state = {QUEUED}
                  GROUP BY tenant, kind ORDER BY tenant, kind) AS a;
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION jobmesh_jobs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM jobmesh_count_queued(tenant, kind, -n)
            FROM (SELECT tenant, kind, count(*) AS n FROM gone WHERE state = {QUEUED}
                  GROUP BY tenant, kind ORDER BY tenant, kind) AS g;
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION jobmesh_job_moved() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM jobmesh_count_queued(new.tenant, new.kind,
            CASE WHEN new.state = {QUEUED} THEN 1 ELSE -1 END);
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER jobs_added AFTER INSERT ON jobs REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION jobmesh_jobs_added()""",
    """CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION jobmesh_jobs_deleted()""",
    f"""CREATE TRIGGER job_moved AFTER UPDATE OF state ON jobs FOR EACH ROW
        WHEN ((old.state = {QUEUED}) IS DISTINCT FROM (new.state = {QUEUED}))
        EXECUTE FUNCTION jobmesh_job_moved()""",
    """CREATE FUNCTION jobmesh_count_bytes(t TEXT, delta BIGINT) RETURNS void
    LANGUAGE sql AS $$
        INSERT INTO tenant_usage AS u (tenant, stored_bytes) VALUES (t, delta)
            ON CONFLICT (tenant)
            DO UPDATE SET stored_bytes = u.stored_bytes + excluded.stored_bytes;
    $$""",
    """CREATE FUNCTION jobmesh_inputs_added() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM jobmesh_count_bytes(tenant, n)
            FROM (SELECT jobs.tenant, sum(added.bytes)::bigint AS n
                  FROM added JOIN jobs ON jobs.id = added.job_id
                  GROUP BY jobs.tenant ORDER BY jobs.tenant) AS a;
        RETURN NULL;
    END $$""",
    """CREATE FUNCTION jobmesh_inputs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM jobmesh_count_bytes(tenant, -n)
            FROM (SELECT jobs.tenant, sum(gone.bytes)::bigint AS n
                  FROM gone JOIN jobs ON jobs.id = gone.job_id
                  GROUP BY jobs.tenant ORDER BY jobs.tenant) AS g;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER inputs_added AFTER INSERT ON job_inputs REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION jobmesh_inputs_added()""",
    """CREATE TRIGGER inputs_deleted AFTER DELETE ON job_inputs REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION jobmesh_inputs_deleted()""",
    """CREATE FUNCTION jobmesh_lock_tenants(tenants TEXT[]) RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO tenant_usage (tenant)
            SELECT DISTINCT t FROM unnest(tenants) AS t ORDER BY t
            ON CONFLICT (tenant) DO NOTHING;
        PERFORM 1 FROM tenant_usage WHERE tenant = ANY (tenants) ORDER BY tenant FOR UPDATE;
    END $$""",
    # Owners added: a (blob, tenant) with no owner but the new rows counts its bytes.
    """CREATE FUNCTION jobmesh_owners_added() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM jobmesh_lock_tenants(array_agg(DISTINCT tenant)) FROM added;
        PERFORM jobmesh_count_bytes(tenant, sum(bytes)::bigint)
            FROM (SELECT DISTINCT ON (a.blob_id, a.tenant) a.blob_id, a.tenant, a.bytes
                  FROM added AS a
                  WHERE NOT EXISTS (
                      SELECT 1 FROM blob_owners AS o
                      WHERE o.blob_id = a.blob_id AND o.tenant = a.tenant
                        AND o.principal NOT IN (SELECT principal FROM added AS n
                            WHERE n.blob_id = a.blob_id AND n.tenant = a.tenant))
                  ORDER BY a.blob_id, a.tenant) AS fresh
            GROUP BY tenant;
        RETURN NULL;
    END $$""",
    # Owners deleted: a (blob, tenant) left with no owner stops counting its bytes.
    """CREATE FUNCTION jobmesh_owners_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM jobmesh_lock_tenants(array_agg(DISTINCT tenant)) FROM gone;
        PERFORM jobmesh_count_bytes(tenant, -sum(bytes)::bigint)
            FROM (SELECT DISTINCT ON (g.blob_id, g.tenant) g.blob_id, g.tenant, g.bytes
                  FROM gone AS g
                  WHERE NOT EXISTS (
                      SELECT 1 FROM blob_owners AS o
                      WHERE o.blob_id = g.blob_id AND o.tenant = g.tenant)
                  ORDER BY g.blob_id, g.tenant) AS orphaned
            GROUP BY tenant;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER owners_added AFTER INSERT ON blob_owners REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION jobmesh_owners_added()""",
    """CREATE TRIGGER owners_deleted AFTER DELETE ON blob_owners REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION jobmesh_owners_deleted()""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the schema of SQLite's version 9", (*_TABLES, *_COUNTERS)),
)
LATEST = MIGRATIONS[-1].version


async def version(conn: asyncpg.Connection) -> int:
    """The schema version of the database; 0 for an empty one."""
    # Looked for before it is made: a gateway's role may lack CREATE on an upgraded schema.
    if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    found = await conn.fetchval("SELECT max(version) FROM schema_version")
    return int(found or 0)


async def migrate(conn: asyncpg.Connection, where: str) -> int:
    """Brings the database up to `LATEST`; returns the version it had.

    `where` names the database in errors (without its password). Raises SchemaTooNew for
    a database of a newer jobmesh.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        found = await version(conn)
        if found > LATEST:
            raise SchemaTooNew(
                f"{where} has schema version {found}, but this jobmesh knows versions up to "
                f"{LATEST}: run the newer jobmesh that wrote it, or another database"
            )
        for migration in MIGRATIONS[found:]:
            if found:
                log.info("%s: schema version %d: %s", where, migration.version, migration.summary)
            async with conn.transaction():
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version VALUES ($1)", migration.version)
        return found
    finally:
        if not conn.is_closed():  # a lost session has let go of its lock already
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
