"""jobmesh.v1.JobService: what clients call."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from gateway import auth, validation
from gateway.blob_service import BlobAccess
from gateway.blobs import BlobStore
from gateway.jobs import S, ts_seconds
from gateway.scheduler import Scheduler
from gateway.store import Inserted, JobFilter, JobStore
from gateway.watchers import EventHub
from jobmesh import telemetry
from jobmesh.convert import TERMINAL_STATES
from jobmesh.errors import InvalidArgument, ResourceExhausted
from jobmesh.limits import Limits
from jobmesh.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def tenant_of(context: grpc.aio.ServicerContext) -> str:  # type: ignore[type-arg]
    """The tenant whose jobs the caller sees: its principal's, never one from the request
    (`ANY_TENANT` for an admin of every tenant)."""
    return auth.principal().tenant


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer ("ipv4:10.0.0.7:41234" -> "ipv4:10.0.0.7")."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


def trace_context_of(context: grpc.aio.ServicerContext) -> dict[str, str]:  # type: ignore[type-arg]
    """The trace context a new job joins: this call's span when the gateway traces, else the
    caller's context passed through as it came, so the job's logs and the worker's spans
    still carry the caller's trace id."""
    current = telemetry.inject()
    if current:
        return current
    return {
        k: v
        for k, v in context.invocation_metadata() or ()
        if k in TRACE_HEADERS and isinstance(v, str)
    }


