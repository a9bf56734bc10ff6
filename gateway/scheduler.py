"""The scheduler: priority queues per kind, credits per worker, attempts, retries, timeouts.

All job state changes happen here, on the event loop, in memory first; each one is
written to the store in order. A change is published to watchers only once the store has
committed it.

Queued jobs live in the store. The gateway holds in memory the running attempts and a
window of each queue's head (`gateway.windows`), so dispatch never waits on the database
and memory does not grow with the queue.

Worker messages reach it as typed verbs (`accepted`, `progressed`, `completed`, `failed`,
`refused`), decoded by `gateway.sessions.apply`; timers call methods that first check with
`_live` that what they were set for still holds.

An attempt is fenced by (job id, attempt number) and by the session that owns it:
anything else a worker says about a job is ignored. When a worker's stream breaks,
its attempts are orphaned for `reattach_grace`: if the same worker comes back and
reports them running (or finished), it takes them back; otherwise they are retried.
"The same worker" is its identity: the credential it attached with and its worker id.
One session per identity is live: a newer one replaces it and its stream is ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from gateway import validation
from gateway.blobs import BlobStore
from gateway.config import GatewaySettings
from gateway.jobs import (
    S,
    duration_seconds,
    max_attempts,
    new_job_id,
    next_event,
    now,
    retry_delay,
    seconds_until,
)
from gateway.mesh import Mesh
from gateway.metrics import GatewayMetrics
from gateway.queues import Entry, QueueKey, Turns
from gateway.quotas import Quota, QuotaOf, SubmitRate, check_usage, unlimited
from gateway.schemas import KindSchemas, SchemaVersion
from gateway.store import ANY_TENANT, Admit, Inserted, JobStore, Placement, Unfinished, Usage
from gateway.timers import Timers
from gateway.tracing import JobTracer
from gateway.windows import Windows
from gateway.workers import AttemptKey, SessionReplaced, WorkerSession
from jobmesh import codes
from jobmesh.codes import Code
from jobmesh.convert import TERMINAL_STATES, state_name
from jobmesh.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from jobmesh.limits import payload_bytes
from jobmesh.logs import job_fields
from jobmesh.params import Schema
from jobmesh.v1 import admin_service_pb2, dispatcher_pb2, job_pb2

log = logging.getLogger(__name__)

_RUNNING = frozenset({S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})
BRING_BACK_WAIT = 25.0
"""Longest an Attach waits for the gateway that ran its attempts to be declared dead (the
worker waits 30 s for its Welcome)."""
CANCEL_WAIT = 5.0
"""Seconds a Cancel waits for the gateway running the job to end it."""
CANCEL_POLL = 0.05
# (-priority, tenant's turn, ready_at, order): what dispatch takes first, least first.
Rank = tuple[int, float, float, int]


class Scheduler:
    def __init__(
        self,
        settings: GatewaySettings,
        store: JobStore,
        blobs: BlobStore,
        metrics: GatewayMetrics | None = None,
        quotas: QuotaOf = unlimited,
    ) -> None:
        """`quotas` gives each tenant's quota and weight (the auth file's)."""
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._metrics = GatewayMetrics() if metrics is None else metrics
        self._limits = settings.limits
        self._active: dict[str, job_pb2.Job] = {}
        self._inputs: dict[str, dict[str, bytes]] = {}
        """Inline inputs of active jobs, kept apart so that writing a job's status, which
        happens at every state change, never copies them; at most `max_inline_memory` bytes."""
        self._inputs_bytes = 0
        self._stored_inputs: set[str] = set()
        """Active jobs whose inline inputs are in the store only, read when they are assigned."""
        self._submitting_bytes = 0
        """Inline input bytes of Submits not yet committed."""
        self._loading: set[asyncio.Task[None]] = set()
        self._queued = 0
        """Jobs in state QUEUED, in the store or in a window."""
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """This gateway's name on the leases of the jobs it claims, and among gateways."""
        self._windows = Windows(store, self.name, settings.queue_window, self, self._metrics)
        """Which queued jobs this gateway holds (leased to it), and wake-ups for the rest."""
        self._mesh: Mesh | None = None
        """The gateways sharing the store with this one, if they may be several."""
        self._quota = quotas
        self._submit_rate = SubmitRate()
        self._turns = Turns()
        self._running = Counter[str]()
        """Tenant -> its jobs ASSIGNED or RUNNING here, for its `max_running`."""
        self._owner: dict[str, WorkerSession] = {}
        self._orphans: dict[str, tuple[int, str, str | None]] = {}
        """Job id -> (attempt, worker id, credential) of attempts whose worker's stream broke;
        the credential is None for those recovered from the store without one (see recover)."""
        self._sessions: dict[str, WorkerSession] = {}
        self._kinds_seen: set[str] = set()
        self._kinds_elsewhere: set[str] = set()
        self._schemas = KindSchemas(store)
        """Versions of each kind's params schema, and which sessions declare which."""
        self._timers = Timers()
        self._rng = random.Random()
        self._tracer = JobTracer()
        self._stopping = False

    # --- start and stop -------------------------------------------------------

    async def recover(self) -> int:
        """Takes back the running attempts of a previous run and learns which queues hold
        jobs in the store (without reading them); returns how many jobs are unfinished."""
        await self._schemas.load()
        # Sharing the store, the running attempts are other gateways' (those of dead ones
        # come back through `bring_back` and `orphaned`).
        jobs = [] if self._mesh is not None else await self._store.running()
        for item in jobs:
            job = self.take_in(item)
            self._metrics.recovered(job)
            self._watch_deadline(job)
            self._running[job.tenant] += 1
            # Its worker may still run it and re-attach to this gateway: the same
            # credential and worker id take it back. Attempts stored before attempts
            # recorded their principal have "", which lets any credential allowed the
            # worker id take it back (as before).
            principal = job.attempts[-1].principal if job.attempts else ""
            self._orphan(job, job.worker_id, principal or None)
        self._queued += await self._windows.recover()
        self._dispatch()
        return len(jobs) + self._queued

    def stop(self) -> None:
        """Stops scheduling. Running attempts stay as they are, for workers to re-attach.

        Workers running nothing are told at once (UNAVAILABLE: they re-dial with backoff):
        their sessions would otherwise hold the gateway's shutdown for the whole grace."""
        self._stopping = True
        self._timers.cancel_all()
        self._windows.stop()
        for session in list(self._sessions.values()):
            if not session.inflight:
                session.close(Unavailable("the gateway is stopping"))

    def join(self, mesh: Mesh) -> None:
        """Shares the store with other gateways (call before `recover`)."""
        self._mesh = mesh

    @property
    def shared(self) -> bool:
        """Whether other gateways share the store."""
        return self._mesh is not None

    # --- other gateways: what `Mesh` asks of the scheduler (a `MeshHost`) -----------------

    def queues_filled(self, queues: list[tuple[str, str]]) -> None:
        for key in queues:
            self._windows.filled(key)
        self._dispatch()

    def cancel_asked(self, job_id: str, reason: str, by: str) -> None:
        if job_id in self._active:
            self._spawn(self._cancel_here(job_id, reason, by))

    async def _cancel_here(self, job_id: str, reason: str, by: str) -> None:
        await self.cancel(ANY_TENANT, job_id, reason, by=by)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._loading.add(task)
        task.add_done_callback(self._loading.discard)

    def orphaned(self, items: list[Unfinished]) -> None:
        for item in items:
            job = self.take_in(item)
            self._running[job.tenant] += 1
            self._metrics.recovered(job)
            lost = Code.WORKER_LOST.error(
                f"gateway of worker {job.worker_id} died and the worker did not come back "
                f"within {self._settings.reattach_grace:g}s"
            )
            self._attempt_failed(job, lost, backoff=False)
        self._dispatch()

    async def learn(self, elsewhere: list[admin_service_pb2.Worker]) -> None:
        self._kinds_elsewhere = {k.kind for worker in elsewhere for k in worker.kinds}
        await self._schemas.load()

    def workers(self) -> admin_service_pb2.ListWorkersResponse:
        return admin_service_pb2.ListWorkersResponse(workers=[s.to_proto() for s in self.sessions])

    async def mesh_workers(self) -> list[admin_service_pb2.Worker]:
        """The workers attached to the other gateways sharing the store."""
        return [] if self._mesh is None else await self._mesh.workers()

    async def bring_back(self, worker_id: str, principal: str, running: list[AttemptKey]) -> None:
        """Takes over the attempts a worker re-attaching here runs for a gateway that died,
        as orphans of that worker, so that `attach` gives them back to it."""
        if self._mesh is None:
            return
        left = [key for key in running if key[0] not in self._active]
        # A gateway that just died is not marked dead yet: wait for it, up to a lease (and
        # within the worker's patience for a Welcome).
        deadline = time.monotonic() + min(self._settings.lease * 1.5, BRING_BACK_WAIT)
        while left:
            for key in list(left):
                item = await self._mesh.store.claim_running(*key)
                if item is None:
                    continue
                left.remove(key)
                job = self.take_in(item)
                self._running[job.tenant] += 1
                self._metrics.recovered(job)
                self._watch_deadline(job)
                self._orphan(job, worker_id, principal)
            if not left or time.monotonic() >= deadline:
                break
            await self._mesh.take_over_now()
            left = [key for key in left if await self._still_elsewhere(*key)]

    async def _still_elsewhere(self, job_id: str, attempt: int) -> bool:
        """Whether the attempt still runs, at another gateway (so worth waiting for)."""
        if job_id in self._active:
            return False
        job = await self._store.get(ANY_TENANT, job_id)
        return job is not None and job.attempt == attempt and job.state in _RUNNING

    async def refresh_queue_ages(self, older_than: float = 0.0) -> None:
        """Reads each queue's oldest ready job into the metrics (`Windows.refresh_ages`)."""
        await self._windows.refresh_ages(older_than)

    async def watch_queue_ages(self) -> None:
        """Keeps the queue-age metrics fresh until cancelled (`Windows.watch_ages`)."""
        await self._windows.watch_ages()

    async def settled(self) -> None:
        """Returns once no claim or store read it started is under way (for tests)."""
        await self._windows.settled()
        while self._loading:
            await asyncio.gather(*self._loading, return_exceptions=True)

    # --- client calls ---------------------------------------------------------

    def serves(self, kind: str) -> bool:
        """Whether any worker has attached serving the kind since the gateway started (or,
        sharing the store, is attached to another gateway serving it)."""
        return kind in self._kinds_seen or kind in self._kinds_elsewhere

    def params_schema(self, kind: str, tenant: str) -> SchemaVersion | None:
        """The params schema `tenant`'s jobs of the kind are checked against, if its
        workers declared one (`KindSchemas.newest`)."""
        return self._schemas.newest(kind, tenant)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def held(self) -> int:
        """Jobs held in memory: the windows' and the running attempts', never the whole queue."""
        return len(self._active)

    async def submit(
        self,
        tenant: str,
        specs: Sequence[job_pb2.JobSpec],
        trace_context: Mapping[str, str] | None = None,
        *,
        submitted_by: str = "",
        params_schemas: Sequence[str] = (),
    ) -> list[Inserted]:
        """Queues new jobs of `tenant`; `submitted_by` is the principal's name they record,
        `params_schemas` the version of the params schema that accepted each spec.

        Refused (ResourceExhausted) past the tenant's quota: its submits per second here,
        its queued jobs and stored bytes store-wide (checked as the jobs are inserted)."""
        self._submit_rate.take(tenant, len(specs), self._quota(tenant).submits_per_second)
        limit = self._settings.max_queued
        queued = self._queued
        if self._mesh is not None:  # every gateway's jobs count
            queued = await self._mesh.store.total_queued()
        if queued + len(specs) > limit:
            raise ResourceExhausted(
                f"the queue is full: {queued} jobs wait (limit {limit}); retry later"
            )
        inline = sum(payload_bytes(spec.inputs) for spec in specs)
        budget = self._settings.max_inline_memory
        if inline and self._submitting_bytes + inline > budget:
            raise ResourceExhausted(
                f"{self._submitting_bytes + inline} bytes of inline inputs are arriving at once "
                f"(limit {budget}); retry later, or upload large inputs with BlobService"
            )
        self._submitting_bytes += inline
        try:
            return await self._insert(tenant, specs, trace_context, submitted_by, params_schemas)
        finally:
            self._submitting_bytes -= inline

    async def _insert(
        self,
        tenant: str,
        specs: Sequence[job_pb2.JobSpec],
        trace_context: Mapping[str, str] | None,
        submitted_by: str,
        params_schemas: Sequence[str] = (),
    ) -> list[Inserted]:
        jobs, events, placements = [], [], []
        at = time.time()
        room = Counter[QueueKey]()
        for spec, params_schema in zip(specs, params_schemas or [""] * len(specs), strict=True):
            job = job_pb2.Job(
                id=new_job_id(),
                tenant=tenant,
                spec=spec,
                state=S.JOB_STATE_QUEUED,
                attempt=1,
                submitted_by=submitted_by,
                params_schema=params_schema,
            )
            job.create_time.CopyFrom(now())
            job.trace_context.update(trace_context or {})
            if spec.HasField("schedule_to_close_timeout"):
                job.deadline.FromNanoseconds(
                    job.create_time.ToNanoseconds() + spec.schedule_to_close_timeout.ToNanoseconds()
                )
            events.append(next_event(job, message="submitted"))
            jobs.append(job)
            placements.append(self._windows.place(job, at, room))
        inserted = await self._store.insert(
            jobs, events, self._admit(tenant), placements=placements
        )
        places = {job.id: p for job, p in zip(jobs, placements, strict=True)}
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
            job = item.job
            self._queued += 1
            self._metrics.submitted(job)
            placement = places[job.id]
            if placement.owner:
                self._activate(job)
                self._windows.enter(job, placement.ready_at)
            else:
                self._windows.left_in_store(job, placement)
        for key in room:
            self._windows.trim(key)
        self._dispatch()
        return answers

    def _admit(self, tenant: str) -> Admit | None:
        """The store's check of the tenant's queued jobs and stored bytes, if it has a
        quota of either."""
        quota = self._quota(tenant)
        if quota.max_queued is None and quota.max_stored_bytes is None:
            return None

        def admit(usage: Usage, adding: Usage) -> None:
            check_usage(tenant, quota, usage, adding)

        return admit

    async def get(self, tenant: str, job_id: str) -> job_pb2.Job:
        job = await self._store.get(tenant, job_id)
        if job is None:
            if await self._store.expired(tenant, job_id):
                raise NotFound(f"job {job_id!r} expired: it ended longer ago than its retention")
            raise NotFound(f"job {job_id!r} not found")
        return job

    async def cancel(self, tenant: str, job_id: str, reason: str, *, by: str = "") -> job_pb2.Job:
        """Cancels `tenant`'s job (any tenant's for ANY_TENANT); `by` is the principal's name
        it records. Another tenant's job is NotFound, as an unknown one."""
        job = self._active.get(job_id)
        if job is None:
            # Queued in the store: claimed, so that no refill takes it in meanwhile.
            job = await self._windows.claim_job(tenant, job_id) or self._active.get(job_id)
        if job is None and self._mesh is not None:
            return await self._cancel_elsewhere(tenant, job_id, reason, by)
        if job is None or tenant not in (ANY_TENANT, job.tenant):
            # Terminal already (cancel is idempotent), or unknown.
            return await self.get(tenant, job_id)
        error = Code.CANCELLED.error(reason or "cancelled on request")
        self._stop_attempt(job, error)
        job.cancelled_by = by
        await self._end(job, S.JOB_STATE_CANCELLED, error=error)
        return job

    async def _cancel_elsewhere(
        self, tenant: str, job_id: str, reason: str, by: str
    ) -> job_pb2.Job:
        """Asks the gateway running the job to cancel it, and waits a little for it to end."""
        job = await self.get(tenant, job_id)
        if job.state in TERMINAL_STATES:
            return job
        assert self._mesh is not None  # only then can the job run elsewhere
        await self._mesh.store.ask_cancel(job_id, reason, by)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT):
                while job.state not in TERMINAL_STATES:
                    await asyncio.sleep(CANCEL_POLL)
                    job = await self.get(tenant, job_id)
        return job

    def holds_blob(self, principal: str, tenant: str, blob_id: str) -> bool:
        """Whether a session of the worker principal holds a live attempt of a job of
        `tenant` (any tenant's for ANY_TENANT) that takes the blob as an input: what a
        worker may download."""
        for job_id, session in self._owner.items():
            if session.principal != principal:
                continue
            job = self._active.get(job_id)
            if job is None or tenant not in (ANY_TENANT, job.tenant):
                continue
            if any(ref.id == blob_id for ref in job.spec.input_blobs.values()):
                return True
        return False

    async def foreign_outputs(
        self, session: WorkerSession, request: dispatcher_pb2.SessionRequest
    ) -> None:
        """Turns each Completed naming an output blob its worker's credential did not upload
        into a Failed (INVALID_RESULT): a worker must not hand a job's tenant someone else's
        blob by naming its hash. Call before `handle`."""
        keep: list[dispatcher_pb2.Completed] = []
        for completed in request.completed:
            foreign = [
                name
                for name, ref in completed.result.output_blobs.items()
                if not await self._store.blob_uploaded_by(session.principal, ref.id)
            ]
            if not foreign:
                keep.append(completed)
                continue
            error = Code.INVALID_RESULT.error(
                f"output blobs {', '.join(sorted(foreign))} were not uploaded by this worker"
            )
            request.failed.add(job_id=completed.job_id, attempt=completed.attempt, error=error)
        if len(keep) != len(request.completed):
            del request.completed[:]
            request.completed.extend(keep)

    # --- worker sessions ------------------------------------------------------

    @property
    def sessions(self) -> Iterable[WorkerSession]:
        return self._sessions.values()

    def attach(
        self,
        session: WorkerSession,
        running: Iterable[AttemptKey],
        schemas: Mapping[str, Schema] | None = None,
    ) -> None:
        """Adds a session, replacing (and closing) the live one of the same identity.

        Raises PermissionDenied if another credential has a live session with the same
        worker id: a credential cannot take over another one's worker.
        """
        same = [s for s in self._sessions.values() if s.worker_id == session.worker_id]
        if any(old.principal != session.principal for old in same):
            raise PermissionDenied(
                f"worker {session.worker_id!r} is attached with another credential; "
                "a credential cannot take over another one's worker (give this worker "
                "another --worker-id)"
            )
        for old in same:
            log.warning(
                "worker %s attached again from %s while its session from %s was live; "
                "closing the older one (two processes with one worker id take turns)",
                session.worker_id,
                session.peer,
                old.peer,
            )
            self.detach(old, f"replaced by a newer session from {session.peer}")
            old.close(
                SessionReplaced(
                    f"worker {session.worker_id} attached again from {session.peer} "
                    "(a newer session); this session is closed"
                )
            )
        self._sessions[session.session_id] = session
        self._kinds_seen.update(session.kinds)
        self._windows.serving(session.kinds, session.tenant, +1)
        self._schemas.attach(session, schemas or {})
        taken_back = 0
        for key in running:
            if self._current(*key, session) is not None:
                taken_back += 1
            elif key not in session.inflight:
                # Superseded or ended meanwhile: it holds a slot until the worker stops it.
                session.hold(key, "")
                self._send_cancel(session, key, "this attempt was superseded")
        log.info(
            "worker %s attached (session %s, %d slots, kinds %s, %d running attempts taken back)",
            session.worker_id,
            session.session_id,
            session.slots,
            ",".join(sorted(session.kinds)),
            taken_back,
        )
        self._dispatch()

    def detach(self, session: WorkerSession, reason: str, *, silent: bool = False) -> None:
        """Forgets a session. Its attempts wait for the worker to re-attach, unless it went
        silent (missed pings), in which case they are retried at once."""
        if self._sessions.pop(session.session_id, None) is None:
            return
        self._windows.serving(session.kinds, session.tenant, -1)
        self._schemas.detach(session)
        log.info("worker %s detached: %s", session.worker_id, reason)
        if self._stopping:
            return
        lost = Code.WORKER_LOST.error(f"worker {session.worker_id} lost: {reason}")
        for job_id, attempt in list(session.inflight):
            session.release((job_id, attempt))
            if self._owner.get(job_id) is not session:
                continue
            job = self._active[job_id]
            if silent:
                self._attempt_failed(job, lost, backoff=False)
            else:
                del self._owner[job_id]
                self._orphan(job, session.worker_id, session.principal)
        self._dispatch()

    # --- what a worker says: `gateway.sessions.apply` decodes its messages into these ------
    # Each is fenced by `_current`; the caller dispatches once the whole message is applied.

    def attached(self, session: WorkerSession) -> bool:
        """Whether the session is live: what a detached or replaced one says is ignored."""
        return self._sessions.get(session.session_id) is session

    def accepted(self, session: WorkerSession, job_id: str, attempt: int) -> None:
        key = (job_id, attempt)
        job = self._current(job_id, attempt, session)
        if job is None:
            if key not in session.inflight:
                # Accepted after the gateway gave up on it: stop it.
                self._send_cancel(session, key, "this attempt was superseded")
        elif job.state == S.JOB_STATE_ASSIGNED:
            self._set_state(job, S.JOB_STATE_RUNNING)
            self._save(job, next_event(job))

    def progressed(self, session: WorkerSession, progress: dispatcher_pb2.Progress) -> None:
        job = self._current(progress.job_id, progress.attempt, session)
        if job is not None:
            self._progress(job, progress)

    def completed(self, session: WorkerSession, completed: dispatcher_pb2.Completed) -> None:
        key = (completed.job_id, completed.attempt)
        job = self._current(*key, session)
        session.release(key)
        if job is None:
            return
        try:
            self._check_result(completed.result)
        except InvalidArgument as e:
            # Clients write outputs to files by name; a name like '../x' must not reach
            # them, and a result too large or too deep would break every Get of the job.
            bad = Code.INVALID_RESULT.error(e.message)
            self._attempt_failed(job, bad, backoff=False)
        else:
            self._close_attempt(job, None)
            job.result.CopyFrom(completed.result)
            job.progress = 1.0
            self._end(job, S.JOB_STATE_SUCCEEDED)

    def failed(self, session: WorkerSession, failed: dispatcher_pb2.Failed) -> None:
        key = (failed.job_id, failed.attempt)
        job = self._current(*key, session)
        session.release(key)
        if job is not None:
            self._attempt_failed(job, self._worker_error(failed.error), backoff=True)

    def refused(self, session: WorkerSession, refused: dispatcher_pb2.Refused) -> None:
        """A worker did not start an attempt: its slots are busier than the gateway knew (a
        handler that outlived its attempt) or it no longer serves the kind. It gets nothing
        more until its next pong; the job goes back to the queue, no attempt used."""
        try:
            reason = validation.refused(refused, self._limits)
        except InvalidArgument as e:
            log.warning("worker %s sent a refusal that names no attempt: %s", session.worker_id, e)
            return
        key = (refused.job_id, refused.attempt)
        job = self._current(*key, session)
        session.release(key)
        if job is None:
            return
        session.paused = True
        self._unassign(job, session.worker_id, reason)

    def dispatch(self) -> None:
        """Hands out queued jobs while some worker can take one (`_dispatch`)."""
        self._dispatch()

    def acknowledge(self, session: WorkerSession, acked: list[dispatcher_pb2.AttemptRef]) -> None:
        """Tells the worker it may forget these results, once what they changed is committed."""
        ack = dispatcher_pb2.SessionResponse(acked=acked)

        def send(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                session.outbox.put(ack)

        asyncio.ensure_future(self._store.barrier()).add_done_callback(send)

    # --- attempts -------------------------------------------------------------

    def _activate(self, job: job_pb2.Job) -> None:
        """Takes a new job in; its inline inputs stay in memory while the budget allows."""
        self._active[job.id] = job
        if job.spec.inputs:
            size = payload_bytes(job.spec.inputs)
            if self._inputs_bytes + size <= self._settings.max_inline_memory:
                self._inputs[job.id] = dict(job.spec.inputs)
                self._inputs_bytes += size
            else:
                self._stored_inputs.add(job.id)
            job.spec.ClearField("inputs")

    def _forget_inputs(self, job_id: str) -> None:
        inputs = self._inputs.pop(job_id, None)
        if inputs is not None:
            self._inputs_bytes -= payload_bytes(inputs)
        self._stored_inputs.discard(job_id)

    def _check_result(self, result: job_pb2.JobResult) -> None:
        validation.result(result, self._limits)
        for name, ref in result.output_blobs.items():
            self._blobs.check(ref, f"output_blobs.{name}")

    def _worker_error(self, error: job_pb2.JobError) -> job_pb2.JobError:
        """A worker's error within limits: its message cut, a code that is not one replaced."""
        code, message = error.code, self._limits.cut(error.message)
        if not code or len(code) > self._limits.max_name or not code.isprintable():
            return Code.INVALID_ERROR.error(message, retryable=error.retryable)
        return codes.error(code, message, error.retryable)

    def _progress(self, job: job_pb2.Job, progress: dispatcher_pb2.Progress) -> None:
        if len(progress.message) > self._limits.max_text:
            error = Code.INVALID_PROGRESS.error(
                f"the worker sent a progress message of {len(progress.message)} characters; "
                f"at most {self._limits.max_text}"
            )
            self._stop_attempt(job, error)
            self._attempt_failed(job, error, backoff=False)
            return
        self._set_state(job, S.JOB_STATE_RUNNING)
        job.progress = min(1.0, max(0.0, progress.fraction))
        job.progress_message = progress.message
        self._tracer.progress(job, job.progress, progress.message)
        if job.event_seq >= self._settings.max_events_per_job:
            self._save(job, None)  # the job shows its progress; its history is full
            return
        self._save(job, next_event(job, job_pb2.JOB_EVENT_TYPE_PROGRESS, message=progress.message))

    def _current(self, job_id: str, attempt: int, session: WorkerSession) -> job_pb2.Job | None:
        """The job if (job_id, attempt) is its live attempt on this session, else None.

        An orphaned attempt of the same worker (credential and worker id) is taken back by
        the new session here.
        """
        job = self._active.get(job_id)
        if job is None or job.attempt != attempt:
            return None
        owner = self._owner.get(job_id)
        if owner is session:
            return job
        orphan = self._orphans.get(job_id)
        if (
            owner is None
            and orphan is not None
            and orphan[:2] == (attempt, session.worker_id)
            and orphan[2] in (None, session.principal)
        ):
            del self._orphans[job_id]
            self._owner[job_id] = session
            if (job_id, attempt) not in session.inflight:
                session.hold((job_id, attempt), job.spec.kind)
            return job
        return None

    def _orphan(self, job: job_pb2.Job, worker_id: str, principal: str | None) -> None:
        self._orphans[job.id] = (job.attempt, worker_id, principal)
        grace = self._settings.reattach_grace
        self._timers.after(grace, self._orphan_expired, job.id, job.attempt, worker_id, grace)

    def _orphan_expired(self, job_id: str, attempt: int, worker_id: str, grace: float) -> None:
        if self._orphans.get(job_id, (0, "", None))[0] != attempt:
            return  # taken back, or ended
        del self._orphans[job_id]
        lost = Code.WORKER_LOST.error(f"worker {worker_id} did not come back within {grace:g}s")
        self._attempt_failed(self._active[job_id], lost, backoff=False)
        self._dispatch()

    def _set_state(self, job: job_pb2.Job, state: int) -> None:
        self._queued += (state == S.JOB_STATE_QUEUED) - (job.state == S.JOB_STATE_QUEUED)
        running = (state in _RUNNING) - (job.state in _RUNNING)
        if running:
            self._running[job.tenant] += running
        self._metrics.state_changed(job, state)
        job.state = state  # type: ignore[assignment]

    def _save(
        self,
        job: job_pb2.Job,
        event: job_pb2.JobEvent | None,
        placement: Placement | None = None,
    ) -> Awaitable[None]:
        return self._store.save(job, event, placement)

    # --- the queue: what `Windows` asks of the scheduler (a `WindowHost`) -----------------

    def take_in(self, item: Unfinished) -> job_pb2.Job:
        """Holds in memory a job claimed from the store, with its inline inputs if the claim
        read them and the budget allows; else they stay there, read at its assignment."""
        job = item.job
        self._active[job.id] = job
        if item.inline_bytes:
            budget = self._settings.max_inline_memory
            if item.inputs is not None and self._inputs_bytes + item.inline_bytes <= budget:
                self._inputs[job.id] = dict(job_pb2.JobSpec.FromString(item.inputs).inputs)
                self._inputs_bytes += item.inline_bytes
            else:
                self._stored_inputs.add(job.id)
        return job

    def holds(self, job_id: str) -> bool:
        return job_id in self._active

    def give_back(self, job_id: str, attempt: int) -> bool:
        job = self._live(job_id, attempt, S.JOB_STATE_QUEUED)
        if job is not None:
            self._drop(job)
        return job is not None

    def entered(self, job: job_pb2.Job, ready_at: float) -> None:
        self._tracer.queued(job, ready_at)
        self._watch_deadline(job)
        if job.spec.HasField("schedule_to_start_timeout"):
            limit = duration_seconds(job.spec.schedule_to_start_timeout)
            delay = ready_at + limit - time.time()
            self._timers.after(delay, self._start_overdue, job.id, job.attempt)

    def fell_due(self, job: job_pb2.Job) -> None:
        if job.HasField("deadline") and seconds_until(job.deadline) <= 0:
            limit = duration_seconds(job.spec.schedule_to_close_timeout)
            error = Code.DEADLINE_EXCEEDED.error(f"the job did not end within {limit:g}s")
        else:
            limit = duration_seconds(job.spec.schedule_to_start_timeout)
            error = Code.SCHEDULE_TO_START_TIMEOUT.error(
                f"no worker started the job within {limit:g}s"
            )
        self._end(job, S.JOB_STATE_FAILED, error=error)

    def _drop(self, job: job_pb2.Job) -> None:
        """Forgets a job: it ended, or went back to the store leased to no one."""
        self._active.pop(job.id, None)
        self._windows.taken(job.id)
        self._forget_inputs(job.id)
        self._owner.pop(job.id, None)
        self._orphans.pop(job.id, None)
        self._tracer.forget(job.id)

    def _requeue(self, job: job_pb2.Job, event: job_pb2.JobEvent, delay: float = 0.0) -> None:
        """Puts the job (just made QUEUED) back in its queue, ready in `delay` seconds: in its
        window if it belongs there (`Windows.place`), else in the store, forgotten until a
        refill claims it again in its turn."""
        placement = self._windows.place(job, time.time(), Counter(), delay)
        self._save(job, event, placement)
        if placement.owner:
            self._orphans.pop(job.id, None)
            self._windows.enter(job, placement.ready_at)
            self._windows.trim((job.spec.kind, job.tenant))
        else:
            self._drop(job)
            self._windows.left_in_store(job, placement)

    def _watch_deadline(self, job: job_pb2.Job) -> None:
        if job.HasField("deadline"):
            self._timers.after(seconds_until(job.deadline), self._deadline_passed, job.id)

    # --- what timers find: each checks with `_live` that its attempt is still current -----

    def _live(
        self,
        job_id: str,
        attempt: int | None = None,
        state: int | None = None,
        session: WorkerSession | None = None,
    ) -> job_pb2.Job | None:
        """The job this gateway holds, if it is still at `attempt`, in `state`, and owned by
        `session` (each when given); else None: what a timer was set for is over."""
        job = self._active.get(job_id)
        if (
            job is None
            or (attempt is not None and job.attempt != attempt)
            or (state is not None and job.state != state)
            or (session is not None and self._owner.get(job_id) is not session)
        ):
            return None
        return job

    def _deadline_passed(self, job_id: str) -> None:
        job = self._live(job_id)
        if job is None:
            return
        limit = duration_seconds(job.spec.schedule_to_close_timeout)
        error = Code.DEADLINE_EXCEEDED.error(f"the job did not end within {limit:g}s")
        self._stop_attempt(job, error)
        self._end(job, S.JOB_STATE_FAILED, error=error)
        self._dispatch()

    def _start_overdue(self, job_id: str, attempt: int) -> None:
        job = self._live(job_id, attempt, S.JOB_STATE_QUEUED)
        if job is None:
            return
        limit = duration_seconds(job.spec.schedule_to_start_timeout)
        error = Code.SCHEDULE_TO_START_TIMEOUT.error(f"no worker started the job within {limit:g}s")
        self._end(job, S.JOB_STATE_FAILED, error=error)

    def _ack_overdue(self, job_id: str, attempt: int, session: WorkerSession) -> None:
        """An Assign not accepted in time goes back to the queue; the worker may never
        have received it."""
        job = self._live(job_id, attempt, S.JOB_STATE_ASSIGNED, session)
        if job is None:
            return
        session.release((job_id, attempt))
        session.stalled = True
        error = Code.ASSIGN_NOT_ACKNOWLEDGED.error(
            f"worker {session.worker_id} did not accept the job within "
            f"{self._settings.ack_timeout:g}s"
        )
        self._stop_attempt(job, error)
        self._attempt_failed(job, error, backoff=False)
        self._dispatch()

    def _attempt_overdue(self, job_id: str, attempt: int) -> None:
        """A backstop: the worker enforces the attempt's timeout and reports TIMEOUT; this
        fires only if it cannot (a stuck worker), after a margin for the report to arrive."""
        job = self._live(job_id, attempt)
        if job is None:
            return
        limit = duration_seconds(job.spec.start_to_close_timeout)
        error = Code.TIMEOUT.error(f"the attempt did not end within {limit:g}s")
        self._stop_attempt(job, error)
        self._attempt_failed(job, error, backoff=True)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hands out queued jobs while some worker can take one: always the job with the
        highest priority among the kinds a worker has room for; within a priority, tenants
        take weighted turns (`Turns`), then the oldest job goes first. A tenant with
        `max_running` jobs assigned or running here waits. One tenant: priority, then age."""
        if self._stopping or (self._mesh is not None and not self._mesh.current):
            return  # a gateway that may have lost its leases hands nothing out
        quotas: dict[str, Quota] = {}
        windows = self._windows
        windows.refill_low()
        if windows.heads_unknown:
            return  # the claimer dispatches once they are in
        while True:
            best: tuple[Rank, QueueKey, WorkerSession] | None = None
            for key in windows.queues.queues():
                tenant = key[1]
                quota = quotas.get(tenant)
                if quota is None:
                    quota = quotas[tenant] = self._quota(tenant)
                if quota.max_running is not None and self._running[tenant] >= quota.max_running:
                    continue
                head = self._live_head(key)
                if head is None:
                    continue
                rank = (head[0], self._turns.tag(tenant), head[1], head[2])
                if best is not None and best[0] <= rank:
                    continue
                session = self._pick(*key, self._active[head[3]].params_schema)
                if session is not None:
                    best = (rank, key, session)
            if best is None:
                return
            _, key, session = best
            popped = windows.queues.pop(key)
            assert popped is not None
            self._turns.took(key[1], quotas[key[1]].weight)
            self._assign(self._active[popped[0]], session)
            windows.refill_if_low(key)

    def _live_head(self, key: QueueKey) -> Entry | None:
        """The queue's next entry, dropping those of jobs cancelled or superseded meanwhile."""
        queues = self._windows.queues
        while (head := queues.head(key)) is not None:
            if self._live(head[3], head[4], S.JOB_STATE_QUEUED) is not None:
                return head
            queues.pop(key)
        return None

    def _pick(self, kind: str, tenant: str, schema: str = "") -> WorkerSession | None:
        """The least-loaded session that can take one more job of the kind, from a worker
        whose credential serves the tenant; preferably one declaring the params `schema`
        that accepted the job (`KindSchemas.preferred`)."""
        best: WorkerSession | None = None
        for session in self._schemas.preferred(kind, tenant, schema) or self._sessions.values():
            if (
                session.can_take(kind)
                and session.tenant in (ANY_TENANT, tenant)
                and (best is None or session.load < best.load)
            ):
                best = session
        return best

    def _assign(self, job: job_pb2.Job, session: WorkerSession) -> None:
        self._set_state(job, S.JOB_STATE_ASSIGNED)
        ready_at = self._windows.taken(job.id)
        self._metrics.assigned(job, None if ready_at is None else time.time() - ready_at)
        job.worker_id = session.worker_id
        attempt = job.attempts.add(
            number=job.attempt, worker_id=session.worker_id, principal=session.principal
        )
        attempt.start_time.CopyFrom(now())
        self._owner[job.id] = session
        session.hold((job.id, job.attempt), job.spec.kind)
        assign = dispatcher_pb2.Assign(
            job_id=job.id,
            attempt=job.attempt,
            kind=job.spec.kind,
            inputs=self._inputs.get(job.id, {}),
            params_json=job.spec.params_json,
            tenant=job.tenant,
            labels=job.spec.labels,
            input_blobs=job.spec.input_blobs,
        )
        assign.trace_context.update(self._tracer.assigned(job))
        if job.spec.HasField("start_to_close_timeout"):
            assign.timeout.CopyFrom(job.spec.start_to_close_timeout)
            self._watch_attempt_timeout(job)
        if job.id in self._stored_inputs:
            self._send_with_stored_inputs(session, assign)
        else:
            session.outbox.put(dispatcher_pb2.SessionResponse(assign=[assign]))
        self._watch_ack(job, session)
        self._save(job, next_event(job))

    def _send_with_stored_inputs(
        self, session: WorkerSession, assign: dispatcher_pb2.Assign
    ) -> None:
        """Reads the inputs the gateway did not keep in memory, then sends the Assign, if the
        attempt is still this session's. If the read fails, the ack timeout retries the job."""
        job_id, attempt = assign.job_id, assign.attempt

        async def send() -> None:
            try:
                inputs = await self._store.inputs(job_id)
            except Exception:
                log.exception("job %s: could not read its inputs", job_id)
                return
            job = self._active.get(job_id)
            if job is not None and job.attempt == attempt and self._owner.get(job_id) is session:
                assign.inputs.update(inputs)
                session.outbox.put(dispatcher_pb2.SessionResponse(assign=[assign]))

        task = asyncio.ensure_future(send())
        self._loading.add(task)
        task.add_done_callback(self._loading.discard)

    def _watch_ack(self, job: job_pb2.Job, session: WorkerSession) -> None:
        limit = self._settings.ack_timeout
        self._timers.after(limit, self._ack_overdue, job.id, job.attempt, session)

    def _watch_attempt_timeout(self, job: job_pb2.Job) -> None:
        limit = duration_seconds(job.spec.start_to_close_timeout)
        margin = self._settings.ping_interval * self._settings.ping_misses + 5.0
        self._timers.after(limit + margin, self._attempt_overdue, job.id, job.attempt)

    def _unassign(self, job: job_pb2.Job, worker_id: str, reason: str) -> None:
        """Puts back a job its worker refused before starting it; no attempt was used."""
        self._owner.pop(job.id, None)
        self._tracer.refused(job, reason)
        if job.attempts and job.attempts[-1].number == job.attempt:
            del job.attempts[-1]
        self._set_state(job, S.JOB_STATE_QUEUED)
        job.worker_id = ""
        message = self._limits.cut(f"worker {worker_id} refused the job; queued again: {reason}")
        log.info(
            "job %s: %s", job.id, message, extra=job_fields(job.id, job.attempt, job.trace_context)
        )
        self._requeue(job, next_event(job, message=message))

    def _send_cancel(self, session: WorkerSession, key: AttemptKey, reason: str) -> None:
        cancel = dispatcher_pb2.Cancel(job_id=key[0], attempt=key[1], reason=reason)
        session.outbox.put(dispatcher_pb2.SessionResponse(cancel=[cancel]))

    def _stop_attempt(self, job: job_pb2.Job, error: job_pb2.JobError) -> None:
        """Ends the current attempt from the gateway's side and tells its worker to stop.

        The worker's slot stays held until it reports the attempt ended.
        """
        self._orphans.pop(job.id, None)
        session = self._owner.get(job.id)
        if session is not None:
            self._send_cancel(session, (job.id, job.attempt), error.message)
        if job.state in (S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING):
            self._close_attempt(job, error)

    def _close_attempt(self, job: job_pb2.Job, error: job_pb2.JobError | None) -> None:
        self._owner.pop(job.id, None)
        self._tracer.attempt_ended(job, error)
        if job.attempts and job.attempts[-1].number == job.attempt:
            last = job.attempts[-1]
            if not last.HasField("end_time"):
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
        self._set_state(job, S.JOB_STATE_QUEUED)
        job.worker_id = ""
        job.progress = 0.0
        job.progress_message = ""
        message = f"attempt {failed_attempt} failed ({error.code}); retry in {delay:.1f}s"
        log.info(
            "job %s: %s",
            job.id,
            message,
            extra=job_fields(job.id, failed_attempt, job.trace_context),
        )
        self._requeue(job, next_event(job, message=message, error=error), delay)

    def _end(
        self, job: job_pb2.Job, state: int, *, error: job_pb2.JobError | None = None
    ) -> Awaitable[None]:
        assert job.state not in TERMINAL_STATES, f"job {job.id} ended twice"
        self._set_state(job, state)
        if error is not None:
            job.error.CopyFrom(error)
        job.end_time.CopyFrom(now())
        self._drop(job)
        self._metrics.ended(job)
        log.log(
            logging.INFO if state == S.JOB_STATE_FAILED else logging.DEBUG,
            "job %s %s%s",
            job.id,
            state_name(job.state),
            f" ({job.error.code}: {job.error.message})" if error is not None else "",
            extra=job_fields(job.id, job.attempt, job.trace_context),
        )
        return self._save(job, next_event(job))
