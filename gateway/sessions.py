"""jobmesh.v1.Dispatcher/Session: the stream each worker replica holds open.

Three things run per session: a reader applying what the worker reports, a
pinger that declares the worker dead when pongs stop, and this coroutine
writing the session's outbox (coalesced) to the stream. Whichever ends first
ends the session; the scheduler then sends its unfinished attempts back to the
queue.

A worker's identity is its credential plus the worker id it declares, which the
credential must allow (`check_worker_id`). A newer session of the same identity
replaces the live one, whose stream then ends ABORTED saying so (`SessionReplaced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fnmatch
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2

from gateway import auth, validation
from gateway.config import GatewaySettings
from gateway.scheduler import Scheduler
from gateway.workers import WorkerSession
from jobmesh.errors import InvalidArgument, PermissionDenied
from jobmesh.v1 import dispatcher_pb2, dispatcher_pb2_grpc

log = logging.getLogger(__name__)

# A worker that dials and says nothing is dropped after this many seconds.
ATTACH_TIMEOUT = 10.0


def check_worker_id(principal: auth.Principal, worker_id: str) -> None:
    """Refuses a worker id the credential may not attach as: one that neither matches its
    `worker_ids` pattern nor, for a client certificate, is the certificate's name."""
    if principal.certificate and worker_id == principal.certificate:
        return
    if principal.worker_ids and fnmatch.fnmatchcase(worker_id, principal.worker_ids):
        return
    allowed = []
    if principal.certificate:
        allowed.append(f"{principal.certificate!r} (its certificate's name)")
    if principal.worker_ids:
        allowed.append(f"a worker id matching {principal.worker_ids!r}")
    if not allowed:
        raise PermissionDenied(
            f"credential {principal.name!r} may not attach workers (it has no worker_ids)"
        )
    raise PermissionDenied(
        f"credential {principal.name!r} may attach only as {' or '.join(allowed)}, "
        f"not as {worker_id!r}"
    )


class Dispatcher(dispatcher_pb2_grpc.DispatcherServicer):
    def __init__(self, scheduler: Scheduler, settings: GatewaySettings) -> None:
        self._scheduler = scheduler
        self._settings = settings
        self._ping_interval = settings.ping_interval
        self._dead_after = settings.ping_interval * settings.ping_misses

    async def Session(  # type: ignore[override]  # writes with context.write, not yield
        self,
        request_iterator: AsyncIterator[dispatcher_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> None:
        requests = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(requests), ATTACH_TIMEOUT)
        except (TimeoutError, StopAsyncIteration):
            raise InvalidArgument("the first message must carry attach", "attach") from None
        if not first.HasField("attach"):
            raise InvalidArgument("the first message must carry attach", "attach")
        attach = first.attach
        schemas = validation.attach(attach, self._settings.limits, self._settings.max_worker_slots)
        principal = auth.principal()
        session = WorkerSession(
            session_id=uuid.uuid4().hex,
            worker_id=attach.worker_id,
            kinds={k.kind: k.max_concurrency for k in attach.kinds},
            slots=attach.slots,
            labels=dict(attach.labels),
            version=attach.version,
            peer=context.peer(),
            principal=principal.name,
            tenant=principal.tenant,
        )
        running = [(r.job_id, r.attempt) for r in attach.running]
        try:
            check_worker_id(principal, session.worker_id)
            # Attempts it runs for a gateway that died are taken over first, so that the
            # results it sends again find them here.
            await self._scheduler.bring_back(session.worker_id, session.principal, running)
            session.last_heard = time.monotonic()  # that wait was the gateway's, not silence
            # Before the Welcome, so that a refusal is the answer to the Attach.
            self._scheduler.attach(session, running, schemas)
        except PermissionDenied as e:
            log.warning("refused an attach from %s: %s", session.peer, e.message)
            raise
        interval = duration_pb2.Duration()
        interval.FromTimedelta(datetime.timedelta(seconds=self._ping_interval))
        tasks: list[asyncio.Task[object]] = []
        reason = "stream ended"
        silent = False
        try:
            await context.write(
                dispatcher_pb2.SessionResponse(
                    welcome=dispatcher_pb2.Welcome(
                        session_id=session.session_id, ping_interval=interval
                    )
                )
            )
            reader = asyncio.create_task(self._read(session, requests))
            pinger = asyncio.create_task(self._ping(session))
            closed = asyncio.create_task(session.closed.wait())
            tasks = [reader, pinger, closed]
            while True:
                take = asyncio.create_task(session.outbox.take())
                done, _ = await asyncio.wait({take, *tasks}, return_when=asyncio.FIRST_COMPLETED)
                if take in done:
                    await context.write(take.result())
                    continue
                take.cancel()
                if closed in done:
                    break
                silent = pinger in done
                ended = pinger if silent else reader
                reason = ended.result() if not ended.cancelled() else "cancelled"
                break
        except asyncio.CancelledError:
            reason = "session cancelled (worker went away or gateway stopping)"
            raise
        except Exception as exc:
            reason = f"stream broke: {exc!r}"
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self._scheduler.detach(session, reason, silent=silent)
        if session.close_error is not None:
            raise session.close_error

    async def _read(
        self, session: WorkerSession, requests: AsyncIterator[dispatcher_pb2.SessionRequest]
    ) -> str:
        try:
            async for request in requests:
                # Only a pong answering a ping proves the worker alive (see WorkerSession.heard).
                if any(c.result.output_blobs for c in request.completed):
                    await self._scheduler.foreign_outputs(session, request)
                apply(self._scheduler, session, request)
        except grpc.aio.AioRpcError as exc:
            return f"stream broke: {exc.code().name}"
        return "worker closed the stream"

    async def _ping(self, session: WorkerSession) -> str:
        # The first ping goes at once, so ListWorkers shows stats from the start.
        seq = 0
        while True:
            silent = time.monotonic() - session.last_heard
            if silent > self._dead_after:
                return f"no answer for {silent:.1f}s"
            seq += 1
            session.pinged = seq
            session.outbox.put(dispatcher_pb2.SessionResponse(ping=dispatcher_pb2.Ping(seq=seq)))
            await asyncio.sleep(self._ping_interval)


def apply(
    scheduler: Scheduler, session: WorkerSession, request: dispatcher_pb2.SessionRequest
) -> None:
    """Applies everything one (possibly coalesced) worker message reports, through the
    scheduler's verbs, then dispatches once."""
    if not scheduler.attached(session):
        return  # detached or replaced: what it still says is fenced off with it
    if request.HasField("draining") and not session.draining:
        session.draining = True
        log.info("worker %s is draining", session.worker_id)
    if request.HasField("pong"):
        session.heard(request.pong)
    if request.accepted or request.completed or request.failed or request.refused:
        session.stalled = False
    for accepted in request.accepted:
        scheduler.accepted(session, accepted.job_id, accepted.attempt)
    for progress in request.progress:
        scheduler.progressed(session, progress)
    for completed in request.completed:
        scheduler.completed(session, completed)
    for failed in request.failed:
        scheduler.failed(session, failed)
    for refused in request.refused:
        scheduler.refused(session, refused)
    ended = [(c.job_id, c.attempt) for c in request.completed]
    ended += [(f.job_id, f.attempt) for f in request.failed]
    if ended:
        acked = [dispatcher_pb2.AttemptRef(job_id=j, attempt=a) for j, a in ended]
        scheduler.acknowledge(session, acked)
    scheduler.dispatch()
