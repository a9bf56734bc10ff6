"""The gateway's spans of a job: the wait in the queue, and one span per attempt.

Both are children of the job's Submit span (its context is stored with the job), so a
job's whole life, retries included, is one trace. Each attempt span's context goes to
the worker in its Assign; the worker's spans are its children. Progress reports are
events on the attempt span.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from jobmesh import telemetry
from jobmesh.v1 import job_pb2

_tracer = trace.get_tracer("jobmesh.gateway")


def _attributes(job: job_pb2.Job) -> dict[str, str | int]:
    return {
        telemetry.JOB_ID: job.id,
        telemetry.JOB_KIND: job.spec.kind,
        telemetry.ATTEMPT: job.attempt,
        telemetry.TENANT: job.tenant,
    }


class JobTracer:
    def __init__(self) -> None:
        self._queued_at: dict[str, int] = {}
        self._attempts: dict[str, trace.Span] = {}

    def queued(self, job: job_pb2.Job, ready_at: float) -> None:
        """The job is in this gateway's window of its queue, where it waited from `ready_at`
        (time.time()); its "queue wait" span is made when it is assigned."""
        self._queued_at[job.id] = int(ready_at * 1e9)

    def assigned(self, job: job_pb2.Job) -> dict[str, str]:
        """Records the queue wait, starts the attempt's span; returns its context for Assign."""
        parent = telemetry.extract(job.trace_context)
        attributes = {**_attributes(job), telemetry.WORKER_ID: job.worker_id}
        queued_at = self._queued_at.pop(job.id, None)
        if queued_at is not None:
            wait = _tracer.start_span(
                "queue wait", context=parent, start_time=queued_at, attributes=attributes
            )
            wait.end()
        self.attempt_ended(job, None)  # a stale span, should one be left over
        span = _tracer.start_span(
            f"attempt {job.attempt}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
        )
        self._attempts[job.id] = span
        return telemetry.span_context(span)

    def progress(self, job: job_pb2.Job, fraction: float, message: str) -> None:
        span = self._attempts.get(job.id)
        if span is not None:
            span.add_event("progress", {"fraction": fraction, "message": message})

    def attempt_ended(self, job: job_pb2.Job, error: job_pb2.JobError | None) -> None:
        span = self._attempts.pop(job.id, None)
        if span is None:
            return
        if error is not None:
            span.set_attribute(telemetry.ERROR_CODE, error.code)
            span.add_event("failed", {"code": error.code, "message": error.message})
            if error.code in telemetry.FAULT_CODES:
                span.set_status(Status(StatusCode.ERROR, error.message))
        span.end()

    def refused(self, job: job_pb2.Job, reason: str) -> None:
        """Ends the attempt's span: its worker refused it without starting it. Not an error:
        the job is queued again, no attempt used."""
        span = self._attempts.pop(job.id, None)
        if span is not None:
            span.add_event("refused", {"reason": reason})
            span.end()

    def forget(self, job_id: str) -> None:
        self._queued_at.pop(job_id, None)
        span = self._attempts.pop(job_id, None)
        if span is not None:
            span.end()
