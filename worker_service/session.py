"""The worker's end of `Dispatcher/Session`: dial, attach, pump messages, reconnect.

The session knows nothing of jobs; a `SessionHandler` supplies the Attach and takes what
the gateway sends. What is queued while the stream is down, or was being written when it
broke, goes out after the next Attach. Results (Completed, Failed) are kept until the
gateway acknowledges them and are sent again after every reconnect, because a write that
returned may still have been lost with the connection: the gateway ignores anything
stale (fencing), so a duplicate costs nothing, while a lost result would cost a rerun.
A result that every stream it goes out on breaks without acknowledging is one the gateway
cannot take; after `DELIVERY_TRIES` such streams in a row it is reported as failed
(RESULT_UNDELIVERABLE) instead, so no message is resent forever.

A refusal (Refused) is not a result: the gateway does not acknowledge it, and it is not
kept once written. One still queued, or whose write failed, when a stream breaks goes out
after the next Attach, where it still finds the attempt (the gateway gives a re-attaching
worker its attempts back). One written is not sent again: the gateway may have queued the
job and assigned it anew under the same attempt number, which a late copy would refuse.
If a written one was lost with the stream, the attempt goes the way of the stream's others.

Ends that need an operator are logged as errors, and the session goes on reconnecting with
backoff all the same, never idle: an Attach refused for its credential (a fixed token or
auth file is picked up without a restart), and a stream closed because another process
attached with the same worker id (a duplicate, each kicking the other out on reconnect,
shows in the logs of both; giving up would leave no worker if the newer one goes away).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

import grpc
import grpc.aio

from jobmesh.channels import TokenSource, open_channel
from jobmesh.codes import Code
from jobmesh.errors import JobmeshError
from jobmesh.outbox import Outbox
from jobmesh.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from worker_service.config import WorkerSettings

log = logging.getLogger("worker_service")

# Send an HTTP/2 ping after this long without traffic, so an idle stream through a proxy
# or NAT is neither silently dropped nor left half-dead (Hatchet #3280).
KEEPALIVE_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

# Streams in a row that may end without acknowledging a result sent on them before the
# result is taken for one the gateway cannot read (a message it refuses breaks the stream).
DELIVERY_TRIES = 3

# Statuses that refuse an Attach for the worker's credential or its worker id.
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

AttemptKey = tuple[str, int]


class SessionHandler(Protocol):
    def attach(self) -> dispatcher_pb2.Attach:
        """The Attach to open each new stream with."""
        ...

    def on_welcome(self, welcome: dispatcher_pb2.Welcome) -> None: ...

    def on_response(self, response: dispatcher_pb2.SessionResponse) -> None:
        """Called on the event loop for each message after the Welcome; must not block."""
        ...


class SessionLost(Exception):
    """The stream ended in a way that calls for a reconnect."""


class Session:
    """One logical session over as many streams as reconnects take."""

    def __init__(
        self,
        settings: WorkerSettings,
        handler: SessionHandler,
        *,
        token: TokenSource | None = None,
        welcome_timeout: float = 30.0,
    ) -> None:
        self._settings = settings
        self._token = settings.token_source() if token is None else token
        self._handler = handler
        self._welcome_timeout = welcome_timeout
        self._outbox: Outbox[dispatcher_pb2.SessionRequest] = Outbox()
        # The message being written when a stream broke; it may not have arrived.
        self._unsent: dispatcher_pb2.SessionRequest | None = None
        # Results sent but not yet acknowledged by the gateway, by attempt.
        self._unacked: dict[AttemptKey, dispatcher_pb2.SessionRequest] = {}
        # Unacknowledged results sent on the current stream, and on how many streams in a
        # row each has been sent without an acknowledgement.
        self._tried: set[AttemptKey] = set()
        self._tries: dict[AttemptKey, int] = {}
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._call: (
            grpc.aio.StreamStreamCall[dispatcher_pb2.SessionRequest, dispatcher_pb2.SessionResponse]
            | None
        ) = None
        self._connected = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._half_closed = False
        self._task: asyncio.Task[None] | None = None
        self._refusal = ""
        """The last refusal of Attach logged, so that each is logged once."""
        self.session_id = ""

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Starts connecting in the background; reconnects until `close`."""
        self._task = asyncio.create_task(self._run(), name="jobmesh-session")

    def send(self, message: dispatcher_pb2.SessionRequest) -> None:
        """Queues a message; it is sent on the current stream or after the next Attach."""
        for completed in message.completed:
            kept = dispatcher_pb2.SessionRequest(completed=[completed])
            self._keep((completed.job_id, completed.attempt), kept)
        for failed in message.failed:
            kept = dispatcher_pb2.SessionRequest(failed=[failed])
            self._keep((failed.job_id, failed.attempt), kept)
        if self._unacked:
            self._all_acked.clear()
        self._flushed.clear()
        self._outbox.put(message)

    @property
    def unacknowledged(self) -> int:
        """Results the gateway has not confirmed yet."""
        return len(self._unacked)

    def _keep(self, key: AttemptKey, kept: dispatcher_pb2.SessionRequest) -> None:
        self._unacked[key] = kept
        self._tries.pop(key, None)

    def _acknowledged(self, refs: Iterable[dispatcher_pb2.AttemptRef]) -> None:
        for ref in refs:
            key = (ref.job_id, ref.attempt)
            self._unacked.pop(key, None)
            self._tries.pop(key, None)
        if not self._unacked:
            self._all_acked.set()

    def _count_unheard(self) -> None:
        """Counts the stream that just ended against each result it took but did not
        acknowledge; gives up on those that reach `DELIVERY_TRIES`."""
        for key in self._tried & self._unacked.keys():
            self._tries[key] = self._tries.get(key, 0) + 1
            if self._tries[key] >= DELIVERY_TRIES:
                del self._tries[key]
                self._give_up(key)
        self._tried = set()

    def _give_up(self, key: AttemptKey) -> None:
        """Replaces an undeliverable result with a Failed saying so; drops it if that small
        Failed went unheard too (the gateway then treats the attempt as lost)."""
        kept = self._unacked[key]
        if any(f.error.code == Code.RESULT_UNDELIVERABLE for f in kept.failed):
            log.error(
                "job %s attempt %d: the gateway did not acknowledge its result on %d streams "
                "in a row, even as %s; dropping it",
                *key,
                DELIVERY_TRIES,
                Code.RESULT_UNDELIVERABLE,
            )
            del self._unacked[key]
            if not self._unacked:
                self._all_acked.set()
            return
        log.error(
            "job %s attempt %d: each of %d streams in a row broke after carrying its result "
            "unacknowledged; reporting %s instead",
            *key,
            DELIVERY_TRIES,
            Code.RESULT_UNDELIVERABLE,
        )
        error = Code.RESULT_UNDELIVERABLE.error(
            f"the gateway did not take the result on {DELIVERY_TRIES} connections "
            "in a row (a message it cannot read breaks the connection)"
        )
        failed = dispatcher_pb2.Failed(job_id=key[0], attempt=key[1], error=error)
        self._unacked[key] = dispatcher_pb2.SessionRequest(failed=[failed])

    async def close(self) -> bool:
        """Delivers what is queued, half-closes the stream and waits for the gateway to end it.

        Returns False if that did not happen within `settings.close_timeout` (e.g. the
        gateway is unreachable); the session is stopped either way.
        """
        delivered = False
        timeout = self._settings.close_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._finish()
                delivered = True
        except TimeoutError:
            log.warning("could not deliver everything to the gateway within %.1f s", timeout)
        finally:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        return delivered

    async def _finish(self) -> None:
        while True:
            await self._connected.wait()
            await self._flushed.wait()
            await self._all_acked.wait()
            call = self._call
            if (
                call is not None
                and self._connected.is_set()
                and self._flushed.is_set()
                and self._all_acked.is_set()
            ):
                break
        self._half_closed = True
        await call.done_writing()
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        """Streams, one after another, until `close`: nothing else ends it, because a worker
        that looks alive but has no stream is the zombie of Hatchet #4824."""
        delay = self._settings.reconnect_initial
        failures = 0
        while True:
            welcomed = attached = False
            code: grpc.StatusCode | None = None
            try:
                welcomed = await self._serve_once()
                reason = "the gateway ended the session"
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                reason = f"{code.name}: {exc.details()}"
            except (
                SessionLost,
                grpc.RpcError,
                asyncio.InvalidStateError,
                TimeoutError,
                JobmeshError,  # a TLS file that cannot be read now; it may be back later
            ) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:
                log.exception("session failed unexpectedly")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                attached = self._connected.is_set()
                self._connected.clear()
                self._call = None
            # The gateway ends a session ABORTED only when a newer one of the same worker
            # (credential and worker id) replaces it.
            replaced = attached and code == grpc.StatusCode.ABORTED
            try:
                if replaced:
                    self._tried = set()  # no sign that its results cannot be read
                else:
                    self._count_unheard()
                await self._carry_over()
            except Exception:
                # The results among them are kept in `_unacked` and go again after Attach.
                log.exception("could not carry unsent messages over to the next stream")
                self._unsent = None
                self._outbox = Outbox()
            if self._half_closed:
                return
            if welcomed:
                delay, failures = self._settings.reconnect_initial, 0
            failures += 1
            pause = delay * random.uniform(0.5, 1.0)
            if not self._said_why(code, reason, attached, replaced):
                # Say so once per outage, not on every failed attempt of a long one.
                level = logging.INFO if failures == 1 else logging.DEBUG
                log.log(
                    level, "session with %s down (%s); reconnecting", self._settings.gateway, reason
                )
            await asyncio.sleep(pause)
            delay = min(delay * 2, self._settings.reconnect_max)

    def _said_why(
        self, code: grpc.StatusCode | None, reason: str, attached: bool, replaced: bool
    ) -> bool:
        """Logs an end of the stream that needs an operator as an error; False for others."""
        if attached:
            self._refusal = ""
        if replaced:
            # Its jobs go on running here and are reported at the next Attach.
            log.error(
                "another process attached to %s with this worker's id %r, so the gateway "
                "closed this session (%s). Give each replica its own --worker-id, or stop the "
                "duplicate process; reconnecting with backoff",
                self._settings.gateway,
                self._settings.worker_id,
                reason,
            )
            return True
        if not attached and code in REFUSALS:
            if reason != self._refusal:
                log.error(
                    "the gateway %s refused this worker (%s); retrying every %.0f s at most, "
                    "so a fixed credential or auth file is picked up without a restart",
                    self._settings.gateway,
                    reason,
                    self._settings.reconnect_max,
                )
                self._refusal = reason
            return True
        return False

    async def _serve_once(self) -> bool:
        """One stream from dial to end; True if the gateway welcomed it."""
        size = self._settings.max_message_bytes
        # Dialed anew on each reconnect, so a rotated client certificate or token is read again.
        channel = open_channel(
            self._settings.gateway,
            tls=self._settings.tls_config,
            options=[
                ("grpc.max_send_message_length", size),
                ("grpc.max_receive_message_length", size),
                ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        try:
            call = dispatcher_pb2_grpc.DispatcherStub(channel).Session(
                None, metadata=self._token.metadata()
            )
            attach = self._handler.attach()
            # Attempts whose result is not acknowledged are this worker's still: a gateway
            # that took over from a dead one claims them as it does running ones.
            listed = {(r.job_id, r.attempt) for r in attach.running}
            attach.running.extend(
                dispatcher_pb2.AttemptRef(job_id=job_id, attempt=attempt)
                for job_id, attempt in self._unacked
                if (job_id, attempt) not in listed
            )
            await call.write(dispatcher_pb2.SessionRequest(attach=attach))
            # Not `wait_for`: before Python 3.12 it swallows a cancel (`close`) that
            # arrives as the read completes, and the session would go on after its close.
            async with asyncio.timeout(self._welcome_timeout):
                first = await call.read()
            if not isinstance(first, dispatcher_pb2.SessionResponse) or not first.HasField(
                "welcome"
            ):
                raise SessionLost("the gateway did not answer Attach with Welcome")
            self.session_id = first.welcome.session_id
            log.info(
                "attached to %s as %s (session %s)",
                self._settings.gateway,
                self._settings.worker_id,
                self.session_id,
            )
            self._call = call
            self._tried = set(self._unacked)
            for kept in self._unacked.values():  # maybe lost with the last connection
                again = dispatcher_pb2.SessionRequest()
                again.CopyFrom(kept)  # the outbox merges into what it is given
                self._outbox.put(again)
                self._flushed.clear()
            self._connected.set()
            self._handler.on_welcome(first.welcome)
            self._dispatch(first)
            await _first_to_end(self._read(call), self._write(call))
            return True
        finally:
            await channel.close(None)

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[
            dispatcher_pb2.SessionRequest, dispatcher_pb2.SessionResponse
        ],
    ) -> None:
        while True:
            response = await call.read()
            if not isinstance(response, dispatcher_pb2.SessionResponse):
                return  # EOF: the gateway ended the stream
            self._dispatch(response)

    def _dispatch(self, response: dispatcher_pb2.SessionResponse) -> None:
        if response.acked:
            self._acknowledged(response.acked)
        if not (response.assign or response.cancel or response.HasField("ping")):
            return
        try:
            self._handler.on_response(response)
        except Exception:
            # A bug here must not cost the stream, and with it every running job.
            log.exception("could not handle a message from the gateway")

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[
            dispatcher_pb2.SessionRequest, dispatcher_pb2.SessionResponse
        ],
    ) -> None:
        while True:
            if not self._outbox:
                self._flushed.set()
            message = await self._outbox.take()
            self._unsent = message
            self._tried.update((c.job_id, c.attempt) for c in message.completed)
            self._tried.update((f.job_id, f.attempt) for f in message.failed)
            await call.write(message)
            self._unsent = None

    async def _carry_over(self) -> None:
        """Moves unsent messages, minus stale pongs, into a fresh outbox for the next stream."""
        pending = [self._unsent] if self._unsent is not None else []
        self._unsent = None
        while self._outbox:
            pending.append(await self._outbox.take())
        fresh: Outbox[dispatcher_pb2.SessionRequest] = Outbox()
        for message in pending:
            message.ClearField("pong")
            # Unacknowledged results go again from `_unacked` after the next Attach; refusals
            # go as they are.
            message.ClearField("completed")
            message.ClearField("failed")
            if message.ByteSize():
                fresh.put(message)
        self._outbox = fresh
        if fresh:
            self._flushed.clear()


async def _first_to_end(*coros: Coroutine[Any, Any, None]) -> None:
    """Runs the coroutines until one returns or raises; cancels the rest; re-raises."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # `wait`, not a suppressed `gather`: a cancel of this coroutine (`close`) arriving
        # now must not be swallowed, or the session would go on after its close.
        await asyncio.wait(tasks)
        for task in tasks:  # retrieved here, so none is reported as never retrieved
            if not task.cancelled():
                task.exception()
    for task in done:
        task.result()
