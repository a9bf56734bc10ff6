"""The job as the SDK hands it out: plain Python values, decoded once from jobmesh.v1 messages.

States and event types are enums with names, times are UTC-aware datetimes, timeouts
timedeltas, params and metadata dicts, unset fields None. Each value keeps the message it
came from as `proto`, for anything not modelled here (`JobError` and `BlobRef`, which model
every field, make theirs on demand).

Params or metadata this client cannot decode (not one JSON object, or beyond the client's
limits) do not stop a Get, a List or a Watch: the job comes back, and only using those
params raises the `InvalidArgument` that says why (see `Undecodable`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from google.protobuf.message import Message

from jobmesh.errors import InvalidArgument
from jobmesh.limits import Limits
from jobmesh.settings import RECEIVED_LIMITS
from jobmesh.v1 import job_pb2


class _ContractEnum(enum.IntEnum):
    """An enum of the contract, with its numbers, so members compare equal to `job_pb2`'s
    constants. A number this SDK does not know (a newer gateway's) becomes a member named
    `UNKNOWN_<n>` rather than an error."""

    def __str__(self) -> str:
        return self.name

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member


class JobState(_ContractEnum):
    """Where a job is in its life: QUEUED → ASSIGNED → RUNNING → SUCCEEDED | FAILED | CANCELLED.
    A retry sends a job back to QUEUED."""

    QUEUED = job_pb2.JOB_STATE_QUEUED
    ASSIGNED = job_pb2.JOB_STATE_ASSIGNED
    RUNNING = job_pb2.JOB_STATE_RUNNING
    SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
    FAILED = job_pb2.JOB_STATE_FAILED
    CANCELLED = job_pb2.JOB_STATE_CANCELLED

    @property
    def terminal(self) -> bool:
        """True for the states a job ends in."""
        return self.value in TERMINAL_STATES


TERMINAL_STATES: frozenset[int] = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
"""The states a job ends in, as the contract's numbers."""


class EventType(_ContractEnum):
    """What a `JobEvent` says: the job changed state, or its attempt reported progress."""

    STATE = job_pb2.JOB_EVENT_TYPE_STATE
    PROGRESS = job_pb2.JOB_EVENT_TYPE_PROGRESS


class Undecodable(Mapping[str, Any]):
    """Params or metadata this client could not decode. The job around them is usable; any
    use of this mapping raises the InvalidArgument saying why. The text itself is in the
    message's `params_json` or `metadata_json` (the value's `proto`)."""

    def __init__(self, problem: InvalidArgument) -> None:
        self.problem = str(problem)

    def _raise(self) -> Any:
        raise InvalidArgument(f"this client could not decode it: {self.problem}")

    def __getitem__(self, key: str) -> Any:
        return self._raise()

    def __iter__(self) -> Iterator[str]:
        return self._raise()  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return self._raise()  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Undecodable) and other.problem == self.problem

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<undecodable: {self.problem}>"


def _json(text: str, where: str, limits: Limits) -> Mapping[str, Any]:
    try:
        return limits.json(text, where)
    except InvalidArgument as e:
        return Undecodable(e)


def _time(message: Message, name: str) -> datetime | None:
    """The time, UTC-aware; None when unset, or outside what a datetime holds (years 1 to
    9999, as the contract's Timestamp is too)."""
    if not message.HasField(name):
        return None
    try:
        when: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None
    return when


def _duration(message: Message, name: str) -> timedelta | None:
    if not message.HasField(name):
        return None
    delta: timedelta = getattr(message, name).ToTimedelta()
    return delta


@dataclass(frozen=True)
class JobError:
    """Why a job or an attempt failed."""

    code: str
    """A short machine-readable code, e.g. "HANDLER_ERROR", "WORKER_LOST" (see `Code`)."""
    message: str
    retryable: bool

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    @property
    def proto(self) -> job_pb2.JobError:
        return job_pb2.JobError(code=self.code, message=self.message, retryable=self.retryable)

    @classmethod
    def from_proto(cls, message: job_pb2.JobError) -> JobError:
        return cls(message.code, message.message, message.retryable)


