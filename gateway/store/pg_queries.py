"""The PostgreSQL store's hot statements, and the arrays they take.

Each writes or reads many rows in one round trip: rows go in as parallel arrays that
`unnest` turns back into rows, and a data-modifying WITH writes several tables in one
statement. `bench/pg_drivers.py` times these same statements on each driver.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.jobs import ts_seconds
from gateway.store import ANY_TENANT, CLAIM_INPUT_BYTES, JobFilter, Placement, Unfinished, rows
from jobmesh.v1 import job_pb2

QUEUED = int(job_pb2.JOB_STATE_QUEUED)
RUNNING_STATES = (int(job_pb2.JOB_STATE_ASSIGNED), int(job_pb2.JOB_STATE_RUNNING))

LOCK_USAGE = """
WITH u AS (
    INSERT INTO tenant_usage AS u (tenant) VALUES ($1)
    ON CONFLICT (tenant) DO UPDATE SET tenant = excluded.tenant
    RETURNING queued, stored_bytes
)
SELECT queued, stored_bytes,
    ARRAY(SELECT idempotency_key FROM jobs
        WHERE tenant = $1 AND idempotency_key = ANY($2::text[])) AS taken
FROM u"""
"""Locks the tenant's usage row until the transaction ends, and reads it with which of
these idempotency keys are taken: a quota checked under it holds across gateways."""

LOCK_TENANTS = "SELECT jobmesh_lock_tenants($1::text[])"
"""Locks these tenants' usage rows (and so their queues' depths), in the order of their
names, as everything that takes more than one does."""

INSERT_JOBS = """
WITH new AS (
    INSERT INTO jobs (id, tenant, kind, state, idempotency_key, labels, create_time, spec,
        status, priority, ready_at, due_at, lease_owner, lease_until)
    SELECT id, tenant, kind, state, key, labels::jsonb, create_time, spec, status,
        priority, ready_at, due_at, owner, lease_until
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::text[],
        $7::float8[], $8::bytea[], $9::bytea[], $10::int[], $11::float8[], $12::float8[],
        $13::text[], $14::float8[])
        AS j(id, tenant, kind, state, key, labels, create_time, spec, status, priority,
            ready_at, due_at, owner, lease_until)
    ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
), inputs AS (
    INSERT INTO job_inputs (job_id, bytes, data)
    SELECT * FROM unnest($15::text[], $16::int8[], $17::bytea[]) AS i(job_id, bytes, data)
    WHERE job_id IN (SELECT id FROM new)
), refs AS (
    INSERT INTO blob_refs (blob_id, job_id)
    SELECT * FROM unnest($18::text[], $19::text[]) AS r(blob_id, job_id)
    WHERE job_id IN (SELECT id FROM new)
    ON CONFLICT DO NOTHING
), events AS (
    INSERT INTO events (job_id, seq, data)
    SELECT * FROM unnest($20::text[], $21::int[], $22::bytea[]) AS e(job_id, seq, data)
    WHERE job_id IN (SELECT id FROM new)
)
SELECT id FROM new"""
"""Inserts the jobs whose idempotency key is new (all the others), with their inputs,
blob references and first events; returns the ids inserted."""

EXISTING = """
SELECT idempotency_key, spec, status FROM jobs
WHERE tenant = $1 AND idempotency_key = ANY($2::text[])"""

SAVE_JOBS = """
WITH s AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[], $4::float8[], $5::bool[],
        $6::int[], $7::float8[], $8::float8[], $9::text[], $10::float8[])
        AS s(id, state, status, expire_time, placed, priority, ready_at, due_at, owner,
            lease_until)
), events AS (
    INSERT INTO events (job_id, seq, data)
    SELECT * FROM unnest($11::text[], $12::int[], $13::bytea[])
), refs AS (
    INSERT INTO blob_refs (blob_id, job_id)
    SELECT * FROM unnest($14::text[], $15::text[])
    ON CONFLICT DO NOTHING
)
UPDATE jobs SET state = s.state, status = s.status, expire_time = s.expire_time,
    priority = CASE WHEN s.placed THEN s.priority ELSE jobs.priority END,
    ready_at = CASE WHEN s.placed THEN s.ready_at ELSE jobs.ready_at END,
    due_at = CASE WHEN s.placed THEN s.due_at ELSE jobs.due_at END,
    lease_owner = CASE WHEN s.placed THEN s.owner ELSE jobs.lease_owner END,
    lease_until = CASE WHEN s.placed THEN s.lease_until ELSE jobs.lease_until END
