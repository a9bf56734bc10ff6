"""One worker replica: takes assignments within its slots, runs them, reports, drains.

Jobs outlive streams: a broken session does not touch running jobs, and their results
wait in the session's outbox for the next stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata

from google.protobuf.message import DecodeError, EncodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from jobmesh import telemetry
from jobmesh.codes import Code
from jobmesh.errors import JobmeshError
from jobmesh.limits import DEFAULT_LIMITS
from jobmesh.logs import bind_job, job_fields
from jobmesh.params import schema_proto
from jobmesh.v1 import dispatcher_pb2, job_pb2
from worker_service.config import WorkerSettings
from worker_service.executor import Executor
from worker_service.metrics import WorkerMetrics
from worker_service.outcomes import Outcome
from worker_service.payloads import Payloads
from worker_service.progress import ProgressThrottle
from worker_service.registry import HandlerSpec
from worker_service.session import Session
from worker_service.stats import ProcessStats
from worker_service.task import AttemptKey, Task

log = logging.getLogger("worker_service")
_tracer = trace.get_tracer("jobmesh.worker")

# Room for the rest of a Completed message around the result's metadata and inline outputs.
_ENVELOPE_BYTES = 64 * 1024


def jobmesh_version() -> str:
    try:
        return metadata.version("jobmesh")
    except metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass
class _Running:
    kind: str
    task: asyncio.Task[None]
    span: trace.Span
    started: float = field(default_factory=time.monotonic)


class Replica:
    """The state of this replica that outlives any one stream to the gateway."""

    def __init__(
        self,
        settings: WorkerSettings,
        specs: Mapping[str, HandlerSpec],
        executor: Executor,
        stats: ProcessStats,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = WorkerMetrics(slots=settings.slots) if metrics is None else metrics
        self._specs = dict(specs)
        self._executor = executor
        token = settings.token_source()  # one file watch for the session and the blobs
        self._payloads = Payloads(settings, token=token)
        self._stats = stats
        self._session = Session(settings, self, token=token)
        self._running: dict[AttemptKey, _Running] = {}
        self._per_kind: Counter[str] = Counter()
        self._progress = ProgressThrottle(
            lambda item: self._send(dispatcher_pb2.SessionRequest(progress=[item]))
        )
        self._drain_requested = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.jobs_done = 0
        self.jobs_failed = 0

    @property
    def session(self) -> Session:
        return self._session

    @property
    def draining(self) -> bool:
        return self._drain_requested.is_set()

    def drain(self) -> None:
        """Asks the replica to stop taking work and leave when its jobs end; idempotent."""
        self._drain_requested.set()

    async def run(self) -> None:
        """Serves until drained: after `drain()`, in-flight jobs end or the grace runs out."""
        probe = asyncio.create_task(self._stats.probe_loop_lag(), name="jobmesh-loop-lag")
        self._session.start()
        try:
            await self._drain_requested.wait()
            await self._drain()
        finally:
            probe.cancel()
            for running in list(self._running.values()):
                running.task.cancel()
            await asyncio.gather(
                probe, *(r.task for r in self._running.values()), return_exceptions=True
            )
            await self._payloads.close()

    async def _drain(self) -> None:
        grace = self._settings.drain_grace
        log.info("draining: %d job(s) running, waiting up to %g s", len(self._running), grace)
        self._session.send(dispatcher_pb2.SessionRequest(draining=dispatcher_pb2.Draining()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._running:
            log.warning("drain grace over; %d job(s) stopped unfinished", len(self._running))
            for key, running in list(self._running.items()):
                self._executor.cancel(key)
                running.task.cancel()
            await asyncio.gather(*(r.task for r in self._running.values()), return_exceptions=True)
        if await self._session.close():
            log.info("drained; session closed")

    # SessionHandler

    def attach(self) -> dispatcher_pb2.Attach:
        return dispatcher_pb2.Attach(
            worker_id=self._settings.worker_id,
            kinds=[_capacity(spec) for spec in sorted(self._specs.values(), key=lambda s: s.kind)],
            slots=self._settings.slots,
            labels=dict(self._settings.labels),
            version=jobmesh_version(),
            running=[
                dispatcher_pb2.AttemptRef(job_id=job_id, attempt=attempt)
                for job_id, attempt in self._running
            ],
        )

    def on_welcome(self, welcome: dispatcher_pb2.Welcome) -> None:
        if self.draining:  # the new session must hear it too
            self._session.send(dispatcher_pb2.SessionRequest(draining=dispatcher_pb2.Draining()))

    def on_response(self, response: dispatcher_pb2.SessionResponse) -> None:
        if response.HasField("ping"):
            self._pong(response.ping.seq)
        for assign in response.assign:  # before cancels: one message may carry both
            self._take(assign)
        for cancel in response.cancel:
            if self._executor.cancel((cancel.job_id, cancel.attempt), cancel.reason):
                log.info(
                    "job %s attempt %d: cancel requested",
                    cancel.job_id,
                    cancel.attempt,
                    extra=job_fields(cancel.job_id, cancel.attempt),
                )

    # Jobs

    def _take(self, assign: dispatcher_pb2.Assign) -> None:
        key = (assign.job_id, assign.attempt)
        if key in self._running:  # sent again after a reconnect: it runs already
            self._send(dispatcher_pb2.SessionRequest(accepted=[_accepted(key)]))
            return
        reason = self._refusal(assign.kind)
        if reason:
            log.info(
                "job %s attempt %d refused: %s",
                key[0],
                key[1],
                reason,
                extra=job_fields(*key, assign.trace_context),
            )
            # Not a result: no attempt is used and none is acknowledged (see Session).
            refused = dispatcher_pb2.Refused(
                job_id=key[0], attempt=key[1], reason=DEFAULT_LIMITS.cut(reason)
            )
            self._send(dispatcher_pb2.SessionRequest(refused=[refused]))
            return
        self._send(dispatcher_pb2.SessionRequest(accepted=[_accepted(key)]))
        span = _tracer.start_span(
            f"run {assign.kind}",
            context=telemetry.extract(assign.trace_context),
            kind=SpanKind.CONSUMER,
            attributes={
                telemetry.JOB_ID: assign.job_id,
                telemetry.JOB_KIND: assign.kind,
                telemetry.ATTEMPT: assign.attempt,
                telemetry.WORKER_ID: self._settings.worker_id,
                telemetry.TENANT: assign.tenant,
            },
        )
        task = dataclasses.replace(
            Task.from_assign(assign), trace_context=telemetry.span_context(span)
        )

        def on_progress(fraction: float, message: str) -> None:
            if key in self._running:
                self._progress.report(key, fraction, DEFAULT_LIMITS.cut(message))

        if assign.input_blobs:
            outcome = self._with_blobs(task, dict(assign.input_blobs), on_progress)
        else:
            outcome = self._executor.run(task, on_progress)  # cancellable from here on
        self._per_kind[assign.kind] += 1
        self._idle.clear()
        self._running[key] = _Running(
            assign.kind,
            asyncio.create_task(self._run_job(task, outcome), name=f"job-{key[0]}-{key[1]}"),
            span,
        )
        self._metrics.started(assign.kind)

    async def _with_blobs(
        self,
        task: Task,
        refs: dict[str, job_pb2.BlobRef],
        on_progress: Callable[[float, str], None],
    ) -> Outcome:
        fetched = await self._payloads.fetch(refs)
        task = dataclasses.replace(task, inputs={**task.inputs, **fetched})
        return await self._executor.run(task, on_progress)

    def _refusal(self, kind: str) -> str:
        spec = self._specs.get(kind)
        if self.draining:
            return "the worker is draining"
        if spec is None:
            return f"this worker has no handler for kind {kind!r}"
        if self._busy_slots() >= self._settings.slots:
            held = self._executor.held()
            return f"all {self._settings.slots} slots are busy" + (
                f" ({held} held by handlers that outlived their attempt)" if held else ""
            )
        if (
            spec.concurrency
            and self._per_kind[kind] + self._executor.held(kind) >= spec.concurrency
        ):
            return f"kind {kind!r} already runs {spec.concurrency} job(s), its limit"
        return ""

    async def _run_job(self, task: Task, running: Awaitable[Outcome]) -> None:
        key = task.key
        bind_job(task.job_id, task.attempt, task.trace_context)  # for this task's log lines
        try:
            outcome = await running
            if isinstance(outcome, job_pb2.JobResult):
                # Before any size check: what blobs can carry is never too large. The
                # gateway also takes at most `max_inline_bytes` of inline outputs.
                budget = min(
                    self._settings.max_message_bytes - _ENVELOPE_BYTES,
                    DEFAULT_LIMITS.max_inline_bytes,
                )
                await self._payloads.offload(outcome, budget)
        except asyncio.CancelledError:
            self._finish(task, Code.WORKER_SHUTDOWN.error("the worker stopped during the job"))
            raise
        except JobmeshError as exc:  # a blob transfer failed
            log.warning("job %s attempt %d: payload transfer failed: %s", *key, exc)
            outcome = Code.PAYLOAD_TRANSFER_FAILED.error(exc.message)
        except Exception as exc:
            log.exception("job %s attempt %d: the worker failed running it", *task.key)
            outcome = Code.WORKER_ERROR.error(f"{type(exc).__name__}: {exc}")
        self._finish(task, outcome)

    def _finish(self, task: Task, outcome: Outcome) -> None:
        key = task.key
        self._progress.forget(key)
        running = self._running.pop(key, None)
        if running is None:
            return
        outcome, report = _report(key, outcome, self._settings.max_message_bytes)
        self._metrics.finished(task.kind, outcome, time.monotonic() - running.started)
        if not isinstance(outcome, job_pb2.JobResult):
            running.span.set_attribute(telemetry.ERROR_CODE, outcome.code)
            if outcome.code in telemetry.FAULT_CODES:
                running.span.set_status(Status(StatusCode.ERROR, outcome.message))
        running.span.end()
        self._per_kind[task.kind] -= 1
        if isinstance(outcome, job_pb2.JobResult):
            self.jobs_done += 1
        else:
            self.jobs_failed += 1
            log.info("job %s attempt %d failed: %s %s", *key, outcome.code, outcome.message)
        self._send(report)
        if not self._running:
            self._idle.set()

    def _pong(self, seq: int) -> None:
        cpu, rss = self._stats.sample()
        stats = dispatcher_pb2.WorkerStats(
            active_jobs=len(self._running),
            free_slots=max(0, self._settings.slots - self._busy_slots()),
            cpu_percent=cpu,
            rss_bytes=rss,
            loop_lag_seconds=self._stats.take_loop_lag(),
            jobs_done=self.jobs_done,
            jobs_failed=self.jobs_failed,
        )
        self._send(dispatcher_pb2.SessionRequest(pong=dispatcher_pb2.Pong(seq=seq, stats=stats)))

    def _busy_slots(self) -> int:
        # A thread handler that ignored its timeout or cancel is reported, but still runs.
        return len(self._running) + self._executor.held()

    def _send(self, message: dispatcher_pb2.SessionRequest) -> None:
        self._session.send(message)


def _report(
    key: AttemptKey, outcome: Outcome, max_bytes: int
) -> tuple[Outcome, dispatcher_pb2.SessionRequest]:
    """The message that reports `outcome`, and the outcome it reports: a result that does
    not fit one message fails as RESULT_TOO_LARGE; an error's message is cut to size."""
    if isinstance(outcome, job_pb2.JobResult):
        try:
            completed = dispatcher_pb2.Completed(job_id=key[0], attempt=key[1], result=outcome)
            report = dispatcher_pb2.SessionRequest(completed=[completed])
        except (DecodeError, EncodeError, ValueError) as exc:  # `check_result` should prevent it
            outcome = Code.INVALID_RESULT.error(f"the result cannot be encoded: {exc}")
        else:
            size = report.ByteSize()
            if size <= max_bytes:
                return outcome, report
            outcome = Code.RESULT_TOO_LARGE.error(
                f"the result is {size} bytes even with its large outputs in blobs; at most "
                f"{max_bytes} fit in a message (max_message_bytes)"
            )
    error = job_pb2.JobError(
        code=outcome.code, message=DEFAULT_LIMITS.cut(outcome.message), retryable=outcome.retryable
    )
    failed = dispatcher_pb2.Failed(job_id=key[0], attempt=key[1], error=error)
    return error, dispatcher_pb2.SessionRequest(failed=[failed])


def _capacity(spec: HandlerSpec) -> dispatcher_pb2.KindCapacity:
    capacity = dispatcher_pb2.KindCapacity(kind=spec.kind, max_concurrency=spec.concurrency)
    if spec.params is not None:
        # Set even when empty: a kind that takes no params says so.
        capacity.params_schema.CopyFrom(schema_proto(spec.params))
    return capacity


def _accepted(key: AttemptKey) -> dispatcher_pb2.Accepted:
    return dispatcher_pb2.Accepted(job_id=key[0], attempt=key[1])
