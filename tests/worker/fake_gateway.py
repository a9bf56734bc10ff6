"""A real Dispatcher server on loopback that a test drives by hand, one message at a time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError

from jobmesh.v1 import dispatcher_pb2, dispatcher_pb2_grpc

TIMEOUT = 30.0

StartWorker = Callable[..., Awaitable[asyncio.subprocess.Process]]
"""Starts `python -m worker_service` dialing the fake gateway (see conftest.py)."""

Item = (
    dispatcher_pb2.Accepted
    | dispatcher_pb2.Progress
    | dispatcher_pb2.Completed
    | dispatcher_pb2.Failed
    | dispatcher_pb2.Refused
    | dispatcher_pb2.Pong
    | dispatcher_pb2.Draining
)


class FakeSession:
    """One stream a worker opened: what it sent, and a way to answer."""

    def __init__(self, attach: dispatcher_pb2.Attach) -> None:
        self.attach = attach
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.ended = asyncio.Event()
        self._out: asyncio.Queue[dispatcher_pb2.SessionResponse | None] = asyncio.Queue()
        self._results: dict[str, Item] = {}

    def send(self, response: dispatcher_pb2.SessionResponse) -> None:
        self._out.put_nowait(response)

    def assign(
        self,
        job_id: str,
        kind: str,
        attempt: int = 1,
        timeout: float | None = None,
        inputs: dict[str, bytes] | None = None,
        **params: Any,
    ) -> None:
        """Assigns a job; its params go as JSON text, as the gateway sends them."""
        a = dispatcher_pb2.Assign(
            job_id=job_id,
            attempt=attempt,
            kind=kind,
            inputs={"in": b"hi"} if inputs is None else inputs,
            params_json=json.dumps(params) if params else "",
        )
        if timeout is not None:
            a.timeout.FromTimedelta(datetime.timedelta(seconds=timeout))
        self.send(dispatcher_pb2.SessionResponse(assign=[a]))

    def cancel(self, job_id: str, attempt: int = 1, reason: str = "") -> None:
        cancel = dispatcher_pb2.Cancel(job_id=job_id, attempt=attempt, reason=reason)
        self.send(dispatcher_pb2.SessionResponse(cancel=[cancel]))

    def ping(self, seq: int) -> None:
        self.send(dispatcher_pb2.SessionResponse(ping=dispatcher_pb2.Ping(seq=seq)))

    def end(self) -> None:
        """Ends the stream from the gateway's side (status OK)."""
        self._out.put_nowait(None)

    async def next(self, *types: type[Item]) -> Item:
        """The next item of one of `types`, skipping the others (e.g. progress)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                item = await self.items.get()
                if isinstance(item, types):
                    return item

    async def settled(self) -> list[Item]:
        """Everything the worker sent up to now: a ping's pong comes after all of it."""
        self.ping(10**9)
        seen: list[Item] = []
        async with asyncio.timeout(TIMEOUT):
            while True:
                item = await self.items.get()
                if isinstance(item, dispatcher_pb2.Pong) and item.seq == 10**9:
                    return seen
                seen.append(item)

    async def result_of(self, job_id: str) -> Item:
        """How the worker ended `job_id`'s assignment: Completed, Failed or Refused; others
        seen meanwhile are kept."""
        ends = (dispatcher_pb2.Completed, dispatcher_pb2.Failed, dispatcher_pb2.Refused)
        async with asyncio.timeout(TIMEOUT):
            while job_id not in self._results:
                item = await self.next(*ends)
                assert isinstance(item, ends)
                self._results[item.job_id] = item
            return self._results.pop(job_id)

    def _record(self, request: dispatcher_pb2.SessionRequest) -> None:
        for field in ("accepted", "progress", "completed", "failed", "refused"):
            for item in getattr(request, field):
                self.items.put_nowait(item)
        if request.HasField("pong"):
            self.items.put_nowait(request.pong)
        if request.HasField("draining"):
            self.items.put_nowait(request.draining)


class _Servicer(dispatcher_pb2_grpc.DispatcherServicer):
    def __init__(self, gateway: FakeGateway) -> None:
        self._gateway = gateway
        self._ids = itertools.count(1)

    async def Session(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[dispatcher_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> None:
        requests = aiter(request_iterator)
        first = await anext(requests)
        if self._gateway.refuse:
            self._gateway.refused += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "refusing workers for now")
        session = FakeSession(first.attach)
        welcome = dispatcher_pb2.Welcome(
            session_id=f"s{next(self._ids)}", ping_interval=duration_pb2.Duration(seconds=5)
        )
        await context.write(dispatcher_pb2.SessionResponse(welcome=welcome))
        self._gateway.sessions.put_nowait(session)

        async def read() -> None:
            # A message it cannot parse ends the stream, as it does on the gateway.
            with contextlib.suppress(grpc.aio.AioRpcError, DecodeError):
                async for request in requests:
                    session._record(request)
            session._out.put_nowait(None)  # the worker half-closed: end the stream too

        reader = asyncio.create_task(read())
        try:
            while (response := await session._out.get()) is not None:
                await context.write(response)
        finally:
            reader.cancel()
            session.ended.set()


class FakeGateway:
    def __init__(self) -> None:
        self.sessions: asyncio.Queue[FakeSession] = asyncio.Queue()
        self.refuse = False
        self.refused = 0
        """Streams refused while `refuse` was set."""
        self.address = ""
        self._server = grpc.aio.server()

    async def start(self) -> str:
        dispatcher_pb2_grpc.add_DispatcherServicer_to_server(_Servicer(self), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        await self._server.stop(None)

    async def session(self) -> FakeSession:
        """The next stream a worker opens."""
        return await asyncio.wait_for(self.sessions.get(), TIMEOUT)


async def until(condition: Callable[[], bool]) -> None:
    """Polls `condition` (for states no event announces, like a process being gone)."""
    for _ in range(int(TIMEOUT / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition never held")