FROM s WHERE jobs.id = s.id"""
"""Writes the status of each job once and appends their events and output blob refs."""

GET = """
SELECT spec, status, data FROM jobs LEFT JOIN job_inputs ON job_id = id
WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"""

EVENTS = "SELECT data FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq"

FREE = "(lease_owner IS NULL OR lease_until < ${n})"
"""Whether a QUEUED job is free to claim at `now`, the parameter ${n}: not leased, or its
lease ended before `now`. A lease without an end lasts until it is released."""

CLAIMED = (
    "spec, status, (SELECT bytes FROM job_inputs WHERE job_id = jobs.id), ready_at,"
    " (SELECT data FROM job_inputs WHERE job_id = jobs.id"
    f" AND bytes <= {CLAIM_INPUT_BYTES})"
)
"""What a claim returns of each job it leased: `claimed` reads it."""

# Returns (priority, id) too, to put the claimed rows back in queue order: UPDATE ...
# RETURNING keeps none.
CLAIM = f"""
UPDATE jobs SET lease_owner = $1, lease_until = $6
WHERE id IN (
    SELECT id FROM jobs
    WHERE state = {QUEUED} AND kind = $2 AND tenant = $3 AND ready_at <= $5
        AND {FREE.format(n=5)}
    ORDER BY priority DESC, ready_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED)
RETURNING priority, id, {CLAIMED}"""


CLAIM_JOB = f"""
UPDATE jobs SET lease_owner = $1, lease_until = $2
WHERE id = $3 AND state = {QUEUED} AND ($4::text IS NULL OR tenant = $4)
    AND (lease_owner = $1 OR {FREE.format(n=5)})
RETURNING {CLAIMED}"""
"""Leases one job, unless another owner's lease on it is live at $5; its owner renews."""

# Returns (due_at, id) too, to put the claimed rows in the order they fell due.
CLAIM_DUE = f"""
UPDATE jobs SET lease_owner = $1, lease_until = $4
WHERE id IN (
    SELECT id FROM jobs
    WHERE state = {QUEUED} AND due_at <= $2 AND {FREE.format(n=2)}
    ORDER BY due_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
RETURNING due_at, id, {CLAIMED}"""

NEXT_TIMES = f"""
SELECT
    (SELECT min(ready_at) FROM jobs
        WHERE state = {QUEUED} AND ready_at > $1 AND {FREE.format(n=1)}),
    (SELECT min(due_at) FROM jobs
        WHERE state = {QUEUED} AND due_at IS NOT NULL AND {FREE.format(n=1)})"""

QUEUE_DEPTHS = f"""
SELECT kind, tenant, queued,
    (SELECT min(ready_at) FROM jobs
        WHERE state = {QUEUED} AND jobs.kind = q.kind AND jobs.tenant = q.tenant
            AND ready_at <= $1)
FROM queue_depth AS q WHERE queued > 0 ORDER BY kind, tenant"""

CLAIM_RUNNING = f"""
UPDATE jobs SET lease_owner = $1, lease_until = 'Infinity'
WHERE state IN {RUNNING_STATES}
    AND lease_owner IN (SELECT name FROM gateways WHERE dead)"""
"""Leases to $1 running jobs of dead gateways: narrowed further, then RETURNING."""

RUNNING_OF_DEAD = f"""
SELECT {CLAIMED} FROM jobs
WHERE id = $1 AND state IN {RUNNING_STATES}
    AND lease_owner IN (SELECT name FROM gateways WHERE dead)
FOR UPDATE"""

RELEASE = f"""
UPDATE jobs SET lease_owner = NULL, lease_until = NULL
WHERE id = ANY($1::text[]) AND state = {QUEUED}"""


def list_query(where: JobFilter, limit: int, after_id: str) -> tuple[str, list[Any]]:
    """The statement, and its arguments, of a List page: jobs newest first."""
    sql = ["SELECT spec, status FROM jobs WHERE true"]
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if where.tenant != ANY_TENANT:
        sql.append(f"AND tenant = {arg(where.tenant)}")
    if where.states:
        sql.append(f"AND state = ANY({arg([int(s) for s in where.states])}::int[])")
    if where.kind:
        sql.append(f"AND kind = {arg(where.kind)}")
    for key, value in where.labels:
        sql.append(f"AND labels ->> {arg(key)} = {arg(value)}")
    if where.created_after is not None:
        sql.append(f"AND create_time > {arg(where.created_after)}")
    if where.created_before is not None:
        sql.append(f"AND create_time < {arg(where.created_before)}")
    if after_id:
        sql.append(f"AND id < {arg(after_id)}")
    sql.append(f"ORDER BY id DESC LIMIT {arg(limit)}")
    return " ".join(sql), args


