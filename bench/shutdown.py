"""Seconds from SIGTERM to exit of an idle gateway (a worker attached, running nothing), as
JSON: the median of `--runs` gateways, each on its own SQLite file. Never part of the test run.

Usage: python bench/shutdown.py [--runs N] [--no-worker]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster  # noqa: E402  # the repo root is on the path only now


def once(tmp: Path, worker: bool) -> float:
    cluster = Cluster(tmp)
    try:
        gw = cluster.gateway()
        if worker:
            cluster.worker(gw, "w1")
        start = time.monotonic()
        gw.signal(signal.SIGTERM)
        gw.wait()
        return time.monotonic() - start
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-worker", action="store_true", help="no worker attached")
    opts = parser.parse_args()
    seconds = []
    for _ in range(opts.runs):
        with tempfile.TemporaryDirectory(prefix="jobmesh-shutdown-") as tmp:
            seconds.append(once(Path(tmp), worker=not opts.no_worker))
    print(
        json.dumps(
            {
                "worker_attached": not opts.no_worker,
                "runs": opts.runs,
                "sigterm_to_exit_seconds": round(statistics.median(seconds), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
