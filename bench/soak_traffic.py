"""Traffic for bench/soak.py: normal jobs, and hostile requests counted by outcome."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from jobmesh import AsyncClient, JobmeshError
from jobmesh.v1 import (
    blob_service_pb2,
    blob_service_pb2_grpc,
    dispatcher_pb2,
    dispatcher_pb2_grpc,
    job_pb2,
    job_service_pb2,
)

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class Normal:
    """One class of normal job."""

    name: str
    kind: str
    size: int
    """Bytes of its input; over the SDK's 1 MiB inline limit it is uploaded as a blob."""
    seconds: float = 0.0
    """How long the handler sleeps (bench/soak_handlers.py)."""
    burst: int = 1
    """Jobs submitted at once. The real workers run one `blackhole` job at a time each, so
    of three at once one is left to the black hole (when there is one)."""


NORMAL_MIX = (
    (0.800, Normal("small", "echo", 16)),
    (0.100, Normal("inline_64k", "echo", 64 * KIB)),
    (0.050, Normal("blob_2m", "echo", 2 * MIB)),
    (0.025, Normal("blackhole", "blackhole", 16, seconds=0.5, burst=3)),
)
NORMAL_TIMEOUT = 120.0  # submit to done; longer counts as a failure
MAX_IN_FLIGHT = 256  # normal jobs at once; the pacer waits beyond it

# Hostile traffic: (share, name), drawn for about `--hostile` of all requests.
HOSTILE_MIX = (
    (0.30, "oversize"),
    (0.30, "deep"),
    (0.15, "stalled_upload"),
    (0.20, "idle_connection"),
    (0.05, "blackhole_worker"),
)
OVERSIZE_PARAMS = 2 * MIB
DEEP_PARAMS = 40
STALL_ANNOUNCED = GIB
STALL_CHUNK = 64 * KIB
STALL_PATIENCE = 30.0  # an upload the gateway has not dropped by then counts as "held"
IDLE_HOLD = (20.0, 60.0)  # seconds a raw TCP connection is held, drawn uniformly
BLACKHOLE_SLOTS = 4
BLACKHOLE_PATIENCE = 60.0  # a black hole still attached by then counts as "not_dead"
RPC_TIMEOUT = 30.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def draw(mix: tuple[tuple[float, Any], ...], rng: random.Random) -> Any:
    return rng.choices([m[1] for m in mix], [m[0] for m in mix])[0]


def interleave(mix: tuple[tuple[float, Any], ...]) -> Iterator[Any]:
    """The mix's items in their shares, evenly spread (smooth weighted round-robin)."""
    total = sum(share for share, _ in mix)
    credit = [0.0] * len(mix)
    while True:
        for i, (share, _) in enumerate(mix):
            credit[i] += share
        best = max(range(len(mix)), key=credit.__getitem__)
        credit[best] -= total
        yield mix[best][1]


# --- what is counted ---------------------------------------------------------------------


@dataclass
class Window:
    """What happened between two reports (or over the whole run)."""

    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    succeeded: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    hostile: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def latency(self) -> dict[str, Any]:
        """p50 and p99 of all normal jobs, and p99 of each class, in ms."""
        every = [x for xs in self.latencies.values() for x in xs]
        return {
            "p50_ms": ms(percentile(every, 0.5)),
            "p99_ms": ms(percentile(every, 0.99)),
            "p99_ms_by_class": {
                k: ms(percentile(v, 0.99)) for k, v in sorted(self.latencies.items())
            },
        }

    def hostile_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(sorted(v.items())) for k, v in sorted(self.hostile.items())}


@dataclass
class Tally:
    now: Window = field(default_factory=Window)
    total: Window = field(default_factory=Window)
    in_flight: int = 0
    # How long the gateway took to drop a stalled upload, to declare a black hole dead.
    drop_seconds: list[float] = field(default_factory=list)
    dead_seconds: list[float] = field(default_factory=list)
    idle_closed_seconds: list[float] = field(default_factory=list)
    blackhole_assigns: int = 0

    def success(self, name: str, latency: float) -> None:
        for w in (self.now, self.total):
            w.succeeded += 1
            w.latencies[name].append(latency)

    def failure(self, why: str) -> None:
        for w in (self.now, self.total):
            w.failed += 1
            w.failures[why] += 1

    def hostile(self, name: str, outcome: str) -> None:
        for w in (self.now, self.total):
            w.hostile[name][outcome] += 1

    def cut(self) -> Window:
        window, self.now = self.now, Window()
        return window


