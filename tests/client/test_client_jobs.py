"""The jobs and events the SDK hands out: Python values decoded once from the messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobmesh import (
    Attempt,
    BlobRef,
    EventType,
    InvalidArgument,
    Job,
    JobError,
    JobEvent,
    JobResult,
    JobState,
)
from jobmesh.limits import Limits
from jobmesh.v1 import job_pb2

T0 = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


def _job() -> job_pb2.Job:
    job = job_pb2.Job(
        id="j1",
        tenant="default",
        state=job_pb2.JOB_STATE_SUCCEEDED,
        attempt=2,
        progress=1.0,
        progress_message="done",
        worker_id="w1",
        event_seq=9,
        trace_context={"traceparent": "00-abc-def-01"},
        spec=job_pb2.JobSpec(
            kind="echo",
            params_json='{"n":3,"text":"hi"}',
            inputs={"in": b"data"},
            input_blobs={"big": job_pb2.BlobRef(id="a" * 64, size=5 << 20)},
            priority=5,
            labels={"team": "web"},
        ),
        result=job_pb2.JobResult(
            outputs={"out": b"data"},
            metadata_json='{"width":256,"nested":{"ok":true}}',
            output_blobs={"large": job_pb2.BlobRef(id="b" * 64, size=2 << 20)},
        ),
        attempts=[
            job_pb2.Attempt(
                number=1,
                worker_id="w0",
                error=job_pb2.JobError(code="WORKER_LOST", message="gone", retryable=True),
            ),
            job_pb2.Attempt(number=2, worker_id="w1"),
        ],
    )
    job.create_time.FromDatetime(T0)
    job.end_time.FromDatetime(T0 + timedelta(seconds=3))
    job.spec.retry_policy.max_attempts = 4
    job.spec.retry_policy.initial_backoff.FromSeconds(2)
    job.spec.start_to_close_timeout.FromSeconds(300)
    job.attempts[1].start_time.FromDatetime(T0 + timedelta(seconds=1))
    return job


def test_a_job_is_plain_python() -> None:
    job = Job.from_proto(_job())
    assert job.state is JobState.SUCCEEDED
    assert str(job.state) == "SUCCEEDED"
    assert job.state.terminal
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED  # the contract's numbers still compare
    assert job.spec.params == {"n": 3, "text": "hi"}
    assert isinstance(job.spec.params["n"], int)
    assert job.spec.inputs == {"in": b"data"}
    assert job.spec.input_blobs == {"big": BlobRef("a" * 64, 5 << 20)}
    assert job.spec.labels == {"team": "web"}
    assert job.spec.retry_policy.max_attempts == 4
    assert job.spec.retry_policy.initial_backoff == timedelta(seconds=2)
    assert job.spec.retry_policy.jitter is None  # the gateway's default
    assert job.spec.start_to_close_timeout == timedelta(minutes=5)
    assert job.spec.schedule_to_close_timeout is None
    assert job.result == JobResult(
        outputs={"out": b"data"},
        metadata={"width": 256, "nested": {"ok": True}},
        output_blobs={"large": BlobRef("b" * 64, 2 << 20)},
        proto=job_pb2.JobResult(),
    )
    assert job.error is None
    assert job.create_time == T0
    assert job.end_time == T0 + timedelta(seconds=3)
    assert job.update_time is None
    assert job.create_time is not None
    assert job.create_time.tzinfo is UTC
    assert job.attempts == (
        Attempt(1, "w0", None, None, JobError("WORKER_LOST", "gone", retryable=True)),
        Attempt(2, "w1", T0 + timedelta(seconds=1), None, None),
    )
    assert job.trace_context == {"traceparent": "00-abc-def-01"}
    assert (job.event_seq, job.worker_id, job.attempt) == (9, "w1", 2)
    # What is not modelled stays at hand.
    assert job.proto.spec.params_json == '{"n":3,"text":"hi"}'


def test_a_failed_job_has_its_error_and_no_result() -> None:
    message = job_pb2.Job(
        id="j2",
        state=job_pb2.JOB_STATE_FAILED,
        error=job_pb2.JobError(code="FAILED_ON_PURPOSE", message="boom"),
    )
    job = Job.from_proto(message)
    assert job.result is None
    assert job.error == JobError("FAILED_ON_PURPOSE", "boom", retryable=False)
    assert str(job.error) == "[FAILED_ON_PURPOSE] boom"
    assert job.error.proto == message.error
    assert job.spec.params == {}


def test_events_say_what_happened_by_name() -> None:
    event = job_pb2.JobEvent(
        job_id="j1",
        seq=3,
        type=job_pb2.JOB_EVENT_TYPE_PROGRESS,
        state=job_pb2.JOB_STATE_RUNNING,
        progress=0.5,
        message="decoded",
    )
    event.time.FromDatetime(T0)
    seen = JobEvent.from_proto(event)
    assert (seen.type, seen.state) == (EventType.PROGRESS, JobState.RUNNING)
    assert f"{seen.seq} {seen.state} {seen.progress} {seen.message}" == "3 RUNNING 0.5 decoded"
    assert seen.time == T0
    assert seen.result is None
    assert seen.error is None
    assert not seen.state.terminal

    end = job_pb2.JobEvent(
        job_id="j1",
        seq=4,
        type=job_pb2.JOB_EVENT_TYPE_STATE,
        state=job_pb2.JOB_STATE_SUCCEEDED,
        result=job_pb2.JobResult(metadata_json='{"pid":7}'),
    )
    last = JobEvent.from_proto(end)
    assert last.result is not None
    assert last.result.metadata == {"pid": 7}
    assert last.state.terminal


def test_numbers_from_a_newer_gateway_do_not_crash() -> None:
    event = JobEvent.from_proto(job_pb2.JobEvent(job_id="j", seq=1, type=9, state=42))  # type: ignore[arg-type]
    assert event.state == 42
    assert str(event.state) == "UNKNOWN_42"
    assert not event.state.terminal
    assert str(event.type) == "UNKNOWN_9"
    assert JobState(42) == JobState(42)
    # A time no datetime holds is left out rather than failing the job.
    job = job_pb2.Job(id="j")
    job.create_time.seconds = 2**62
    assert Job.from_proto(job).create_time is None


def test_params_the_client_cannot_decode_do_not_stop_the_job_from_coming_back() -> None:
    message = _job()
    message.spec.params_json = '{"deep": [[[[["too deep"]]]]]}'
    job = Job.from_proto(message, Limits(max_params_depth=3))
    # The rest of the job is there; only using the params says what is wrong.
    assert job.state is JobState.SUCCEEDED
    assert job.result is not None
    assert job.result.metadata == {"width": 256, "nested": {"ok": True}}
    assert "undecodable" in repr(job.spec.params)
    with pytest.raises(InvalidArgument, match=r"job j1: spec\.params_json: nested deeper than 3"):
        job.spec.params["deep"]
    with pytest.raises(InvalidArgument, match="could not decode"):
        dict(job.spec.params)

    message.result.metadata_json = "[1, 2]"
    job = Job.from_proto(message)
    assert job.result is not None
    with pytest.raises(InvalidArgument, match=r"result\.metadata_json: must be a JSON object"):
        len(job.result.metadata)
