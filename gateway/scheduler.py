"""The scheduler: priority queues per kind, credits per worker, attempts and retries.

All job state changes happen here, on the event loop, in memory first; each one
is written to the store in order. Jobs not yet terminal stay in memory, so
dispatch never waits on the database. A change is published to watchers only
once the store has committed it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Sequence

from gateway.config import GatewaySettings
from gateway.jobs import (
    S,
    max_attempts,
    new_job_id,
    next_event,
    now,
    retry_delay,
    state_name,
)
from gateway.store import Inserted, JobStore
from gateway.workers import AttemptKey, WorkerSession
from jobmesh.errors import NotFound
from jobmesh.v1 import dispatcher_pb2, job_pb2

log = logging.getLogger(__name__)

# A worker answers an Assign it cannot take (no free slot, unknown kind) with this code.
REJECTED = "REJECTED"

# (-priority, order, job id, attempt): higher priority first, FIFO within one.
QueueEntry = tuple[int, int, str, int]


def _error(code: str, message: str, *, retryable: bool) -> job_pb2.JobError:
    return job_pb2.JobError(code=code, message=message, retryable=retryable)


class Scheduler:
    def __init__(self, settings: GatewaySettings, store: JobStore) -> None:
        self._settings = settings
        self._store = store
        self._active: dict[str, job_pb2.Job] = {}
        self._queues: defaultdict[str, list[QueueEntry]] = defaultdict(list)
        self._order = itertools.count()
        self._owner: dict[str, WorkerSession] = {}
        self._sessions: dict[str, WorkerSession] = {}
        self._kinds_seen: set[str] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._rng = random.Random()

    # --- start and stop -------------------------------------------------------

    async def recover(self) -> int:
        """Takes back the unfinished jobs of a previous run; returns how many."""
        jobs = await self._store.unfinished()
        for job in jobs:
            self._active[job.id] = job
            if job.state == S.JOB_STATE_QUEUED:
                self._enqueue(job)
            else:
                # Its worker's session ended with the previous gateway.
                self._attempt_failed(
                    job,
                    _error(
                        "WORKER_LOST", "the gateway restarted during the attempt", retryable=True
                    ),
                    backoff=False,
                )
        self._dispatch()
        return len(jobs)

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    # --- client calls ---------------------------------------------------------

    def serves(self, kind: str) -> bool:
        """Whether any worker has attached serving the kind since the gateway started."""
        return kind in self._kinds_seen

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def submit(self, tenant: str, specs: Sequence[job_pb2.JobSpec]) -> list[Inserted]:
        jobs, events = [], []
        for spec in specs:
            job = job_pb2.Job(
                id=new_job_id(), tenant=tenant, spec=spec, state=S.JOB_STATE_QUEUED, attempt=1
            )
            job.create_time.CopyFrom(now())
            events.append(next_event(job, message="submitted"))
            jobs.append(job)
        inserted = await self._store.insert(jobs, events)
        answers = []
        for item in inserted:
            if item.existing:
                item.job.spec.ClearField("inputs")
                answers.append(item)
                continue
            # The caller gets the job as accepted; dispatch goes on changing the live one.
            snapshot = job_pb2.Job()
            snapshot.CopyFrom(item.job)
            snapshot.spec.ClearField("inputs")  # the caller has them; Get returns them
            answers.append(Inserted(snapshot))
            self._active[item.job.id] = item.job
            self._enqueue(item.job)
        self._dispatch()
        return answers

    async def get(self, tenant: str, job_id: str) -> job_pb2.Job:
        job = await self._store.get(tenant, job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    async def cancel(self, tenant: str, job_id: str, reason: str) -> job_pb2.Job:
        job = self._active.get(job_id)
        if job is None or job.tenant != tenant:
            # Terminal already (cancel is idempotent), or unknown.
            return await self.get(tenant, job_id)
        error = _error("CANCELLED", reason or "cancelled on request", retryable=False)
        session = self._owner.get(job_id)
        if session is not None:
            session.outbox.put(
                dispatcher_pb2.SessionResponse(
                    cancel=[
                        dispatcher_pb2.Cancel(
                            job_id=job_id, attempt=job.attempt, reason=error.message
                        )
                    ]
                )
            )
            self._close_attempt(job, error)
        await self._end(job, S.JOB_STATE_CANCELLED, error=error)
        return job

    # --- worker sessions ------------------------------------------------------

    @property
    def sessions(self) -> Iterable[WorkerSession]:
        return self._sessions.values()

    def attach(self, session: WorkerSession, running: Iterable[AttemptKey]) -> None:
        # Attempts the worker still runs from before a reconnect hold its slots
        # until it reports them; the gateway already gave those jobs new attempts.
        for key in running:
            session.hold(key, "")
        self._sessions[session.session_id] = session
        self._kinds_seen.update(session.kinds)
        log.info(
            "worker %s attached (session %s, %d slots, kinds %s)",
            session.worker_id,
            session.session_id,
            session.slots,
            ",".join(sorted(session.kinds)),
        )
        self._dispatch()

    def detach(self, session: WorkerSession, reason: str) -> None:
        if self._sessions.pop(session.session_id, None) is None:
            return
        log.info("worker %s detached: %s", session.worker_id, reason)
        error = _error("WORKER_LOST", f"worker {session.worker_id} lost: {reason}", retryable=True)
        for job_id, attempt in list(session.inflight):
            session.release((job_id, attempt))
            job = self._current(job_id, attempt, session)
            if job is not None:
                self._attempt_failed(job, error, backoff=False)
        self._dispatch()

    def handle(self, session: WorkerSession, request: dispatcher_pb2.SessionRequest) -> None:
        """Applies everything one (possibly coalesced) worker message reports."""
        if request.HasField("draining") and not session.draining:
            session.draining = True
            log.info("worker %s is draining", session.worker_id)
        if request.HasField("pong"):
            session.heard(request.pong)
        for accepted in request.accepted:
            job = self._current(accepted.job_id, accepted.attempt, session)
            if job is not None and job.state == S.JOB_STATE_ASSIGNED:
                job.state = S.JOB_STATE_RUNNING
                self._save(job, next_event(job))
        for progress in request.progress:
            job = self._current(progress.job_id, progress.attempt, session)
            if job is not None:
                job.state = S.JOB_STATE_RUNNING
                job.progress = min(1.0, max(0.0, progress.fraction))
                job.progress_message = progress.message
                self._save(
                    job, next_event(job, job_pb2.JOB_EVENT_TYPE_PROGRESS, message=progress.message)
                )
        for completed in request.completed:
            key = (completed.job_id, completed.attempt)
            job = self._current(*key, session)
            session.release(key)
            if job is not None:
                self._close_attempt(job, None)
                job.result.CopyFrom(completed.result)
                job.progress = 1.0
                self._end(job, S.JOB_STATE_SUCCEEDED)
        for failed in request.failed:
            key = (failed.job_id, failed.attempt)
            job = self._current(*key, session)
            session.release(key)
            if job is None:
                continue
            if failed.error.code == REJECTED:
                self._unassign(job)
            else:
                self._attempt_failed(job, failed.error, backoff=True)
        self._dispatch()

    # --- internals ------------------------------------------------------------

    def _current(self, job_id: str, attempt: int, session: WorkerSession) -> job_pb2.Job | None:
        """The job if (job_id, attempt) is its live attempt on this session, else None (fencing)."""
        job = self._active.get(job_id)
        if job is None or job.attempt != attempt or self._owner.get(job_id) is not session:
            return None
        return job

    def _save(self, job: job_pb2.Job, event: job_pb2.JobEvent | None) -> Awaitable[None]:
        return self._store.save(job, event)

    def _enqueue(self, job: job_pb2.Job) -> None:
        entry = (-job.spec.priority, next(self._order), job.id, job.attempt)
        heapq.heappush(self._queues[job.spec.kind], entry)

    def _requeue_later(self, job: job_pb2.Job, delay: float) -> None:
        loop = asyncio.get_running_loop()
        job_id, attempt = job.id, job.attempt

        def fire() -> None:
            self._timers.discard(timer)
            current = self._active.get(job_id)
            if current is not None and current.attempt == attempt:
                self._enqueue(current)
                self._dispatch()

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    def _dispatch(self) -> None:
        for kind in list(self._queues):
            heap = self._queues[kind]
            while heap:
                session = self._pick(kind)
                if session is None:
                    break
                _, _, job_id, attempt = heapq.heappop(heap)
                job = self._active.get(job_id)
                if job is None or job.attempt != attempt or job.state != S.JOB_STATE_QUEUED:
                    continue  # cancelled or superseded while it waited
                self._assign(job, session)
            if not heap:
                del self._queues[kind]

    def _pick(self, kind: str) -> WorkerSession | None:
        """The least-loaded session that can take one more job of the kind."""
        best: WorkerSession | None = None
        for session in self._sessions.values():
            if session.can_take(kind) and (best is None or session.load < best.load):
                best = session
        return best

    def _assign(self, job: job_pb2.Job, session: WorkerSession) -> None:
        job.state = S.JOB_STATE_ASSIGNED
        job.worker_id = session.worker_id
        attempt = job.attempts.add(number=job.attempt, worker_id=session.worker_id)
        attempt.start_time.CopyFrom(now())
        self._owner[job.id] = session
        session.hold((job.id, job.attempt), job.spec.kind)
        session.outbox.put(
            dispatcher_pb2.SessionResponse(
                assign=[
                    dispatcher_pb2.Assign(
                        job_id=job.id,
                        attempt=job.attempt,
                        kind=job.spec.kind,
                        inputs=job.spec.inputs,
                        params=job.spec.params,
                        tenant=job.tenant,
                        labels=job.spec.labels,
                    )
                ]
            )
        )
        self._save(job, next_event(job))

    def _unassign(self, job: job_pb2.Job) -> None:
        """Puts back a job its worker refused before starting it; no attempt was used."""
        self._owner.pop(job.id, None)
        if job.attempts and job.attempts[-1].number == job.attempt:
            del job.attempts[-1]
        job.state = S.JOB_STATE_QUEUED
        job.worker_id = ""
        self._save(job, next_event(job, message="the worker refused the job; queued again"))
        self._enqueue(job)

    def _close_attempt(self, job: job_pb2.Job, error: job_pb2.JobError | None) -> None:
        self._owner.pop(job.id, None)
        if job.attempts and job.attempts[-1].number == job.attempt:
            last = job.attempts[-1]
            last.end_time.CopyFrom(now())
            if error is not None:
                last.error.CopyFrom(error)

    def _attempt_failed(self, job: job_pb2.Job, error: job_pb2.JobError, *, backoff: bool) -> None:
        self._close_attempt(job, error)
        limit = max_attempts(job, self._settings.default_max_attempts)
        if not error.retryable or job.attempt >= limit:
            self._end(job, S.JOB_STATE_FAILED, error=error)
            return
        delay = retry_delay(job, self._rng) if backoff else 0.0
        failed_attempt = job.attempt
        job.attempt += 1
        job.state = S.JOB_STATE_QUEUED
        job.worker_id = ""
        job.progress = 0.0
        job.progress_message = ""
        message = f"attempt {failed_attempt} failed ({error.code}); retry in {delay:.1f}s"
        self._save(job, next_event(job, message=message, error=error))
        if delay > 0:
            self._requeue_later(job, delay)
        else:
            self._enqueue(job)

    def _end(
        self, job: job_pb2.Job, state: int, *, error: job_pb2.JobError | None = None
    ) -> Awaitable[None]:
        job.state = state  # type: ignore[assignment]
        if error is not None:
            job.error.CopyFrom(error)
        job.end_time.CopyFrom(now())
        self._active.pop(job.id, None)
        self._owner.pop(job.id, None)
        log.debug("job %s %s", job.id, state_name(state))
        return self._save(job, next_event(job, message=error.message if error else ""))
