"""Soak: minutes of mixed traffic against a real gateway; does anything grow without bound?

Starts `python -m gateway` (SQLite in a temp dir, retention one minute) and one or two
`python -m worker_service` replicas on loopback, then offers an open-loop stream of
requests at `--rate` per second from `--clients` SDK clients:

- normal jobs, submitted and waited for: `echo` with small params, some with a 64 KiB inline
  input, some with a 2 MiB input the SDK uploads as a blob (so blobs are made and must be
  collected), and some of kind `blackhole` (served by the real workers through
  bench/soak_handlers.py and by the black-hole worker below). Every one must succeed.
- about `--hostile` of them hostile instead, counted by outcome but never a failure:
  2 MiB params and params nested 40 deep (both should be INVALID_ARGUMENT), uploads that
  announce 1 GiB, send one chunk and stall (the gateway should drop them), raw TCP
  connections held idle, and a black-hole worker that attaches for `blackhole`, then never
  accepts a job nor answers a ping (the gateway should declare it dead).

Every `--interval` seconds prints one JSON line: gateway RSS, descriptors, TCP connections,
database and blob bytes (each the mean of readings every 5 s in the interval), normal jobs/s,
p50/p99 submit-to-done latency, successes and failures, hostile outcomes. Then one JSON
object: over minutes 3..N (the second half when `--minutes` < 5) the least-squares slope per
minute of RSS, descriptors and blob bytes as a fraction of their mean (pass below 0.02),
database bytes against their first value in that window plus 20%, the normal success rate
(pass at 100%), and `pass` overall. Exits 0 either way: benches never gate CI.

Usage: python bench/soak.py [--minutes N] [--interval S] [--rate R] [--workers 1|2]
                            [--clients C] [--hostile F] [--seed N] [--keep-logs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf import struct_pb2

from jobmesh import AsyncClient, JobmeshError
from jobmesh.v1 import (
    blob_service_pb2,
    blob_service_pb2_grpc,
    dispatcher_pb2,
    dispatcher_pb2_grpc,
    job_pb2,
    job_service_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

# The gateway's settings under test (issue #8): one minute of retention, quick sweeps.
GATEWAY_FLAGS = (
    *("--retention", "60", "--sweep-interval", "10"),
    *("--blob-grace", "30", "--upload-idle-timeout", "5"),
)
WORKER_SLOTS = 2


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

PROBE_SECONDS = 5.0  # between readings of the gateway; each report gives their means

SLOPE_LIMIT = 0.02  # of the mean, per minute
DB_GROWTH_LIMIT = 1.2  # of the window's first value


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


# --- processes ---------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    # The user's JOBMESH_* settings must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBMESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Mesh:
    """The gateway and worker processes, their logs and files in `tmp`."""

    tmp: Path
    workers: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None
    address: str = ""

    @property
    def db(self) -> Path:
        return self.tmp / "jobmesh.db"

    @property
    def blob_dir(self) -> Path:
        return Path(str(self.db) + ".blobs")

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.tmp / log_name).open("ab") as out:
            # A session of its own: a Ctrl-C reaches the bench only, which then stops these.
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=child_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        port_file = self.tmp / "gateway.port"
        self.gateway = self._start(
            [
                *("-m", "gateway", "--listen", "127.0.0.1:0"),
                *("--port-file", str(port_file), "--db", str(self.db)),
                *GATEWAY_FLAGS,
            ],
            "gateway.log",
        )
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start; see {self.tmp / 'gateway.log'}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"
        for n in range(1, self.workers + 1):
            self._start(
                [
                    *("-m", "worker_service", "--gateway", self.address),
                    *("--slots", str(WORKER_SLOTS), "--worker-id", f"soak-{n}"),
                    *("--handlers", "bench.soak_handlers", "--parent-pid", str(os.getpid())),
                ],
                f"worker-{n}.log",
            )

    def worker_ids(self) -> set[str]:
        return {f"soak-{n}" for n in range(1, self.workers + 1)}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


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


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_submit(depth: int) -> bytes:
    """A SubmitRequest for `echo` with `nested(depth)` as params, encoded by hand: protobuf's
    own encoder, like the gateway's decoder, refuses messages nested this deep."""
    leaf = struct_pb2.Value(number_value=1).SerializeToString()
    struct = _delimited(1, _delimited(1, b"leaf") + _delimited(2, leaf))
    for _ in range(depth - 1):
        value = _delimited(_STRUCT_VALUE, struct)
        struct = _delimited(1, _delimited(1, b"n") + _delimited(2, value))
    spec = job_pb2.JobSpec(kind="echo").SerializeToString() + _delimited(_PARAMS, struct)
    return _delimited(_SPEC, spec)


