"""Throughput and latency of `echo` jobs through a gateway and one worker replica.

Starts `python -m gateway` (SQLite file in a temp dir) and `python -m worker_service`
on loopback, then prints JSON:

- `submit_wait_jobs_per_s`: 64 concurrent clients, each submitting one job and
  watching it to its result, over and over;
- `batch_jobs_per_s`: jobs sent with SubmitBatch (100 per call), until all are done;
- `latency_ms`: p50/p99 of one job at a time (submit → result).

Usage: python bench/throughput.py [--jobs N] [--concurrency C] [--slots S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobmesh import AsyncClient, JobState, job_spec

ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_for_worker(client: AsyncClient) -> None:
    for _ in range(600):
        if await client.list_workers():
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("worker did not attach")


async def submit_and_wait(client: AsyncClient, payload: bytes) -> float:
    started = time.perf_counter()
    submitted = await client.submit("echo", inputs={"in": payload})
    job = await client.wait(submitted.job.id)
    if job.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {job.state}")
    return time.perf_counter() - started


async def concurrent(client: AsyncClient, jobs: int, concurrency: int) -> float:
    remaining = jobs

    async def one_client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await submit_and_wait(client, b"x" * 64)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return jobs / (time.perf_counter() - started)


async def batched(client: AsyncClient, jobs: int, batch: int) -> float:
    started = time.perf_counter()
    ids: list[str] = []
    for offset in range(0, jobs, batch):
        specs = [
            job_spec("echo", inputs={"in": b"x" * 64}) for _ in range(min(batch, jobs - offset))
        ]
        ids.extend(s.job.id for s in await client.submit_batch(specs))
    gate = asyncio.Semaphore(256)

    async def wait(job_id: str) -> None:
        async with gate:
            await client.wait(job_id)

    await asyncio.gather(*(wait(i) for i in ids))
    return jobs / (time.perf_counter() - started)


async def sequential(client: AsyncClient, jobs: int) -> dict[str, float]:
    latencies = sorted([await submit_and_wait(client, b"x" * 64) for _ in range(jobs)])
    return {
        "p50": round(1000 * statistics.median(latencies), 3),
        "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 3),
        "mean": round(1000 * statistics.fmean(latencies), 3),
    }


async def measure(address: str, opts: argparse.Namespace) -> dict[str, object]:
    async with AsyncClient(address) as client:
        await wait_for_worker(client)
        await concurrent(client, 200, opts.concurrency)  # warm up
        return {
            "submit_wait_jobs_per_s": round(
                await concurrent(client, opts.jobs, opts.concurrency), 1
            ),
            "batch_jobs_per_s": round(await batched(client, opts.jobs, 100), 1),
            "latency_ms": await sequential(client, opts.sequential),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 2)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        port_file = tmpdir / "port"
        gateway = start(
            [
                sys.executable,
                "-m",
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(tmpdir / "bench.db"),
                "--port-file",
                str(port_file),
                "--log-level",
                "WARNING",
            ],
            tmpdir / "gateway.log",
        )
        worker = None
        try:
            for _ in range(600):
                if port_file.exists():
                    break
                time.sleep(0.05)
            address = f"127.0.0.1:{port_file.read_text().strip()}"
            worker = start(
                [
                    sys.executable,
                    "-m",
                    "worker_service",
                    "--gateway",
                    address,
                    "--slots",
                    str(opts.slots),
                    "--worker-id",
                    "bench",
                ],
                tmpdir / "worker.log",
            )
            results = asyncio.run(measure(address, opts))
        finally:
            for proc in (worker, gateway):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
    print(
        json.dumps(
            {
                "benchmark": "throughput",
                "kind": "echo",
                "jobs": opts.jobs,
                "concurrency": opts.concurrency,
                "worker_replicas": 1,
                "worker_slots": opts.slots,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                **results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
