"""The fault scenarios of tests/faults at a larger scale, one JSON object per scenario.

Each scenario starts its own gateway and two worker replicas (real processes on loopback,
SQLite in a temp dir), submits a batch of `count` jobs, injects its fault once a fraction
of them has started, and prints: scenario, accepted, succeeded, failed, lost, duplicated
(jobs run more than once), in_flight_at_fault, detect_seconds (fault → the gateway shows
it) and recover_seconds (fault → every job ended). Never part of the test run.

Usage: python bench/faults.py [--jobs N] [--seconds S] [--slots N] [--fault-at F]
                              [--ping-interval S] [--reattach-grace S] [--timeout S]
                              [--keep-logs] [SCENARIO ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster  # noqa: E402  # the repo root is on the path only now
from tests.faults.scenarios import SCENARIOS, Scale  # noqa: E402


async def run(name: str, scale: Scale, tmp: Path, keep_logs: bool) -> dict[str, object]:
    cluster = Cluster(tmp)
    try:
        record = await SCENARIOS[name](cluster, scale)
    except Exception as exc:
        if keep_logs:
            print(cluster.logs(), file=sys.stderr)
        return {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        cluster.close()
    if keep_logs:
        print(f"logs of {name} in {tmp}", file=sys.stderr)
    return record.summary()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per batch")
    parser.add_argument("--seconds", type=float, default=0.05, help="how long each job runs")
    parser.add_argument("--slots", type=int, default=8, help="slots of each of the two workers")
    parser.add_argument(
        "--fault-at", type=float, default=Scale.fault_at, help="fraction started at the fault"
    )
    parser.add_argument(
        "--ping-interval", type=float, default=Scale.ping_interval, help="gateway pings (s)"
    )
    parser.add_argument(
        "--ping-misses", type=int, default=Scale.ping_misses, help="missed pings to be dead"
    )
    parser.add_argument(
        "--reattach-grace", type=float, default=Scale.reattach_grace, help="gateway flag (s)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="longest recovery (s)")
    parser.add_argument("--keep-logs", action="store_true", help="keep process logs")
    args = parser.parse_args()
    if unknown := sorted(set(args.scenarios) - set(SCENARIOS)):
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    scale = Scale(
        jobs=args.jobs,
        seconds=args.seconds,
        slots=args.slots,
        fault_at=args.fault_at,
        ping_interval=args.ping_interval,
        ping_misses=args.ping_misses,
        reattach_grace=args.reattach_grace,
        timeout=args.timeout,
    )
    failed = False
    for name in args.scenarios or SCENARIOS:
        if args.keep_logs:
            tmp = Path(tempfile.mkdtemp(prefix=f"jobmesh-{name}-"))
            result = asyncio.run(run(name, scale, tmp, True))
        else:
            with tempfile.TemporaryDirectory(prefix=f"jobmesh-{name}-") as tmp_dir:
                result = asyncio.run(run(name, scale, Path(tmp_dir), False))
        failed = failed or "error" in result
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
