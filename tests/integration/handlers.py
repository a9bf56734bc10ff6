"""Handlers only the tests load (`--handlers tests.integration.handlers`).

`count` appends one line per execution to a file the test names, a side channel
that shows how many times each job really ran.
"""

from __future__ import annotations

import os
import time

from jobmesh.worker import JobContext, Result, handler


def record_start(ctx: JobContext) -> None:
    """Appends "job_id attempt" to the file named by param `log`, in one atomic write."""
    line = f"{ctx.job_id} {ctx.attempt}\n".encode()
    fd = os.open(str(ctx.params["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@handler("count")
def count(ctx: JobContext) -> Result:
    record_start(ctx)
    time.sleep(float(ctx.params.get("seconds", 0)))
    return Result(outputs={"echo": ctx.inputs.get("in", b"")}, metadata={"pid": os.getpid()})


@handler("flaky")
def flaky(ctx: JobContext) -> Result:
    """Fails its first attempt (retryably), succeeds after; one traced step each time."""
    with ctx.step("work"):
        ctx.progress(0.5, "halfway")
        if ctx.attempt == 1:
            raise RuntimeError("first attempts always fail")
    return Result(metadata={"attempt": ctx.attempt})
