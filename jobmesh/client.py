"""The asyncio client of a jobmesh gateway."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import Any, BinaryIO, TypeVar, Unpack

import grpc
from google.protobuf import timestamp_pb2

from jobmesh import blobs, telemetry
from jobmesh.channels import TLS, StrPath, TokenSource, open_channel, tls_config
from jobmesh.convert import Input, JobRequest, SpecOptions, is_terminal, job_spec, parse_state
from jobmesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobFailed,
    Unavailable,
    from_rpc_error,
)
from jobmesh.jobs import BlobRef, Job, JobEvent, JobState
from jobmesh.limits import Limits
from jobmesh.settings import ClientSettings, is_loopback
from jobmesh.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    blob_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A broken Watch is resumed after a pause that doubles from RESUME_INITIAL up to RESUME_MAX
# (with jitter); after RESUME_PATIENCE seconds without a healthy stream the error is raised.
RESUME_INITIAL = 0.1
RESUME_MAX = 2.0
RESUME_PATIENCE = 60.0
# Codes that mean the stream broke, not that the request was wrong: the gateway restarted,
# a proxy dropped an idle stream, the server cancelled streams while shutting down.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True)
class Submitted:
    """What Submit answered."""

    job: Job
    """The job as accepted, QUEUED (or the earlier job, when `existing`)."""
    existing: bool
    """True when the idempotency key matched an earlier job."""
    warnings: tuple[str, ...]
    """Things worth telling the caller, e.g. that no worker serves the kind yet."""

    @classmethod
    def of(cls, response: job_service_pb2.SubmitResponse, limits: Limits) -> Submitted:
        return cls(
            Job.from_proto(response.job, limits), response.existing, tuple(response.warnings)
        )


class AsyncClient:
    """Talks to one gateway over one channel; use it with `async with` or call `close()`.

    Without `gateway`, it is `$JOBMESH_GATEWAY`, else 127.0.0.1:50051. `token` is sent as a
    bearer token with every call (default `$JOBMESH_TOKEN`), or the contents of `token_file`,
    read again when the file changes (default `$JOBMESH_TOKEN_FILE`). `tls` is True to verify the
    gateway against the system's roots, a CA file's path, a `TLSConfig`, or False for
    plaintext (default: the `JOBMESH_TLS*` variables, else plaintext). Every failure is a
    `JobmeshError`.
    """

    def __init__(
        self,
        gateway: str | None = None,
        *,
        token: str | None = None,
        token_file: StrPath | None = None,
        tls: TLS | None = None,
        settings: ClientSettings | None = None,
    ):
        settings = settings or ClientSettings.from_env()
        if gateway is not None:
            settings = replace(settings, gateway=gateway)
        if token is not None or token_file is not None:  # either one replaces both
            settings = replace(settings, token=token or "", token_file=token_file)
        if tls is not None:
            settings = replace(settings, tls=tls_config(tls))
        self.settings = settings
        self._limits = settings.limits
        self._closed = False
        self._token = TokenSource(settings.token, settings.token_file)
        if (
            (settings.token or settings.token_file)
            and settings.tls is None
            and not is_loopback(settings.gateway)
        ):
            log.warning("sending a token to %s without TLS, readable on the way", settings.gateway)
        self._channel = open_channel(
            settings.gateway,
            tls=settings.tls,
            options=[
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
            ],
        )
        self._jobs = job_service_pb2_grpc.JobServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)
        self._blobs = blob_service_pb2_grpc.BlobServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        await self._channel.close(None)

    def _open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the client is closed")

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """Every call's metadata: the bearer token, if any, and the caller's trace context."""
        return (*self._token.metadata(), *_traced())

    async def submit(
        self,
        kind: str,
        *,
        params: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Input] | None = None,
        **options: Unpack[SpecOptions],
    ) -> Submitted:
        """Submits a job; returns at once with it QUEUED. See SpecOptions for the options.

        An input is bytes, a file's path or a `BlobRef`; large ones are uploaded in chunks
        first (see `job_spec`).
        """
        [spec] = await self._specs([job_spec(kind, params=params, inputs=inputs, **options)])
        response = await _unary(
            self._jobs.Submit(job_service_pb2.SubmitRequest(spec=spec), metadata=self._metadata())
        )
        return Submitted.of(response, self._limits)

    async def submit_batch(
        self, specs: Iterable[JobRequest | job_pb2.JobSpec]
    ) -> builtins.list[Submitted]:
        """Submits many jobs (each made by `job_spec`, or a JobSpec message): all are
        accepted or none is. Input files are read, or uploaded when large, first."""
        specs = builtins.list(specs)
        request = job_service_pb2.SubmitBatchRequest(specs=await self._specs(specs))
        response = await _unary(self._jobs.SubmitBatch(request, metadata=self._metadata()))
        return [Submitted.of(r, self._limits) for r in response.results]

    async def _specs(
        self, requests: builtins.list[JobRequest | job_pb2.JobSpec]
    ) -> builtins.list[job_pb2.JobSpec]:
        """The messages to send: files read in or uploaded, large inline inputs uploaded."""
        self._open()
        limit = self.settings.inline_limit
        async with blobs.Uploads(self._blobs, metadata=self._metadata()) as uploads:
            return await asyncio.gather(
                *(
                    uploads.resolve(r.spec, r.files, limit)
                    if isinstance(r, JobRequest)
                    else uploads.resolve(r, {}, limit)
                    for r in requests
                )
            )

    async def upload(self, source: blobs.Payload) -> BlobRef:
        """Uploads bytes or a file in chunks; jobs can then name it among their inputs."""
        self._open()
        ref = await blobs.upload(self._blobs, source, metadata=self._metadata())
        return BlobRef.from_proto(ref)

    async def download(
        self, blob_id: str, sink: BinaryIO | str | os.PathLike[str] | None = None
    ) -> bytes:
        """A blob's content; with `sink`, a path or a binary file, written there chunk by
        chunk instead (and b'' returned). A path gets the whole blob or is left as it was."""
        self._open()
        return await blobs.download(self._blobs, blob_id, sink, metadata=self._metadata())

    async def outputs(self, job: Job) -> dict[str, bytes]:
        """All of a finished job's outputs, downloading those kept as blobs ({} for a job
        without a result)."""
        self._open()
        if job.result is None:
            return {}
        refs = {name: ref.proto for name, ref in job.result.output_blobs.items()}
        fetched = await blobs.fetch(self._blobs, refs, metadata=self._metadata())
        return {**job.result.outputs, **fetched}

    async def get(self, job_id: str) -> Job:
        self._open()
        response = await _unary(
            self._jobs.Get(job_service_pb2.GetRequest(job_id=job_id), metadata=self._metadata())
        )
        return Job.from_proto(response.job, self._limits)

    async def cancel(self, job_id: str, reason: str = "") -> Job:
        """Cancels a queued or running job; cancelling an ended job changes nothing."""
        self._open()
        request = job_service_pb2.CancelRequest(job_id=job_id, reason=reason)
        response = await _unary(self._jobs.Cancel(request, metadata=self._metadata()))
        return Job.from_proto(response.job, self._limits)

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events after `after_seq`, then live ones, ending after the terminal one.

        A stream that breaks is resumed from the last event seen, so none is lost or repeated.
        """
        self._open()
        async for event in self._watch(job_id, after_seq, _Retry(self._channel)):
            yield JobEvent.from_proto(event, self._limits)

    async def _watch(
        self, job_id: str, after_seq: int, retry: _Retry
    ) -> AsyncIterator[job_pb2.JobEvent]:
        last = after_seq
        while True:
            retry.started()
            call = self._jobs.Watch(
                job_service_pb2.WatchRequest(job_id=job_id, after_seq=last),
                metadata=self._metadata(),
            )
            error: grpc.aio.AioRpcError | None = None
            try:
                async for response in call:
                    event = response.event
                    if event.seq <= last:
                        continue
                    last = event.seq
                    retry.healthy()
                    yield event
                    if is_terminal(event.state):
                        return
                # The stream ended cleanly before the terminal event: either `after_seq` was
                # already past it, or the gateway went away mid-stream.
                request = job_service_pb2.GetRequest(job_id=job_id)
                job = await self._jobs.Get(request, metadata=self._metadata())
                if is_terminal(job.job.state):
                    return
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RESUMABLE or not retry.connected:
                    raise from_rpc_error(e) from e
                error = e
            finally:
                call.cancel()
                retry.stopped()
            if not await retry.pause():
                if error is None:
                    raise Unavailable(f"the watch of job {job_id} keeps ending before the job")
                raise from_rpc_error(error) from error
            why = error.code().name if error else "ended early"
            log.info("watch of job %s broke (%s); resuming after seq %d", job_id, why, last)

    async def run(
        self,
        kind: str,
        *,
        params: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Input] | None = None,
        **options: Unpack[SpecOptions],
    ) -> AsyncIterator[JobEvent]:
        """Submits a job and streams its events, like `submit` then `watch`, in one call."""
        [spec] = await self._specs([job_spec(kind, params=params, inputs=inputs, **options)])
        call = self._jobs.Run(job_service_pb2.RunRequest(spec=spec), metadata=self._metadata())
        last: job_pb2.JobEvent | None = None
        try:
            async for response in call:
                last = response.event
                yield JobEvent.from_proto(last, self._limits)
                if is_terminal(last.state):
                    return
        except grpc.aio.AioRpcError as e:
            # Before the first event the job may not exist; resuming is only safe after it.
            if last is None or e.code() not in _RESUMABLE:
                raise from_rpc_error(e) from e
        finally:
            call.cancel()
        if last is None:
            return
        # The Run stream connected: its watch resumes even if the gateway is down right now.
        retry = _Retry(self._channel, connected=True)
        async for event in self._watch(last.job_id, last.seq, retry):
            yield JobEvent.from_proto(event, self._limits)

    async def wait(self, job_id: str, *, check: bool = False) -> Job:
        """Waits until the job ends and returns it; with `check`, raises JobFailed unless it
        SUCCEEDED."""
        job = await self.get(job_id)
        if not job.state.terminal:
            # Only what happens next matters, not the events so far; the Get reached the
            # gateway, so the watch resumes if the gateway goes away now.
            retry = _Retry(self._channel, connected=True)
            async for _ in self._watch(job_id, job.event_seq, retry):
                pass
            job = await self.get(job_id)
        if check and job.state is not JobState.SUCCEEDED:
            code, message = (job.error.code, job.error.message) if job.error else ("", "")
            raise JobFailed(job.id, str(job.state), code, message, job)
        return job

    async def list(
        self,
        *,
        states: Iterable[JobState | str | int] = (),
        kind: str = "",
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[builtins.list[Job], str]:
        """One page of jobs, newest first, without inputs and outputs, and the next page's
        token ('' on the last page). A state is a JobState or its name ('succeeded')."""
        self._open()
        try:
            request = job_service_pb2.ListRequest(
                states=[_state(s) for s in states],
                kind=kind,
                labels=dict(labels or {}),
                created_after=_timestamp(created_after, "created_after"),
                created_before=_timestamp(created_before, "created_before"),
                page_size=page_size,
                page_token=page_token,
            )
        except ValueError as e:  # a number out of its field's range, e.g. page_size=-1
            raise InvalidArgument(str(e)) from None
        response = await _unary(self._jobs.List(request, metadata=self._metadata()))
        jobs = [Job.from_proto(job, self._limits) for job in response.jobs]
        return jobs, response.next_page_token

    async def list_all(
        self,
        *,
        states: Iterable[JobState | str | int] = (),
        kind: str = "",
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[Job]:
        """Every matching job, newest first, fetching page after page."""
        states = builtins.list(states)
        token = ""
        while True:
            jobs, token = await self.list(
                states=states,
                kind=kind,
                labels=labels,
                created_after=created_after,
                created_before=created_before,
                page_size=page_size,
                page_token=token,
            )
            for job in jobs:
                yield job
            if not token:
                return

    async def list_workers(self) -> builtins.list[admin_service_pb2.Worker]:
        """The worker replicas attached to this gateway."""
        self._open()
        request = admin_service_pb2.ListWorkersRequest()
        response = await _unary(self._admin.ListWorkers(request, metadata=self._metadata()))
        return builtins.list(response.workers)

    async def watch_stats(
        self, interval: float = 1.0
    ) -> AsyncIterator[admin_service_pb2.ClusterStats]:
        """The cluster's stats now, then every `interval` seconds (0.1 to 60), until the
        caller stops iterating. A broken stream is resumed; the rates start over then."""
        self._open()
        request = admin_service_pb2.WatchStatsRequest()
        try:
            request.interval.FromNanoseconds(round(interval * 1e9))
        except (ValueError, OverflowError):
            problem = f"must be a number of seconds, got {interval}"
            raise InvalidArgument(problem, "interval") from None
        retry = _Retry(self._channel)
        while True:
            retry.started()
            call = self._admin.WatchStats(request, metadata=self._metadata())
            try:
                async for response in call:
                    retry.healthy()
                    yield response.stats
                error = None
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RESUMABLE or not retry.connected:
                    raise from_rpc_error(e) from e
                error = e
            finally:
                call.cancel()
                retry.stopped()
            if not await retry.pause():
                if error is None:
                    raise Unavailable("the stats stream keeps ending")
                raise from_rpc_error(error) from error
            log.info("stats stream broke (%s); resuming", error.code().name if error else "ended")


def _traced() -> tuple[tuple[str, str], ...]:
    """The caller's trace context as call metadata, so a job's trace continues the caller's.

    Injected by hand rather than by the instrumentation's client interceptors: intercepted
    calls cost grpc.aio noticeably more, on every call, traced or not.
    """
    return tuple(telemetry.inject().items())


async def _unary(call: grpc.aio.UnaryUnaryCall[Any, T]) -> T:
    """The call's response; a failed call raises its jobmesh error."""
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from e


def _state(state: JobState | str | int) -> job_pb2.JobState.ValueType:
    """A state for a request: a JobState, its name, or a number of the contract."""
    return job_pb2.JobState.ValueType(parse_state(state) if isinstance(state, str) else state)


def _timestamp(when: datetime | None, field: str) -> timestamp_pb2.Timestamp | None:
    """A datetime as a Timestamp; a naive one is taken as UTC."""
    if when is None:
        return None
    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromDatetime(when)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"not a time: {e}", field) from None
    return ts


class _Retry:
    """Backoff with jitter between attempts; gives up after RESUME_PATIENCE seconds of failure.

    Only a stream that connected is resumed: until it has had a response or seen the channel
    READY, its failure is raised at once, as a unary call's would be (a gateway that is down).
    """

    def __init__(self, channel: grpc.aio.Channel, *, connected: bool = False) -> None:
        self._channel = channel
        self._delay = RESUME_INITIAL
        self._failing_since: float | None = None
        self._started = 0.0
        self._connected = connected
        self._ready: asyncio.Future[None] | None = None

    @property
    def connected(self) -> bool:
        """True once the stream has had a response or its channel has been READY."""
        ready = self._ready
        if ready is not None and ready.done() and not ready.cancelled():
            self._connected = True
        return self._connected

    def started(self) -> None:
        self._started = asyncio.get_running_loop().time()
        if not self._connected and self._ready is None:
            self._ready = asyncio.ensure_future(self._channel.channel_ready())

    def stopped(self) -> None:
        """Stops looking at the channel; call when the stream ends or breaks."""
        if self._ready is not None:
            self._connected = self.connected
            self._ready.cancel()
            self._ready = None

    def healthy(self) -> None:
        self._connected = True
        self._delay = RESUME_INITIAL
        self._failing_since = None

    async def pause(self) -> bool:
        """Sleeps before the next attempt; False when it is time to give up instead."""
        now = asyncio.get_running_loop().time()
        if now - self._started > RESUME_PATIENCE:
            self.healthy()  # an attempt that stayed up this long was not failing
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since > RESUME_PATIENCE:
            return False
        await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))
        self._delay = min(self._delay * 2, RESUME_MAX)
        return True
