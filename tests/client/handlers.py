"""Handlers only the client tests load (`--handlers tests.client.handlers`)."""

from __future__ import annotations

from worker_service import JobContext, Result, handler


@handler("escaping-outputs")
async def escaping_outputs(ctx: JobContext) -> Result:
    """Names an output so that writing it under a directory would land outside it."""
    return Result(outputs={"ok.txt": b"fine", "../evil": b"gotcha"})
