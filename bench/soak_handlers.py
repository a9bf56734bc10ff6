"""The `blackhole` kind for bench/soak.py's real workers (`--handlers bench.soak_handlers`).

The soak's black-hole worker attaches with this kind and never runs anything; the real
workers serve it too, so its jobs must end up on them once the gateway gives up on it.
"""

from __future__ import annotations

import asyncio

from jobmesh.worker import JobContext, Result, handler


# One at a time per replica, each taking a while: the soak submits these three at once, and
# with every real replica running one the gateway's pick for the third is the black hole.
@handler("blackhole", concurrency=1)
async def blackhole(ctx: JobContext) -> Result:
    """Echoes, like `echo`, after sleeping `seconds` (default 0)."""
    await asyncio.sleep(float(ctx.params.get("seconds", 0)))
    return Result(outputs=dict(ctx.inputs), metadata=dict(ctx.params))
