"""A gateway with a deep queue: its memory, its restart, its dispatch rate, as JSON.

For each depth (1k, 100k and 1M queued `echo` jobs by default) it fills a new SQLite file
through the store (as Submits would leave it, only faster), then starts `python -m gateway`
on it and measures:

- `restart_to_serving_s`: from the gateway's start to its port file (written once it
  serves, its recovery done);
- `rss_serving_mb`: the gateway's resident memory then, and `rss_peak_mb` while it
  dispatches;
- `dispatch_jobs_per_s`: jobs completed per second by one worker replica (`--slots`) from
  that queue, over the first `--dispatch` jobs (WatchStats' totals).

It raises `--max-queued` to fit. The file is deleted after each depth.

Usage: python bench/scale.py [--depths 1000,100000,1000000] [--dispatch N] [--slots S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.jobs import new_job_id, next_event, now  # noqa: E402  # the root is on the path now
from gateway.store.sqlite import SqliteStore  # noqa: E402
from jobmesh import AsyncClient  # noqa: E402
from jobmesh.v1 import job_pb2  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

FILL_BATCH = 5000


async def fill(db: Path, depth: int) -> float:
    """Leaves `depth` queued echo jobs in a new store; returns the seconds it took."""
    started = time.perf_counter()
    store = SqliteStore(str(db))
    await store.open(lambda events: None)
    try:
        left = depth
        while left:
            jobs = []
            for _ in range(min(left, FILL_BATCH)):
                job = job_pb2.Job(
                    id=new_job_id(),
                    tenant="default",
                    spec=job_pb2.JobSpec(kind="echo", params_json='{"n": 1}'),
                    state=job_pb2.JOB_STATE_QUEUED,
                    attempt=1,
                )
                job.create_time.CopyFrom(now())
                jobs.append(job)
            await store.insert(jobs, [next_event(job, message="submitted") for job in jobs])
            left -= len(jobs)
    finally:
        await store.close()
    return time.perf_counter() - started


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def dispatch_rate(address: str, jobs: int, pid: int) -> tuple[float, float]:
    """(jobs completed per second over the first `jobs`, the gateway's peak RSS meanwhile)."""
    peak = 0.0
    async with AsyncClient(address) as client:
        started: float | None = None
        async for stats in client.watch_stats(interval=0.1):
            peak = max(peak, rss_mb(pid))
            done = stats.totals.completed
            if started is None:
                started, first = time.perf_counter(), done
                continue
            if done - first >= jobs:
                return (done - first) / (time.perf_counter() - started), peak
    raise RuntimeError("the stats stream ended")


async def measure(tmp: Path, depth: int, dispatch: int, slots: int) -> dict[str, float | int]:
    db = tmp / f"queue-{depth}.db"
    filled = await fill(db, depth)
    cluster = Cluster(tmp)
    try:
        started = time.perf_counter()
        gw = cluster.gateway("--max-queued", str(max(depth * 2, 1000)), db=db)
        serving = time.perf_counter() - started
        rss = rss_mb(gw.pid)
        cluster.worker(gw, "w1", slots=slots)
        rate, peak = await dispatch_rate(gw.address, min(dispatch, depth - slots), gw.pid)
        return {
            "queued": depth,
            "fill_s": round(filled, 1),
            "restart_to_serving_s": round(serving, 3),
            "rss_serving_mb": round(rss, 1),
            "rss_peak_mb": round(max(peak, rss), 1),
            "dispatch_jobs_per_s": round(rate, 1),
        }
    finally:
        cluster.close()
        remove(tmp, f"queue-{depth}.db*")


def remove(tmp: Path, pattern: str) -> None:
    for path in tmp.glob(pattern):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1000,100000,1000000")
    parser.add_argument("--dispatch", type=int, default=3000, help="jobs the rate is over")
    parser.add_argument("--slots", type=int, default=8)
    opts = parser.parse_args()
    depths = [int(d) for d in opts.depths.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="jobmesh-scale-") as tmp:
        for depth in depths:
            results.append(await measure(Path(tmp), depth, opts.dispatch, opts.slots))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    base = results[0]["dispatch_jobs_per_s"]
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {platform.python_version()}",
                "slots": opts.slots,
                "depths": results,
                "dispatch_vs_first": [
                    round(float(r["dispatch_jobs_per_s"]) / float(base), 2) for r in results
                ],
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
