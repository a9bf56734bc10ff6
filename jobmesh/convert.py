"""Conversions between Python values and jobmesh.v1 messages: the job a caller asks for
(`job_spec`), and job states by name."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias, TypedDict, Unpack

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from jobmesh.blobs import Payload
from jobmesh.errors import InvalidArgument, file_error
from jobmesh.jobs import TERMINAL_STATES as TERMINAL_STATES
from jobmesh.jobs import BlobRef
from jobmesh.jobs import JobState as JobState
from jobmesh.params import encode
from jobmesh.v1 import job_pb2

_STATE_PREFIX = "JOB_STATE_"

Seconds: TypeAlias = float | timedelta
Input: TypeAlias = Payload | BlobRef
"""An input: bytes, a file's path, or a blob uploaded before (`AsyncClient.upload`)."""


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
    not_before: datetime | Seconds | None
    """Not run before this time (a timezone-aware datetime), or this long from now (a
    countdown in seconds or a timedelta); the job waits QUEUED until then."""


@dataclass(frozen=True)
class JobRequest:
    """A job to submit, as `job_spec` makes it: its message, and the inputs that are files.

    The client reads the small files (up to `ClientSettings.inline_limit`) into the message
    and streams the large ones up as blobs when it submits, so a file is never held in memory
    whole; inline bytes over the limit are uploaded too. The request itself is not changed:
    one request may be submitted many times.
    """

    spec: job_pb2.JobSpec
    """Everything but the files."""
    files: Mapping[str, Path] = field(default_factory=dict)
    """Input name → the file to send as that input."""


def job_spec(
    kind: str,
    *,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Input] | None = None,
    **options: Unpack[SpecOptions],
) -> JobRequest:
    """A job for `AsyncClient.submit_batch`, from Python values (`submit` takes the same).

    `params` must be JSON (dicts, lists, str, numbers, bools, None; integers within
    +-(2^53 - 1)). An input is bytes, a file's path (str or os.PathLike), read or uploaded
    when the job is submitted, or a `BlobRef` from `upload`. InvalidArgument names what is
    wrong: a param that is not JSON, a bad option, an input file that is missing or is not
    a regular file.
    """
    spec = job_pb2.JobSpec()
    _set(spec, "kind", kind)
    _set(spec, "priority", options.get("priority", 0))
    _set(spec, "idempotency_key", options.get("idempotency_key", ""))
    _set(spec, "labels", options.get("labels") or {})
    spec.params_json = encode(params, "params")
    files: dict[str, Path] = {}
    for name, value in (inputs or {}).items():
        where = f"inputs.{name}"
        if isinstance(value, bytes | bytearray):
            _set(spec, "inputs", {name: bytes(value)}, where)
        elif isinstance(value, BlobRef | job_pb2.BlobRef):
            spec.input_blobs[name].CopyFrom(value.proto if isinstance(value, BlobRef) else value)
        elif isinstance(value, str | os.PathLike):
            files[name] = _file(value, where)
        else:
            raise InvalidArgument(
                f"must be bytes, a file's path or a BlobRef, got {type(value).__name__}", where
            )
    max_attempts = options.get("max_attempts")
    if max_attempts is not None:
        if max_attempts < 1:
            raise InvalidArgument("must be at least 1", "max_attempts")
        _set(spec.retry_policy, "max_attempts", max_attempts, "max_attempts")
    policy = spec.retry_policy
    _set_duration(policy.initial_backoff, options.get("initial_backoff"), "initial_backoff")
    _set_duration(policy.max_backoff, options.get("max_backoff"), "max_backoff")
    if "backoff_multiplier" in options:
        _set(policy, "backoff_multiplier", options["backoff_multiplier"], "backoff_multiplier")
    if "retry_jitter" in options:
        _set(policy, "jitter", options["retry_jitter"], "retry_jitter")
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
    _set_time(spec.not_before, options.get("not_before"), "not_before")
    return JobRequest(spec, files)


def _set(message: Message, name: str, value: Any, where: str = "") -> None:
    """Sets a field (merges a map), with a value protobuf refuses as InvalidArgument."""
    try:
        target = getattr(message, name)
        if isinstance(value, Mapping):
            target.update(value)
        else:
            setattr(message, name, value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(str(e), where or name) from None


def _file(path: str | os.PathLike[str], where: str) -> Path:
    """The path of an input file that is there and readable now."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise file_error(e, path, where) from e
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"{os.fspath(path)!r} is not a file", where)
    if not os.access(path, os.R_OK):
        raise InvalidArgument(f"{os.fspath(path)!r} cannot be read", where)
    return Path(path)


def _set_duration(duration: duration_pb2.Duration, value: Seconds | None, field: str) -> None:
    if value is None:
        return
    try:
        delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
        if delta <= timedelta(0):
            raise InvalidArgument("must be positive", field)
        duration.FromTimedelta(delta)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"not a number of seconds: {e}", field) from None


def _set_time(stamp: timestamp_pb2.Timestamp, value: datetime | Seconds | None, field: str) -> None:
    """A point in time: a timezone-aware datetime, or seconds (a timedelta) from now."""
    if value is None:
        return
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidArgument("must be timezone-aware (e.g. datetime.now(UTC))", field)
        at = value
    else:
        try:
            delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidArgument(f"not a time or a number of seconds: {e}", field) from None
        at = datetime.now(UTC) + delta
    try:
        stamp.FromDatetime(at)
    except (ValueError, OverflowError) as e:
        raise InvalidArgument(str(e), field) from None


def terminal_event(job: job_pb2.Job) -> job_pb2.JobEvent:
    """An event saying how an ended job ended, for when its own last event is not at hand."""
    end = job_pb2.JobEvent(job_id=job.id, state=job.state, attempt=job.attempt)
    if job.HasField("error"):
        end.error.CopyFrom(job.error)
    if job.HasField("result"):
        end.result.CopyFrom(job.result)
    return end


def is_terminal(state: int) -> bool:
    return state in TERMINAL_STATES


def state_name(state: int) -> str:
    """'SUCCEEDED' for JOB_STATE_SUCCEEDED; 'UNKNOWN_7' for a state this client does not know."""
    return str(JobState(state))


def parse_state(text: str) -> JobState:
    """A JobState from 'succeeded', 'SUCCEEDED' or 'JOB_STATE_SUCCEEDED'."""
    name = text.strip().upper().removeprefix(_STATE_PREFIX)
    try:
        return JobState[name]
    except KeyError:
        known = ", ".join(state.name for state in JobState)
        raise InvalidArgument(f"{text!r} is not a job state (one of {known})") from None
