"""Conversions between Python values and jobmesh.v1 messages."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, TypeAlias, TypedDict, Unpack

from google.protobuf import duration_pb2

from jobmesh.errors import InvalidArgument
from jobmesh.params import encode
from jobmesh.v1 import job_pb2

JobState: TypeAlias = job_pb2.JobState.ValueType

TERMINAL_STATES: frozenset[JobState] = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
_STATE_PREFIX = "JOB_STATE_"


Seconds: TypeAlias = float | timedelta


class SpecOptions(TypedDict, total=False):
    """How a job runs, besides its kind, params and inputs; unset options take the
    gateway's defaults."""

    priority: int
    """Higher runs first (default 0)."""
    idempotency_key: str
    """A second submit with the same key returns the first job."""
    labels: Mapping[str, str]
    max_attempts: int
    """Attempts in all, the first included (gateway default 3)."""
    initial_backoff: Seconds | None
    """Delay before the first retry (default 1 s)."""
    backoff_multiplier: float
    """Factor the delay grows by with each retry (default 2)."""
    max_backoff: Seconds | None
    """Longest delay between attempts (default 60 s)."""
    retry_jitter: float
    """Fraction of each delay drawn at random, 0 to 1 (default 0.2)."""
    start_to_close_timeout: Seconds | None
    """Longest one attempt may run; it then fails with TIMEOUT and is retried."""
    schedule_to_start_timeout: Seconds | None
    """Longest the job may wait in the queue for an attempt; it then fails."""
    schedule_to_close_timeout: Seconds | None
    """Longest the whole job may take, retries included; it then fails DEADLINE_EXCEEDED."""
    retention: Seconds | None
    """How long the job is kept after it ends (default: the gateway's `--retention`)."""


def job_spec(
    kind: str,
    *,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, bytes] | None = None,
    **options: Unpack[SpecOptions],
) -> job_pb2.JobSpec:
    """A JobSpec from Python values; `params` must be JSON (dicts, lists, str, numbers,
    bools, None; integers within ±(2^53 − 1))."""
    spec = job_pb2.JobSpec(
        kind=kind,
        inputs=dict(inputs or {}),
        priority=options.get("priority", 0),
        idempotency_key=options.get("idempotency_key", ""),
        labels=dict(options.get("labels") or {}),
    )
    spec.params_json = encode(params, "params")
    max_attempts = options.get("max_attempts")
    if max_attempts is not None:
        if max_attempts < 1:
            raise InvalidArgument("must be at least 1", "max_attempts")
        spec.retry_policy.max_attempts = max_attempts
    policy = spec.retry_policy
    _set_duration(policy.initial_backoff, options.get("initial_backoff"), "initial_backoff")
    _set_duration(policy.max_backoff, options.get("max_backoff"), "max_backoff")
    if "backoff_multiplier" in options:
        policy.backoff_multiplier = options["backoff_multiplier"]
    if "retry_jitter" in options:
        policy.jitter = options["retry_jitter"]
    _set_duration(
        spec.start_to_close_timeout, options.get("start_to_close_timeout"), "start_to_close_timeout"
    )
    _set_duration(
        spec.schedule_to_start_timeout,
        options.get("schedule_to_start_timeout"),
        "schedule_to_start_timeout",
    )
    _set_duration(
        spec.schedule_to_close_timeout,
        options.get("schedule_to_close_timeout"),
        "schedule_to_close_timeout",
    )
    _set_duration(spec.retention, options.get("retention"), "retention")
    return spec


def _set_duration(duration: duration_pb2.Duration, value: Seconds | None, field: str) -> None:
    if value is None:
        return
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if delta <= timedelta(0):
        raise InvalidArgument("must be positive", field)
    duration.FromTimedelta(delta)


def terminal_event(job: job_pb2.Job) -> job_pb2.JobEvent:
    """An event saying how an ended job ended, for when its own last event is not at hand."""
    end = job_pb2.JobEvent(job_id=job.id, state=job.state, attempt=job.attempt)
    if job.HasField("error"):
        end.error.CopyFrom(job.error)
    if job.HasField("result"):
        end.result.CopyFrom(job.result)
    return end


def is_terminal(state: JobState) -> bool:
    return state in TERMINAL_STATES


def state_name(state: JobState) -> str:
    """'SUCCEEDED' for JOB_STATE_SUCCEEDED; the number for a state this client does not know."""
    try:
        return job_pb2.JobState.Name(state).removeprefix(_STATE_PREFIX)
    except ValueError:
        return str(state)


def parse_state(text: str) -> JobState:
    """A JobState from 'succeeded', 'SUCCEEDED' or 'JOB_STATE_SUCCEEDED'."""
    name = text.strip().upper()
    if not name.startswith(_STATE_PREFIX):
        name = _STATE_PREFIX + name
    try:
        state = job_pb2.JobState.Value(name)
    except ValueError:
        state = job_pb2.JOB_STATE_UNSPECIFIED
    if state == job_pb2.JOB_STATE_UNSPECIFIED:
        known = ", ".join(state_name(s) for s in job_pb2.JobState.values() if s)
        raise InvalidArgument(f"{text!r} is not a job state (one of {known})")
    return state