_STRUCT_VALUE = struct_pb2.Value.DESCRIPTOR.fields_by_name["struct_value"].number
_PARAMS = job_pb2.JobSpec.DESCRIPTOR.fields_by_name["params"].number
_SPEC = job_service_pb2.SubmitRequest.DESCRIPTOR.fields_by_name["spec"].number


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
        # Requests go as bytes and answers are not parsed: a deep one cannot be encoded
        # otherwise, and an accepted one would not even parse here.
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
        spec = job_pb2.JobSpec(kind="echo")
        spec.params.update({"pad": "x" * OVERSIZE_PARAMS})
        return await self._submit(job_service_pb2.SubmitRequest(spec=spec).SerializeToString())

    async def _deep(self) -> str:
        return await self._submit(deep_submit(DEEP_PARAMS))

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


# --- measurements ------------------------------------------------------------------------


def file_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def tree_bytes(root: Path) -> tuple[int, int]:
    """Bytes of all files under `root`, and of those that are partial uploads."""
    total = partial = 0
    for folder, _, names in os.walk(root):
        for name in names:
            size = file_bytes(Path(folder, name))
            total += size
            if name.startswith(".upload-"):
                partial += size
    return total, partial


@dataclass
class Sample:
    """One interval's means; `minute` is the interval's nominal end."""

    minute: float
    rss: float
    fds: float
    db: float
    blobs: float


class Sampler:
    """Probes the gateway every few seconds and reports each interval's means: one reading
    a minute would alias the sweeps' saw-tooth (every `--sweep-interval` s) into the trend."""

    def __init__(self, mesh: Mesh, tally: Tally, interval: float) -> None:
        assert mesh.gateway is not None
        self.mesh = mesh
        self.tally = tally
        self.interval = interval
        self.gateway = psutil.Process(mesh.gateway.pid)
        self.gateway.cpu_percent(None)
        self.bench = psutil.Process()
        self.probes: defaultdict[str, list[int]] = defaultdict(list)
        self.samples: list[Sample] = []

    async def probe(self) -> None:
        """Raises psutil.NoSuchProcess once the gateway is gone."""
        with self.gateway.oneshot():
            rss = self.gateway.memory_info().rss
            fds = self.gateway.num_fds()
            tcp = len(self.gateway.net_connections("tcp"))
        db = self.mesh.db
        blobs, partial = await asyncio.to_thread(tree_bytes, self.mesh.blob_dir)
        for key, value in (
            ("gateway_rss_bytes", rss),
            ("gateway_fds", fds),
            ("gateway_tcp_connections", tcp),
            ("db_bytes", file_bytes(db, Path(f"{db}-wal"), Path(f"{db}-shm"))),
            ("blob_bytes", blobs),
            ("partial_upload_bytes", partial),
        ):
            self.probes[key].append(value)

    async def report(self, index: int, admin: AsyncClient) -> dict[str, Any]:
        window = self.tally.cut()
        probes, self.probes = self.probes, defaultdict(list)
        means = {k: statistics.fmean(v) for k, v in probes.items()}
        try:
            async with asyncio.timeout(5):
                workers: int | str = len(await admin.list_workers())
        except Exception as exc:
            workers = f"error:{rpc_code(exc)}"
        minute = index * self.interval / 60
        self.samples.append(
            Sample(
                minute,
                means["gateway_rss_bytes"],
                means["gateway_fds"],
                means["db_bytes"],
                means["blob_bytes"],
            )
        )
        return {
            "minute": round(minute, 2),
            "sample": index,
            "probes": len(probes["gateway_rss_bytes"]),
            **{k: round(v) if k.endswith("_bytes") else round(v, 1) for k, v in means.items()},
            "gateway_rss_bytes_max": max(probes["gateway_rss_bytes"]),
            "gateway_cpu_percent": round(self.gateway.cpu_percent(None), 1),
            "jobs_per_s": round(window.succeeded / self.interval, 2),
            **window.latency(),
            "normal_succeeded": window.succeeded,
            "normal_failed": window.failed,
            "normal_failures": dict(window.failures),
            "normal_in_flight": self.tally.in_flight,
            "hostile": window.hostile_dict(),
            "workers_attached": workers,
            "bench_fds": self.bench.num_fds(),
        }


# --- verdict -----------------------------------------------------------------------------


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def trend(xs: list[float], ys: list[float]) -> dict[str, Any]:
    if len(xs) < 2:
        return {"pass": False, "why": "fewer than two samples in the window"}
    per_minute, mean = slope(xs, ys), statistics.fmean(ys)
    fraction = per_minute / mean if mean else 0.0  # a mean of 0 is all zeros: no slope
    return {
        "slope_per_minute": round(per_minute, 1),
        "mean": round(mean, 1),
        "slope_over_mean": round(fraction, 4),
        "limit": SLOPE_LIMIT,
        "pass": fraction < SLOPE_LIMIT,
    }