# --- traffic -----------------------------------------------------------------------------


def rpc_code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, JobmeshError) and isinstance(exc.__cause__, grpc.aio.AioRpcError):
        return exc.__cause__.code().name
    return type(exc).__name__


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def deep_params(depth: int) -> str:
    """JSON text of an object nested `depth` levels deep."""
    return '{"n":' * (depth - 1) + '{"leaf":1}' + "}" * (depth - 1)


def oversize_params(size: int) -> str:
    """JSON text of one object of about `size` bytes."""
    return json.dumps({"pad": "x" * size})


class Traffic:
    """Normal and hostile requests, paced at `rate` per second, until stopped."""

    def __init__(self, address: str, opts: argparse.Namespace, tally: Tally) -> None:
        self.address = address
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.opts = opts
        self.tally = tally
        self.rng = random.Random(opts.seed)
        # Not drawn at random: blob bytes follow the recent 2 MiB jobs, and a random count of
        # them from one minute to the next would read as a trend.
        self.normal_classes = interleave(NORMAL_MIX)
        self.clients = [AsyncClient(address) for _ in range(opts.clients)]
        # Hostile RPCs share one channel; each black hole dials its own, like a real worker.
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 16 * MIB),
                ("grpc.max_receive_message_length", 16 * MIB),
            ],
        )
        # Requests go as bytes and answers are not parsed: an accepted one's answer would
        # only cost the bench time.
        self.submit_raw = self.channel.unary_unary(
            "/jobmesh.v1.JobService/Submit", request_serializer=None, response_deserializer=None
        )
        self.blob_stub = blob_service_pb2_grpc.BlobServiceStub(self.channel)
        self.normal_tasks: set[asyncio.Task[None]] = set()
        self.hostile_tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.blackhole_active = False
        self.sequence = 0
        self.filler = os.urandom(2 * MIB)  # made unique per job by a prefix, cheaply

    async def close(self) -> None:
        for task in self.hostile_tasks:
            task.cancel()
        await asyncio.gather(*self.hostile_tasks, return_exceptions=True)
        for task in self.normal_tasks:
            task.cancel()
        await asyncio.gather(*self.normal_tasks, return_exceptions=True)
        await self.channel.close(None)
        for client in self.clients:
            await client.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.opts.rate
        next_at = loop.time()
        while True:
            next_at = max(next_at + period, loop.time() - period)
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if self.rng.random() < self.opts.hostile:
                self._spawn(self.hostile_tasks, self._hostile())
            else:
                job_class: Normal = next(self.normal_classes)
                for _ in range(job_class.burst):
                    await self.slots.acquire()
                    self._spawn(self.normal_tasks, self._normal(job_class))

    async def drain(self, patience: float) -> None:
        """Waits for the normal jobs in flight; those still out after `patience` s fail."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                while self.normal_tasks:
                    await asyncio.wait(set(self.normal_tasks))

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[None]], coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # normal

    async def _normal(self, job_class: Normal) -> None:
        self.sequence += 1
        n = self.sequence
        size = job_class.size
        client = self.clients[n % len(self.clients)]
        head = f"soak-{n:012d}:".encode()
        payload = head + self.filler[: size - len(head)] if size > len(head) else head[:size]
        self.tally.in_flight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(NORMAL_TIMEOUT):
                submitted = await client.submit(
                    job_class.kind,
                    params={"n": n, "text": "soak", "seconds": job_class.seconds},
                    inputs={"in": payload},
                )
                job = await client.wait(submitted.job.id)
            latency = time.perf_counter() - started
            if job.state != job_pb2.JOB_STATE_SUCCEEDED:
                code = job.error.code or "?"
                self.tally.failure(f"{job_pb2.JobState.Name(job.state)}:{code}")
            elif self._output_size(job) != len(payload):
                self.tally.failure("wrong_output")
            else:
                self.tally.success(job_class.name, latency)
        except TimeoutError:
            self.tally.failure("timeout")
        except asyncio.CancelledError:
            self.tally.failure("unfinished")
            raise
        except Exception as exc:
            self.tally.failure(f"error:{rpc_code(exc)}")
        finally:
            self.tally.in_flight -= 1
            self.slots.release()

    @staticmethod
    def _output_size(job: job_pb2.Job) -> int:
        if "in" in job.result.output_blobs:
            return job.result.output_blobs["in"].size
        return len(job.result.outputs.get("in", b""))

    # hostile

    async def _hostile(self) -> None:
        name = draw(HOSTILE_MIX, self.rng)
        if name == "blackhole_worker" and self.blackhole_active:
            name = draw(tuple(m for m in HOSTILE_MIX if m[1] != "blackhole_worker"), self.rng)
        actions: dict[str, Callable[[], Awaitable[str]]] = {
            "oversize": self._oversize,
            "deep": self._deep,
            "stalled_upload": self._stalled_upload,
            "idle_connection": self._idle_connection,
            "blackhole_worker": self._blackhole,
        }
        try:
            outcome = await actions[name]()
        except asyncio.CancelledError:
            self.tally.hostile(name, "interrupted_at_end")
            raise
        except Exception as exc:
            outcome = f"bench_error:{type(exc).__name__}"
        self.tally.hostile(name, outcome)

    async def _submit(self, request: bytes) -> str:
        # Not through the SDK: it may check params itself, and the gateway is what is tested.
        try:
            await self.submit_raw(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "ACCEPTED"

    async def _oversize(self) -> str:
        return await self._submit_params(oversize_params(OVERSIZE_PARAMS))

    async def _deep(self) -> str:
        return await self._submit_params(deep_params(DEEP_PARAMS))

    async def _submit_params(self, params_json: str) -> str:
        spec = job_pb2.JobSpec(kind="echo", params_json=params_json)
        return await self._submit(job_service_pb2.SubmitRequest(spec=spec).SerializeToString())

    async def _stalled_upload(self) -> str:
        call = self.blob_stub.Upload()  # type: ignore[call-arg]  # written with call.write()
        loop = asyncio.get_running_loop()
        stalled: float | None = None
        try:
            await call.write(blob_service_pb2.UploadRequest(size=STALL_ANNOUNCED))
            async with asyncio.timeout(RPC_TIMEOUT):
                await call.read()  # "ready"
            await call.write(blob_service_pb2.UploadRequest(chunk=b"\0" * STALL_CHUNK))
            stalled = loop.time()
            async with asyncio.timeout(STALL_PATIENCE):
                response = await call.read()
            if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                self.tally.drop_seconds.append(loop.time() - stalled)
                return f"dropped:{(await call.code()).name}"
            return "answered"
        except TimeoutError:
            return "held"
        except grpc.aio.AioRpcError as exc:
            if stalled is not None:
                self.tally.drop_seconds.append(loop.time() - stalled)
                return f"dropped:{exc.code().name}"
            return f"refused:{exc.code().name}"
        finally:
            call.cancel()

    async def _idle_connection(self) -> str:
        hold = self.rng.uniform(*IDLE_HOLD)
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            return f"connect_failed:{type(exc).__name__}"
        opened = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(hold):
                while await reader.read(4096):  # the server's HTTP/2 preface, if any
                    pass
            self.tally.idle_closed_seconds.append(asyncio.get_running_loop().time() - opened)
            return "closed_by_gateway"
        except TimeoutError:
            return "held"
        except ConnectionError:
            return "reset_by_gateway"
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _blackhole(self) -> str:
        self.blackhole_active = True
        loop = asyncio.get_running_loop()
        channel = grpc.aio.insecure_channel(self.address)
        call = dispatcher_pb2_grpc.DispatcherStub(channel).Session()  # type: ignore[call-arg]
        try:
            attach = dispatcher_pb2.Attach(
                worker_id=f"blackhole-{self.sequence}",
                kinds=[dispatcher_pb2.KindCapacity(kind="blackhole")],
                slots=BLACKHOLE_SLOTS,
                version="soak",
            )
            await call.write(dispatcher_pb2.SessionRequest(attach=attach))
            attached = loop.time()
            # Never half-closed, never answered: the stream ends only when the gateway ends it.
            async with asyncio.timeout(BLACKHOLE_PATIENCE):
                async for response in call:
                    self.tally.blackhole_assigns += len(response.assign)
            self.tally.dead_seconds.append(loop.time() - attached)
            return "declared_dead"
        except TimeoutError:
            return "not_dead"
        except grpc.aio.AioRpcError as exc:
            return f"ended:{exc.code().name}"
        finally:
            call.cancel()
            await channel.close(None)
            self.blackhole_active = False
