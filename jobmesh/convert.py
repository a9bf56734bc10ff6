"""Conversions between Python values and jobmesh.v1 messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from google.protobuf import json_format, struct_pb2

from jobmesh.errors import InvalidArgument
from jobmesh.v1 import job_pb2

JobState: TypeAlias = job_pb2.JobState.ValueType

TERMINAL_STATES: frozenset[JobState] = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
_STATE_PREFIX = "JOB_STATE_"


def job_spec(
    kind: str,
    *,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, bytes] | None = None,
    priority: int = 0,
    idempotency_key: str = "",
    labels: Mapping[str, str] | None = None,
    max_attempts: int | None = None,
) -> job_pb2.JobSpec:
    """A JobSpec from Python values; `params` must be JSON-like (dicts, lists, str, numbers)."""
    spec = job_pb2.JobSpec(
        kind=kind,
        inputs=dict(inputs or {}),
        priority=priority,
        idempotency_key=idempotency_key,
        labels=dict(labels or {}),
    )
    if params:
        spec.params.CopyFrom(to_struct(params, "params"))
    if max_attempts is not None:
        if max_attempts < 1:
            raise InvalidArgument("must be at least 1", "max_attempts")
        spec.retry_policy.max_attempts = max_attempts
    return spec


def to_struct(values: Mapping[str, Any], field: str = "") -> struct_pb2.Struct:
    """A Struct from a JSON-like mapping; InvalidArgument names the field when it is not one."""
    struct = struct_pb2.Struct()
    try:
        struct.update(values)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"not JSON-like: {e}", field) from None
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The JSON-like dict a Struct holds (numbers come back as floats, as JSON has them)."""
    return json_format.MessageToDict(struct)


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
