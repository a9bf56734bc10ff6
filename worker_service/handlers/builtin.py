"""Built-in kinds, always loaded: `echo`, `sleep` and `fail`, for smoke tests and demos."""

from __future__ import annotations

import time
from typing import Any

from jobmesh.codes import Code
from jobmesh.worker import HandlerError, JobCancelled, JobContext, Param, Result, handler

MAX_SLEEP_SECONDS = 3600.0
# How often `sleep` looks at its cancel flag, so a cancel lands quickly even in long sleeps.
_CANCEL_POLL_SECONDS = 0.05


@handler("echo")
async def echo(ctx: JobContext) -> Result:
    """Returns the inputs as outputs and the params as metadata."""
    return Result(outputs=dict(ctx.inputs), metadata=dict(ctx.params))


@handler(
    "sleep",
    params=[
        Param(
            "seconds",
            "number",
            minimum=0,
            maximum=MAX_SLEEP_SECONDS,
            description="how long to sleep (default 1)",
        )
    ],
)
def sleep(ctx: JobContext) -> dict[str, Any]:
    """Sleeps `seconds` (default 1), reporting progress every tenth; stops when cancelled."""
    seconds: float = ctx.params.get("seconds", 1.0)
    start = time.monotonic()
    for tenth in range(1, 11):
        until = start + seconds * tenth / 10
        while (left := until - time.monotonic()) > 0:
            if ctx.cancelled:
                raise JobCancelled(
                    f"cancelled after {time.monotonic() - start:.1f} of {seconds:g} s"
                )
            time.sleep(min(left, _CANCEL_POLL_SECONDS))
        ctx.progress(tenth / 10, f"slept {seconds * tenth / 10:g} of {seconds:g} s")
    return {"slept": seconds}


@handler(
    "fail",
    params=[
        Param("message", "string", description="the error's message"),
        Param("retryable", "boolean", description="whether the gateway retries (default false)"),
    ],
)
def fail(ctx: JobContext) -> None:
    """Fails with FAILED_ON_PURPOSE; params `message` and `retryable` shape the error."""
    message = ctx.params.get("message", "failed on purpose")
    retryable = ctx.params.get("retryable", False)
    raise HandlerError(message, code=Code.FAILED_ON_PURPOSE, retryable=retryable)