class JobService(job_service_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        store: JobStore,
        hub: EventHub,
        blobs: BlobStore,
        *,
        limits: Limits,
        max_batch: int,
        max_watches_per_peer: int,
        max_page_bytes: int,
    ) -> None:
        self._scheduler = scheduler
        self._access = BlobAccess(store, blobs, scheduler.holds_blob)
        self._store = store
        self._hub = hub
        self._limits = limits
        self._max_batch = max_batch
        self._max_watches = max_watches_per_peer
        self._max_page_bytes = max_page_bytes
        self._watches: Counter[str] = Counter()
        """Open Watch and Run streams per peer address."""

    def _response(self, item: Inserted) -> job_service_pb2.SubmitResponse:
        warnings = []
        kind = item.job.spec.kind
        if not item.existing and not self._scheduler.serves(kind):
            warnings.append(
                f"no worker serving kind {kind!r} has attached; "
                "the job waits in the queue until one does"
            )
        return job_service_pb2.SubmitResponse(
            job=item.job, existing=item.existing, warnings=warnings
        )

    async def _check(self, spec: job_pb2.JobSpec, tenant: str, field: str = "spec") -> str:
        """Checks a spec of `tenant`; returns the version of the params schema that accepted
        its params ('' for none)."""
        # The params are stored as the client sent them: checked here, never re-encoded.
        version = self._scheduler.params_schema(spec.kind, tenant)
        validation.spec(spec, self._limits, field, None if version is None else version.schema)
        for name, ref in spec.input_blobs.items():
            await self._access.check(tenant, ref, f"{field}.input_blobs.{name}")
        return "" if version is None else version.digest

    async def _submit(
        self,
        specs: Sequence[job_pb2.JobSpec],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        *,
        batch: bool = False,
    ) -> list[Inserted]:
        """Checks and queues jobs of the caller's tenant, recording who submitted them."""
        who = auth.principal()
        tenant = who.home_tenant
        schemas = [
            await self._check(spec, tenant, f"specs[{i}]" if batch else "spec")
            for i, spec in enumerate(specs)
        ]
        return await self._scheduler.submit(
            tenant, specs, trace_context_of(context), submitted_by=who.name, params_schemas=schemas
        )

    async def Submit(
        self,
        request: job_service_pb2.SubmitRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> job_service_pb2.SubmitResponse:
        [item] = await self._submit([request.spec], context)
        return self._response(item)

    async def SubmitBatch(
        self,
        request: job_service_pb2.SubmitBatchRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> job_service_pb2.SubmitBatchResponse:
        if not request.specs:
            raise InvalidArgument("must hold at least one spec", "specs")
        if len(request.specs) > self._max_batch:
            raise InvalidArgument(f"at most {self._max_batch} specs in one batch", "specs")
        items = await self._submit(request.specs, context, batch=True)
        return job_service_pb2.SubmitBatchResponse(results=[self._response(i) for i in items])

    async def Get(
        self,
        request: job_service_pb2.GetRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> job_service_pb2.GetResponse:
        job_id = validation.job_id(request.job_id)
        return job_service_pb2.GetResponse(
            job=await self._scheduler.get(tenant_of(context), job_id)
        )

    async def Watch(
        self,
        request: job_service_pb2.WatchRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[job_service_pb2.WatchResponse]:
        job_id = validation.job_id(request.job_id)
        with self._watching(context):
            async for event in self._events(tenant_of(context), job_id, request.after_seq):
                yield job_service_pb2.WatchResponse(event=event)

    async def Run(
        self,
        request: job_service_pb2.RunRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[job_service_pb2.RunResponse]:
        with self._watching(context):
            [item] = await self._submit([request.spec], context)
            async for event in self._events(tenant_of(context), item.job.id, 0):
                yield job_service_pb2.RunResponse(event=event)

    async def Cancel(
        self,
        request: job_service_pb2.CancelRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> job_service_pb2.CancelResponse:
        job_id = validation.job_id(request.job_id)
        self._limits.text(request.reason, "reason")
        job = await self._scheduler.cancel(
            tenant_of(context), job_id, request.reason, by=auth.principal().name
        )
        return job_service_pb2.CancelResponse(job=job)

    async def List(
        self,
        request: job_service_pb2.ListRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> job_service_pb2.ListResponse:
        self._limits.items(len(request.states), "states")
        for state in request.states:
            if state not in S.values() or state == S.JOB_STATE_UNSPECIFIED:
                raise InvalidArgument(f"{state} is not a job state", "states")
        if request.kind:
            validation.kind(request.kind, "kind")
        validation.labels(request.labels, "labels")
        after_id = validation.decode_page_token(request.page_token)
        where = JobFilter(
            tenant=tenant_of(context),
            states=tuple(request.states),
            kind=request.kind,
            labels=tuple(sorted(request.labels.items())),
            created_after=(
                ts_seconds(request.created_after) if request.HasField("created_after") else None
            ),
            created_before=(
                ts_seconds(request.created_before) if request.HasField("created_before") else None
            ),
        )
        page = await self._store.list_jobs(
            where, validation.page_size(request.page_size), after_id, self._max_page_bytes
        )
        return job_service_pb2.ListResponse(
            jobs=page.jobs, next_page_token=validation.encode_page_token(page.last_id)
        )

    @contextlib.contextmanager
    def _watching(self, context: grpc.aio.ServicerContext) -> Iterator[None]:  # type: ignore[type-arg]
        """Counts a Watch or Run stream against its peer's limit while it is open."""
        peer = peer_host(context.peer())
        if self._watches[peer] >= self._max_watches:
            raise ResourceExhausted(
                f"{self._watches[peer]} streams are watching from {peer} already "
                f"(limit {self._max_watches}); close some or retry later"
            )
        self._watches[peer] += 1
        try:
            yield
        finally:
            self._watches[peer] -= 1
            if not self._watches[peer]:
                del self._watches[peer]

    async def _events(
        self, tenant: str, job_id: str, after_seq: int
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """Replays stored events after `after_seq`, then live ones, until the terminal event."""
        sub = self._hub.subscribe(job_id)
        try:
            job = await self._scheduler.get(tenant, job_id)
            last = after_seq
            replay = True
            while True:
                if replay:
                    # Subscribed before reading, so nothing falls between the stored
                    # events and the live ones; duplicates are skipped by seq below.
                    sub.lagged = False
                    events = await self._store.events(job_id, last)
                    if not events and job.state in TERMINAL_STATES:
                        return  # after_seq is past the terminal event
                    replay = False
                else:
                    await sub.wait()
                    if sub.lagged:
                        replay = True
                        continue
                    events = list(sub.backlog)
                    sub.backlog.clear()
                for event in events:
                    if event.seq <= last:
                        continue
                    last = event.seq
                    terminal = event.state in TERMINAL_STATES
                    if (
                        terminal
                        and event.state == S.JOB_STATE_SUCCEEDED
                        and not event.HasField("result")
                    ):
                        job = await self._scheduler.get(tenant, job_id)
                        event.result.CopyFrom(job.result)
                    yield event
                    if terminal:
                        return
        finally:
            self._hub.unsubscribe(job_id, sub)