@dataclass(frozen=True)
class BlobRef:
    """A payload the gateway keeps, uploaded and downloaded in chunks."""

    id: str
    """The lowercase hex SHA-256 of the content."""
    size: int
    """Bytes."""

    @property
    def proto(self) -> job_pb2.BlobRef:
        return job_pb2.BlobRef(id=self.id, size=self.size)

    @classmethod
    def from_proto(cls, message: job_pb2.BlobRef) -> BlobRef:
        return cls(message.id, message.size)


@dataclass(frozen=True)
class JobResult:
    """What a job produced. `AsyncClient.outputs` gives every output, blobs downloaded."""

    outputs: dict[str, bytes]
    """Outputs carried in the message."""
    metadata: Mapping[str, Any]
    """What the handler said about its work (a dict; `Undecodable` if it could not be read)."""
    output_blobs: dict[str, BlobRef]
    """Large outputs the gateway keeps: `download` them, or use `AsyncClient.outputs`."""
    proto: job_pb2.JobResult = field(repr=False, compare=False)

    @classmethod
    def from_proto(
        cls, message: job_pb2.JobResult, limits: Limits = RECEIVED_LIMITS, where: str = "result"
    ) -> JobResult:
        return cls(
            outputs=dict(message.outputs),
            metadata=_json(message.metadata_json, f"{where}.metadata_json", limits),
            output_blobs={n: BlobRef.from_proto(r) for n, r in message.output_blobs.items()},
            proto=message,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried; None takes the gateway's default."""

    max_attempts: int | None
    """Attempts in all, the first included (default 3)."""
    initial_backoff: timedelta | None
    """Delay before the second attempt (default 1 s)."""
    backoff_multiplier: float | None
    """Factor the delay grows by with each attempt (default 2)."""
    max_backoff: timedelta | None
    """Longest delay (default 60 s)."""
    jitter: float | None
    """Fraction of each delay drawn at random (default 0.2)."""

    @classmethod
    def from_proto(cls, message: job_pb2.RetryPolicy) -> RetryPolicy:
        # The contract: unset fields and zeros take the defaults.
        return cls(
            max_attempts=message.max_attempts or None,
            initial_backoff=_duration(message, "initial_backoff"),
            backoff_multiplier=message.backoff_multiplier or None,
            max_backoff=_duration(message, "max_backoff"),
            jitter=message.jitter or None,
        )


@dataclass(frozen=True)
class JobSpec:
    """What was asked to run (`job_spec` makes one to submit)."""

    kind: str
    params: Mapping[str, Any]
    """The job's params (a dict; `Undecodable` if this client could not read them)."""
    inputs: dict[str, bytes]
    """Inputs carried in the message (List leaves them out)."""
    input_blobs: dict[str, BlobRef]
    """Inputs uploaded beforehand."""
    priority: int
    idempotency_key: str
    labels: dict[str, str]
    retry_policy: RetryPolicy
    start_to_close_timeout: timedelta | None
    schedule_to_start_timeout: timedelta | None
    schedule_to_close_timeout: timedelta | None
    retention: timedelta | None
    """How long the job is kept after it ends; None: the gateway's `--retention`."""
    proto: job_pb2.JobSpec = field(repr=False, compare=False)

    @classmethod
    def from_proto(
        cls, message: job_pb2.JobSpec, limits: Limits = RECEIVED_LIMITS, where: str = "spec"
    ) -> JobSpec:
        return cls(
            kind=message.kind,
            params=_json(message.params_json, f"{where}.params_json", limits),
            inputs=dict(message.inputs),
            input_blobs={n: BlobRef.from_proto(r) for n, r in message.input_blobs.items()},
            priority=message.priority,
            idempotency_key=message.idempotency_key,
            labels=dict(message.labels),
            retry_policy=RetryPolicy.from_proto(message.retry_policy),
            start_to_close_timeout=_duration(message, "start_to_close_timeout"),
            schedule_to_start_timeout=_duration(message, "schedule_to_start_timeout"),
            schedule_to_close_timeout=_duration(message, "schedule_to_close_timeout"),
            retention=_duration(message, "retention"),
            proto=message,
        )


@dataclass(frozen=True)
class Attempt:
    """One attempt at running a job."""

    number: int
    worker_id: str
    start_time: datetime | None
    end_time: datetime | None
    error: JobError | None
    """Set when the attempt failed."""
    principal: str = ""
    """The credential of the worker that ran the attempt; with `worker_id`, its identity
    ("" for attempts recorded before gateways kept it)."""

    @classmethod
    def from_proto(cls, message: job_pb2.Attempt) -> Attempt:
        return cls(
            number=message.number,
            worker_id=message.worker_id,
            start_time=_time(message, "start_time"),
            end_time=_time(message, "end_time"),
            error=JobError.from_proto(message.error) if message.HasField("error") else None,
            principal=message.principal,
        )


@dataclass(frozen=True)
class Job:
    """A job as the gateway last reported it."""

    id: str
    tenant: str
    spec: JobSpec
    state: JobState
    attempt: int
    """The current attempt, from 1."""
    progress: float
    """Last reported progress of the current attempt, 0 to 1."""
    progress_message: str
    result: JobResult | None
    """Set when the job SUCCEEDED."""
    error: JobError | None
    """Set when the job FAILED or was CANCELLED."""
    create_time: datetime | None
    update_time: datetime | None
    end_time: datetime | None
    deadline: datetime | None
    """When the job fails with DEADLINE_EXCEEDED (from `schedule_to_close_timeout`)."""
    worker_id: str
    """The worker of the current attempt, if any."""
    attempts: tuple[Attempt, ...]
    event_seq: int
    """The seq of the job's latest event: `watch(job.id, job.event_seq)` sees what comes next."""
    trace_context: dict[str, str]
    """W3C trace context of the Submit that created the job."""
    submitted_by: str
    """The principal that submitted the job (`anonymous` without authentication)."""
    cancelled_by: str
    """The principal that cancelled it, if one did."""
    params_schema: str
    """The version of the kind's params schema that accepted its params ('' for none)."""
    proto: job_pb2.Job = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, message: job_pb2.Job, limits: Limits = RECEIVED_LIMITS) -> Job:
        where = f"job {message.id}"
        return cls(
            id=message.id,
            tenant=message.tenant,
            spec=JobSpec.from_proto(message.spec, limits, f"{where}: spec"),
            state=JobState(message.state),
            attempt=message.attempt,
            progress=message.progress,
            progress_message=message.progress_message,
            result=(
                JobResult.from_proto(message.result, limits, f"{where}: result")
                if message.HasField("result")
                else None
            ),
            error=JobError.from_proto(message.error) if message.HasField("error") else None,
            create_time=_time(message, "create_time"),
            update_time=_time(message, "update_time"),
            end_time=_time(message, "end_time"),
            deadline=_time(message, "deadline"),
            worker_id=message.worker_id,
            attempts=tuple(Attempt.from_proto(a) for a in message.attempts),
            event_seq=message.event_seq,
            trace_context=dict(message.trace_context),
            submitted_by=message.submitted_by,
            cancelled_by=message.cancelled_by,
            params_schema=message.params_schema,
            proto=message,
        )


@dataclass(frozen=True)
class JobEvent:
    """One change of a job; a job's events are numbered 1, 2, 3... by `seq`."""

    job_id: str
    seq: int
    type: EventType
    time: datetime | None
    state: JobState
    """The job's state after this event."""
    attempt: int
    worker_id: str
    progress: float
    """For progress events: 0 to 1."""
    message: str
    """The progress message, or why the state changed."""
    result: JobResult | None
    """On the SUCCEEDED event."""
    error: JobError | None
    """On FAILED and CANCELLED events, and on a retry's QUEUED event."""
    proto: job_pb2.JobEvent = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, message: job_pb2.JobEvent, limits: Limits = RECEIVED_LIMITS) -> JobEvent:
        return cls(
            job_id=message.job_id,
            seq=message.seq,
            type=EventType(message.type),
            time=_time(message, "time"),
            state=JobState(message.state),
            attempt=message.attempt,
            worker_id=message.worker_id,
            progress=message.progress,
            message=message.message,
            result=(
                JobResult.from_proto(message.result, limits, f"job {message.job_id}: result")
                if message.HasField("result")
                else None
            ),
            error=JobError.from_proto(message.error) if message.HasField("error") else None,
            proto=message,
        )
