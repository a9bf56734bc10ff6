"""Handlers for fault tests (`--handlers tests.faults.handlers`).

`hold` runs until the test lets it go, so a test can have a job surely running across
a fault. Like `count`, it appends "job_id attempt" to the file named by param `log` when
it starts. Only workers that load this module serve it, so it also puts a job on a
chosen worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from worker_service import JobContext, Result, handler

POLL_SECONDS = 0.02


@handler("hold")
def hold(ctx: JobContext) -> Result:
    """Runs until the file named by param `release` exists, or param `seconds` pass."""
    line = f"{ctx.job_id} {ctx.attempt}\n".encode()
    fd = os.open(str(ctx.params["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    release = Path(str(ctx.params["release"]))
    deadline = time.monotonic() + float(ctx.params.get("seconds", 60))
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return Result(metadata={"released": release.exists()})
