"""Handlers for fault tests (`--handlers tests.faults.handlers`).

`hold` runs until the test lets it go, so a test can have a job surely running across
a fault. Like `count`, it appends "job_id attempt" to the file named by param `log` when
it starts. Only workers that load this module serve it, so it also puts a job on a
chosen worker.
"""

from __future__ import annotations

import time
from pathlib import Path

from jobmesh.worker import JobContext, Result, handler
from tests.integration.handlers import record_start

POLL_SECONDS = 0.02


@handler("hold")
def hold(ctx: JobContext) -> Result:
    """Runs until the file named by param `release` exists, or param `seconds` pass."""
    record_start(ctx)
    release = Path(str(ctx.params["release"]))
    deadline = time.monotonic() + float(ctx.params.get("seconds", 60))
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return Result(metadata={"released": release.exists()})
