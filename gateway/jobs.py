"""The job's life: ids, states, events, and the retry schedule."""

from __future__ import annotations

import os
import random
import time

from google.protobuf import duration_pb2, timestamp_pb2

from jobmesh.v1 import job_pb2

S = job_pb2.JobState

DEFAULT_INITIAL_BACKOFF = 1.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0
DEFAULT_MAX_BACKOFF = 60.0
DEFAULT_JITTER = 0.2

_last_ms = 0
_counter = 0


def new_job_id() -> str:
    """32 hex digits that sort by creation time: 48 bits of milliseconds, a counter, randomness."""
    global _last_ms, _counter
    ms = time.time_ns() // 1_000_000
    if ms == _last_ms:
        _counter += 1
    else:
        _last_ms, _counter = ms, 0
    return f"{ms:012x}{_counter & 0xFFFF:04x}{os.urandom(8).hex()}"


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def ts_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def next_event(
    job: job_pb2.Job,
    type_: int = job_pb2.JOB_EVENT_TYPE_STATE,
    *,
    message: str = "",
    error: job_pb2.JobError | None = None,
) -> job_pb2.JobEvent:
    """A new event for the job as it is now, numbered after its last one."""
    job.update_time.CopyFrom(now())
    job.event_seq += 1
    event = job_pb2.JobEvent(
        job_id=job.id,
        seq=job.event_seq,
        type=type_,  # type: ignore[arg-type]
        state=job.state,
        attempt=job.attempt,
        worker_id=job.worker_id,
        progress=job.progress,
        message=message,
    )
    event.time.CopyFrom(job.update_time)
    if job.state == S.JOB_STATE_SUCCEEDED:
        event.result.CopyFrom(job.result)
    if error is not None:
        event.error.CopyFrom(error)
    elif job.HasField("error") and type_ == job_pb2.JOB_EVENT_TYPE_STATE:
        event.error.CopyFrom(job.error)
    return event


def max_attempts(job: job_pb2.Job, default: int) -> int:
    return job.spec.retry_policy.max_attempts or default


def retry_delay(job: job_pb2.Job, rng: random.Random) -> float:
    """Seconds before the next attempt: exponential backoff with jitter, per the job's policy."""
    policy = job.spec.retry_policy
    initial = (
        duration_seconds(policy.initial_backoff)
        if policy.HasField("initial_backoff")
        else DEFAULT_INITIAL_BACKOFF
    )
    multiplier = policy.backoff_multiplier or DEFAULT_BACKOFF_MULTIPLIER
    ceiling = (
        duration_seconds(policy.max_backoff)
        if policy.HasField("max_backoff")
        else DEFAULT_MAX_BACKOFF
    )
    jitter = policy.jitter or DEFAULT_JITTER
    # job.attempt is the attempt that just failed; the first retry waits `initial`.
    delay = min(ceiling, initial * multiplier ** max(0, job.attempt - 1))
    return max(0.0, delay * (1 - jitter * rng.random()))


def duration_seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def seconds_until(stamp: timestamp_pb2.Timestamp) -> float:
    return (stamp.ToNanoseconds() - time.time_ns()) / 1e9
