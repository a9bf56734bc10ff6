"""How a job is laid out in the store's rows; shared by the store and its migrations.

A job is three rows: `jobs` holds its spec without inline inputs and its status (the
job without its spec), `job_inputs` its inline inputs, and `blob_refs` one row per blob
it uses. Keeping the inputs apart lets the gateway list and recover jobs without reading
payloads it does not need yet.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from gateway.jobs import duration_seconds, ts_seconds
from gateway.store import Page, Placement
from jobmesh.convert import TERMINAL_STATES
from jobmesh.limits import payload_bytes
from jobmesh.v1 import job_pb2


def status_blob(job: job_pb2.Job) -> bytes:
    status = job_pb2.Job()
    status.CopyFrom(job)
    status.ClearField("spec")
    return status.SerializeToString()


def stored_event(event: job_pb2.JobEvent) -> bytes:
    # The result is kept once, with the job; replay attaches it again.
    if not event.HasField("result"):
        return event.SerializeToString()
    stored = job_pb2.JobEvent()
    stored.CopyFrom(event)
    stored.ClearField("result")
    return stored.SerializeToString()


def spec_blob(spec: job_pb2.JobSpec) -> bytes:
    """The spec as stored: without its inline inputs."""
    if not spec.inputs:
        return spec.SerializeToString()
    stored = job_pb2.JobSpec()
    stored.CopyFrom(spec)
    stored.ClearField("inputs")
    return stored.SerializeToString()


def inputs_row(spec: job_pb2.JobSpec) -> tuple[int, bytes] | None:
    """(inline bytes, data) of the spec's inline inputs, or None if it has none.

    The data is a JobSpec carrying only the inputs, so merging it into the stored spec
    gives the spec back whole.
    """
    if not spec.inputs:
        return None
    return payload_bytes(spec.inputs), job_pb2.JobSpec(inputs=spec.inputs).SerializeToString()


def job_from_row(
    spec: bytes, status: bytes, inputs: bytes | None = None, *, light: bool = False
) -> job_pb2.Job:
    """The job from its stored spec and status, with its inline inputs if given.

    `light` leaves inline outputs out too, for listings.
    """
    job = job_pb2.Job.FromString(status)
    job.spec.ParseFromString(spec)
    if inputs is not None:
        job.spec.MergeFromString(inputs)
    if light:
        job.result.ClearField("outputs")
    return job


# A repeated message field's tag and length prefix, at most.
_FIELD_OVERHEAD = 6


def page_of(found: Iterable[Any], page_size: int, max_bytes: int | None) -> Page:
    """A List page from (spec, status) rows newest first (`page_size` + 1 of them, so that it
    knows whether more follow): at most `page_size` jobs and `max_bytes` serialized, but
    always one, without inline inputs or outputs."""
    page = Page()
    size = 0
    for spec, status in found:
        if len(page.jobs) == page_size:
            page.last_id = page.jobs[-1].id
            break
        job = job_from_row(spec, status, light=True)
        # Each job costs its bytes and a field's tag and length in the response.
        size += job.ByteSize() + _FIELD_OVERHEAD
        if page.jobs and max_bytes is not None and size > max_bytes:
            page.last_id = page.jobs[-1].id
            break
        page.jobs.append(job)
    return page


def expire_time(job: job_pb2.Job, retention: float) -> float | None:
    """When a finished job goes: its end plus its own retention, else `retention`.

    None while the job has not finished.
    """
    if job.state not in TERMINAL_STATES:
        return None
    for stamp in (job.end_time, job.update_time, job.create_time):
        if stamp.seconds or stamp.nanos:
            end = ts_seconds(stamp)
            break
    else:
        end = time.time()
    if job.spec.HasField("retention"):
        retention = duration_seconds(job.spec.retention)
    return end + max(0.0, retention)


def input_blob_ids(spec: job_pb2.JobSpec) -> set[str]:
    return {ref.id for ref in spec.input_blobs.values()}


def output_blob_ids(job: job_pb2.Job) -> set[str]:
    """Blobs the job produced, which it references once it SUCCEEDED."""
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        return set()
    return {ref.id for ref in job.result.output_blobs.values()}


def placement_of(job: job_pb2.Job, now: float, delay: float = 0.0, owner: str = "") -> Placement:
    """Where a job (re)entering its queue at `now` stands: ready after its `not_before` and
    `delay` (a retry's backoff), due at its deadline or its schedule-to-start limit."""
    ready_at = now + delay
    if job.spec.HasField("not_before"):
        ready_at = max(ready_at, ts_seconds(job.spec.not_before))
    due = []
    if job.HasField("deadline"):
        due.append(ts_seconds(job.deadline))
    if job.spec.HasField("schedule_to_start_timeout"):
        due.append(ready_at + duration_seconds(job.spec.schedule_to_start_timeout))
    return Placement(ready_at, min(due) if due else None, owner)
