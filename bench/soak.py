"""Soak: minutes of mixed traffic against a real gateway; does anything grow without bound?

Starts `python -m gateway` (SQLite in a temp dir, retention one minute) and one or two
`python -m worker_service` replicas on loopback, then offers an open-loop stream of
requests at `--rate` per second from `--clients` SDK clients:

- normal jobs, submitted and waited for: `echo` with small params, some with a 64 KiB inline
  input, some with a 2 MiB input the SDK uploads as a blob (so blobs are made and must be
  collected), and some of kind `blackhole` (served by the real workers through
  bench/soak_handlers.py, and offered to the black-hole worker below, which the gateway
  should never trust with one: it has not answered a ping). Every one must succeed.
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
The traffic itself is in bench/soak_traffic.py.

Usage: python bench/soak.py [--minutes N] [--interval S] [--rate R] [--workers 1|2]
                            [--clients C] [--hostile F] [--seed N] [--keep-logs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from soak_traffic import NORMAL_TIMEOUT, Tally, Traffic, median, rpc_code

from jobmesh import AsyncClient

ROOT = Path(__file__).resolve().parent.parent

# The gateway's settings under test (issue #8): one minute of retention, quick sweeps.
GATEWAY_FLAGS = (
    *("--retention", "60", "--sweep-interval", "10"),
    *("--blob-grace", "30", "--upload-idle-timeout", "5"),
)
WORKER_SLOTS = 2


PROBE_SECONDS = 5.0  # between readings of the gateway; each report gives their means

SLOPE_LIMIT = 0.02  # of the mean, per minute
DB_GROWTH_LIMIT = 1.2  # of the window's first value


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
