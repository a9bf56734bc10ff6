"""Principals, auth files and hand-driven calls for the credential and tenant tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from jobmesh import AsyncClient, Unauthenticated
from jobmesh.params import Param, schema_proto
from jobmesh.v1 import dispatcher_pb2, dispatcher_pb2_grpc, job_pb2
from tests.cluster import Cluster, Gateway


@dataclass(frozen=True)
class Who:
    name: str
    tenant: str
    roles: tuple[str, ...]
    token: str
    worker_ids: str = ""
    quota: str = ""
    """The quota's inline table, e.g. "{ max_queued = 3 }"; none if empty."""

    def toml(self) -> str:
        lines = [
            "[[principal]]",
            f'name = "{self.name}"',
            f'tenant = "{self.tenant}"',
            "roles = [" + ", ".join(f'"{r}"' for r in self.roles) + "]",
            f'token_sha256 = "{hashlib.sha256(self.token.encode()).hexdigest()}"',
        ]
        if self.worker_ids:
            lines.append(f'worker_ids = "{self.worker_ids}"')
        if self.quota:
            lines.append(f"quota = {self.quota}")
        return "\n".join(lines) + "\n"


ALICE = Who("alice-app", "team-a", ("client",), "alice-7Jx2kq9ZpLw3")
BOB = Who("bob-app", "team-b", ("client",), "bob-Qv8nR4tYc1sM")
ADMIN = Who("ops", "*", ("admin",), "ops-Hd5wP0aXe6Lz")
WORKER = Who("workers", "*", ("worker",), "workers-Ug3mK7bNf2Vr", worker_ids="w-*")
PRINCIPALS = (ALICE, BOB, ADMIN, WORKER)


def write_auth(path: Path, principals: Iterable[Who] = PRINCIPALS) -> Path:
    path.write_text("\n".join(p.toml() for p in principals))
    return path


def secured(cluster: Cluster, *extra: str, principals: Iterable[Who] = PRINCIPALS) -> Gateway:
    """A gateway with an auth file of `principals`, at `cluster.tmp / "auth.toml"`."""
    path = write_auth(cluster.tmp / "auth.toml", principals)
    return cluster.gateway("--auth-file", str(path), *extra)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def until_accepted(client: AsyncClient) -> None:
    """Until the gateway takes the client's credential: it reads its auth and JWKS files
    again within a second of a change."""

    async def accepted() -> bool:
        try:
            await client.list()
        except Unauthenticated:
            return False
        return True

    async with asyncio.timeout(10):
        while not await accepted():  # noqa: ASYNC110  # nothing to wait on but the gateway
            await asyncio.sleep(0.2)


def first_log_line(gw: Gateway) -> str:
    return gw.output().splitlines()[0]


async def refused(call: Awaitable[Any] | grpc.aio.Call) -> grpc.aio.AioRpcError:
    """The error a call (unary, or a stream read to its end) fails with."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as e:
        if isinstance(call, grpc.aio.Call) and e.code() == grpc.StatusCode.INTERNAL:
            # A request still being sent when the server had answered fails on its own
            # ("Internal error from Core"): the call's status is the server's answer.
            return grpc.aio.AioRpcError(
                await call.code(),
                await call.initial_metadata(),
                await call.trailing_metadata(),
                await call.details(),
            )
        return e
    raise AssertionError("the call succeeded")


async def attach_refused(
    channel: grpc.aio.Channel, token: str, attach: dispatcher_pb2.Attach
) -> grpc.aio.AioRpcError:
    """The error a Dispatcher session opened with `token` fails with at its Attach. The
    server may answer before the Attach is even sent: then the call's status says why."""
    session = dispatcher_pb2_grpc.DispatcherStub(channel).Session(metadata=bearer(token))

    async def attach_as_a_worker() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await session.write(dispatcher_pb2.SessionRequest(attach=attach))
        await session.read()

    return await refused(attach_as_a_worker())


class HandWorker:
    """A Dispatcher session driven by hand with a worker token: it answers pings and
    collects what it is assigned, and ends attempts when told to."""

    def __init__(self, gw: Gateway, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(gw.address)
        self.call = dispatcher_pb2_grpc.DispatcherStub(self.channel).Session(metadata=bearer(token))
        self.assigned: asyncio.Queue[dispatcher_pb2.Assign] = asyncio.Queue()
        self._writing = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    async def attach(
        self,
        worker_id: str,
        kind: str = "echo",
        params_schema: Sequence[Param] | None = None,
        slots: int = 2,
    ) -> None:
        """Attaches serving `kind` with `slots`, declaring `params_schema` if given."""
        capacity = dispatcher_pb2.KindCapacity(kind=kind)
        if params_schema is not None:
            capacity.params_schema.CopyFrom(schema_proto(params_schema))
        attach = dispatcher_pb2.Attach(worker_id=worker_id, slots=slots, kinds=[capacity])
        await self._write(dispatcher_pb2.SessionRequest(attach=attach))
        first = await self.call.read()
        assert first is not grpc.aio.EOF
        assert first.HasField("welcome"), first
        self._reader = asyncio.create_task(self._read())

    async def _write(self, request: dispatcher_pb2.SessionRequest) -> None:
        async with self._writing:
            await self.call.write(request)

    async def _read(self) -> None:
        while (message := await self.call.read()) is not grpc.aio.EOF:
            if message.HasField("ping"):
                pong = dispatcher_pb2.Pong(seq=message.ping.seq)
                await self._write(dispatcher_pb2.SessionRequest(pong=pong))
            for assign in message.assign:
                await self._write(
                    dispatcher_pb2.SessionRequest(
                        accepted=[
                            dispatcher_pb2.Accepted(job_id=assign.job_id, attempt=assign.attempt)
                        ]
                    )
                )
                self.assigned.put_nowait(assign)

    async def next_assign(self) -> dispatcher_pb2.Assign:
        async with asyncio.timeout(30):
            return await self.assigned.get()

    async def fail(self, assign: dispatcher_pb2.Assign, *, retryable: bool = False) -> None:
        error = job_pb2.JobError(code="BROKEN", message="given up by hand", retryable=retryable)
        failed = dispatcher_pb2.Failed(job_id=assign.job_id, attempt=assign.attempt, error=error)
        await self._write(dispatcher_pb2.SessionRequest(failed=[failed]))

    async def complete(self, assign: dispatcher_pb2.Assign, result: job_pb2.JobResult) -> None:
        done = dispatcher_pb2.Completed(job_id=assign.job_id, attempt=assign.attempt, result=result)
        await self._write(dispatcher_pb2.SessionRequest(completed=[done]))

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        await self.channel.close()