def verdict(
    samples: list[Sample], minutes: float, tally: Tally, opts: argparse.Namespace
) -> dict[str, Any]:
    start = 2.0 if minutes >= 5 else minutes / 2
    window = [s for s in samples if s.minute > start + 1e-9]
    xs = [s.minute for s in window]
    total = tally.total
    jobs = total.succeeded + total.failed
    rate = total.succeeded / jobs if jobs else 0.0
    result: dict[str, Any] = {
        "benchmark": "soak",
        "minutes": round(minutes, 2),
        "interval_s": opts.interval,
        "rate": opts.rate,
        "workers": opts.workers,
        "gateway_flags": " ".join(GATEWAY_FLAGS),
        "window": {"after_minute": round(start, 2), "samples": len(window)},
        "rss": trend(xs, [s.rss for s in window]),
        "fds": trend(xs, [s.fds for s in window]),
        "blob_bytes": trend(xs, [s.blobs for s in window]),
    }
    if window:
        first, peak = window[0].db, max(s.db for s in window)
        result["db_bytes"] = {
            "first": round(first),
            "max": round(peak),
            "limit": round(first * DB_GROWTH_LIMIT),
            "pass": peak < first * DB_GROWTH_LIMIT,
        }
    else:
        result["db_bytes"] = {"pass": False, "why": "no samples in the window"}
    result["normal"] = {
        "jobs": jobs,
        "succeeded": total.succeeded,
        "failed": total.failed,
        "failures": dict(total.failures),
        "success_rate": round(rate, 6),
        **total.latency(),
        "pass": jobs > 0 and total.failed == 0,
    }
    result["hostile"] = total.hostile_dict()
    result["hostile_timing"] = {
        "stalled_upload_dropped_after_s_median": median(tally.drop_seconds),
        "idle_connection_closed_after_s_median": median(tally.idle_closed_seconds),
        "blackhole_dead_after_s_median": median(tally.dead_seconds),
        "blackhole_jobs_assigned": tally.blackhole_assigns,
    }
    checks = ("rss", "fds", "blob_bytes", "db_bytes", "normal")
    result["pass"] = all(result[k]["pass"] for k in checks)
    result["failed_checks"] = [k for k in checks if not result[k]["pass"]]
    return result


# --- the run -----------------------------------------------------------------------------


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def wait_for_workers(admin: AsyncClient, ids: set[str]) -> None:
    async with asyncio.timeout(60):
        while not ids <= {w.worker_id for w in await admin.list_workers()}:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # other processes attach


async def soak(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    assert mesh.gateway is not None
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    tally = Tally()
    admin = AsyncClient(mesh.address)
    traffic = Traffic(mesh.address, opts, tally)
    sampler = Sampler(mesh, tally, opts.interval)
    duration = opts.minutes * 60
    extra: dict[str, Any] = {}
    pacer: asyncio.Task[None] | None = None
    try:
        await wait_for_workers(admin, mesh.worker_ids())
        started = loop.time()
        pacer = asyncio.create_task(traffic.run())
        probes = max(1, round(opts.interval / PROBE_SECONDS))
        step = opts.interval / probes
        for tick in range(1, int(duration / step + 1e-9) + 1):
            await asyncio.sleep(max(0.0, started + tick * step - loop.time()))
            if pacer.done():
                extra["traffic_error"] = repr(pacer.exception())
                break
            try:
                await sampler.probe()
            except psutil.NoSuchProcess:
                extra["gateway_exit"] = mesh.gateway.wait()
                break
            if tick % probes == 0:
                emit(await sampler.report(tick // probes, admin))
        pacer.cancel()
        await traffic.drain(NORMAL_TIMEOUT + 10)
    except asyncio.CancelledError:
        main.uncancel()
        extra["interrupted"] = True
    finally:
        if pacer is not None:
            pacer.cancel()
        loop.remove_signal_handler(signal.SIGTERM)
        await traffic.close()
        await admin.close()
    result = {**verdict(sampler.samples, opts.minutes, tally, opts), **extra}
    for broken in ("gateway_exit", "traffic_error"):
        if broken in extra:
            result["pass"] = False
            result["failed_checks"].append(broken)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per report")
    parser.add_argument("--rate", type=float, default=20.0, help="requests offered per second")
    parser.add_argument("--workers", type=int, choices=(1, 2), default=2, help="worker replicas")
    parser.add_argument("--clients", type=int, default=4, help="SDK clients (channels)")
    parser.add_argument("--hostile", type=float, default=0.1, help="fraction of hostile requests")
    parser.add_argument("--seed", type=int, default=None, help="seed of the traffic's choices")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir and logs")
    opts = parser.parse_args()
    if opts.minutes <= 0 or opts.interval <= 0 or opts.rate <= 0 or opts.clients < 1:
        parser.error("--minutes, --interval, --rate and --clients must be positive")
    if opts.interval > opts.minutes * 60:
        parser.error("--interval is longer than the run")
    tmp = Path(tempfile.mkdtemp(prefix="jobmesh-soak-"))
    mesh = Mesh(tmp, opts.workers)
    result: dict[str, Any] | None = None
    try:
        mesh.start()
        result = asyncio.run(soak(mesh, opts))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    except Exception as exc:  # still one JSON answer, and exit 0: benches never gate CI
        result = {"benchmark": "soak", "error": f"{type(exc).__name__}: {exc}", "pass": False}
    finally:
        mesh.stop()
        if opts.keep_logs:
            print(f"logs and database in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if result is not None:
        emit(result)


if __name__ == "__main__":
    main()
