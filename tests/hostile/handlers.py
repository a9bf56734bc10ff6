"""Handlers only the hostile tests load (`--handlers tests.hostile.handlers`)."""

from __future__ import annotations

from jobmesh.worker import JobContext, handler


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


@handler("hostile.deep")
def deep(ctx: JobContext) -> dict[str, object]:
    """Returns metadata nested `depth` levels deep, in a pool process."""
    return nested(int(ctx.params.get("depth", 40)))


@handler("hostile.deep_async")
async def deep_async(ctx: JobContext) -> dict[str, object]:
    """The same, on the worker's event loop."""
    return nested(int(ctx.params.get("depth", 40)))