@dataclass
class NewJobs:
    """INSERT_JOBS' arguments for a batch of new jobs."""

    args: list[list[Any]] = field(default_factory=lambda: [[] for _ in range(22)])
    input_bytes: dict[str, int] = field(default_factory=dict)
    """Each job's inline input bytes, which its tenant's stored bytes grow by."""

    @classmethod
    def of(
        cls,
        jobs: Sequence[job_pb2.Job],
        events: Sequence[job_pb2.JobEvent],
        placements: Sequence[Placement],
    ) -> NewJobs:
        new = cls()
        a = new.args
        for job, event, placed in zip(jobs, events, placements, strict=True):
            owner, lease_until = lease_of(placed)
            for column, value in enumerate(
                (
                    job.id,
                    job.tenant,
                    job.spec.kind,
                    int(job.state),
                    job.spec.idempotency_key or None,
                    json.dumps(dict(job.spec.labels), sort_keys=True),
                    ts_seconds(job.create_time),
                    rows.spec_blob(job.spec),
                    rows.status_blob(job),
                    job.spec.priority,
                    placed.ready_at,
                    placed.due_at,
                    owner,
                    lease_until,
                )
            ):
                a[column].append(value)
            inputs = rows.inputs_row(job.spec)
            if inputs is not None:
                new.input_bytes[job.id] = inputs[0]
                a[14].append(job.id)
                a[15].append(inputs[0])
                a[16].append(inputs[1])
            for blob_id in sorted(rows.input_blob_ids(job.spec)):
                a[17].append(blob_id)
                a[18].append(job.id)
            a[19].append(event.job_id)
            a[20].append(event.seq)
            a[21].append(rows.stored_event(event))
        return new


@dataclass
class Saves:
    """SAVE_JOBS' arguments: consecutive saves, each job's status written once."""

    statuses: dict[str, tuple[int, bytes, float | None, int, Placement | None]] = field(
        default_factory=dict
    )
    events: list[tuple[str, int, bytes]] = field(default_factory=list)
    refs: list[tuple[str, str]] = field(default_factory=list)

    def add(
        self,
        job_id: str,
        state: int,
        status: bytes,
        expire_time: float | None,
        priority: int,
        placement: Placement | None,
        event: tuple[str, int, bytes] | None,
        blob_ids: Collection[str],
    ) -> None:
        earlier = self.statuses.get(job_id)
        if placement is None and earlier is not None:
            placement = earlier[4]  # a later save in the batch keeps the earlier place
        self.statuses[job_id] = (state, status, expire_time, priority, placement)
        if event is not None:
            self.events.append(event)
        self.refs.extend((blob_id, job_id) for blob_id in blob_ids)

    def __bool__(self) -> bool:
        return bool(self.statuses)

    def args(self) -> list[list[Any]]:
        a: list[list[Any]] = [[] for _ in range(15)]
        for job_id, (state, status, expire, priority, placed) in self.statuses.items():
            owner, lease_until = lease_of(placed) if placed else (None, None)
            for column, value in enumerate(
                (
                    job_id,
                    state,
                    status,
                    expire,
                    placed is not None,
                    priority,
                    placed.ready_at if placed else None,
                    placed.due_at if placed else None,
                    owner,
                    lease_until,
                )
            ):
                a[column].append(value)
        for job_id, seq, data in self.events:
            a[10].append(job_id)
            a[11].append(seq)
            a[12].append(data)
        for blob_id, job_id in self.refs:
            a[13].append(blob_id)
            a[14].append(job_id)
        return a


def lease_of(placement: Placement) -> tuple[str | None, float | None]:
    """The (lease_owner, lease_until) columns of a job placed so."""
    if not placement.owner:
        return None, None
    return placement.owner, placement.lease_until


def claimed(
    spec: bytes, status: bytes, inline_bytes: int | None, ready_at: float, inputs: bytes | None
) -> Unfinished:
    """A job a claim leased, from the CLAIMED columns."""
    return Unfinished(rows.job_from_row(spec, status), inline_bytes or 0, ready_at, inputs)
