"""Handlers only the worker's tests load (`--handlers tests.worker.handlers_for_tests`)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time

from jobmesh.worker import HandlerError, JobCancelled, JobContext, Param, Result, handler


@handler("test.pid")
def pid(ctx: JobContext) -> dict[str, object]:
    return {"pid": os.getpid(), "params": ctx.params, "inputs": sorted(ctx.inputs)}


@handler("test.progress")
def progress(ctx: JobContext) -> None:
    for step in (0.25, 0.5, 0.75):
        ctx.progress(step, f"step {step}")
        time.sleep(0.1)  # slower than the worker's progress coalescing


@handler("test.exit")
def exit_now(ctx: JobContext) -> None:
    os._exit(int(ctx.params.get("code", 1)))


@handler("test.block")
def block(ctx: JobContext) -> None:
    """Tells its pid, then waits to be killed or cancelled."""
    ctx.progress(0.0, str(os.getpid()))
    deadline = time.monotonic() + float(ctx.params.get("seconds", 60))
    while time.monotonic() < deadline:
        ctx.raise_if_cancelled()
        time.sleep(0.02)


@handler("test.raise")
def raise_value_error(ctx: JobContext) -> None:
    raise ValueError("boom")


@handler("test.handler_error")
def raise_handler_error(ctx: JobContext) -> None:
    raise HandlerError("bad input", code="BAD_INPUT", retryable=bool(ctx.params.get("retry")))


@handler("test.thread", executor="thread")
def in_thread(ctx: JobContext) -> Result:
    ctx.progress(0.5, "halfway")
    while ctx.params.get("wait_cancel") and not ctx.cancelled:
        time.sleep(0.01)
    if ctx.cancelled:
        raise JobCancelled("stopped")
    return Result(
        outputs={"thread": threading.current_thread().name.encode()}, metadata={"pid": os.getpid()}
    )


@handler("test.async")
async def in_loop(ctx: JobContext) -> Result:
    ctx.progress(0.5, "halfway")
    for _ in range(3000 if ctx.params.get("wait_cancel") else 0):
        if ctx.cancelled:
            break
        await asyncio.sleep(0.01)
    ctx.raise_if_cancelled()
    return Result(metadata={"pid": os.getpid()})


@handler("test.big", executor="thread")
def big(ctx: JobContext) -> Result:
    return Result(outputs={"blob": b"x" * int(ctx.params["size"])})


@handler("test.one_at_a_time", concurrency=1)
def one_at_a_time(ctx: JobContext) -> None:
    time.sleep(float(ctx.params.get("seconds", 1)))


@handler("test.stubborn")
def stubborn(ctx: JobContext) -> dict[str, object]:
    """Tells its pid, then ignores cancellation: sleeps, or spins with `spin`."""
    ctx.progress(0.0, str(os.getpid()))
    deadline = time.monotonic() + float(ctx.params.get("seconds", 60))
    if ctx.params.get("spin"):
        while time.monotonic() < deadline:
            pass
    else:
        time.sleep(max(0.0, deadline - time.monotonic()))
    return {"pid": os.getpid()}


@handler("test.stubborn_thread", executor="thread")
def stubborn_thread(ctx: JobContext) -> None:
    ctx.progress(0.0, "started")
    time.sleep(float(ctx.params.get("seconds", 2)))


@handler("test.stubborn_async")
async def stubborn_async(ctx: JobContext) -> None:
    ctx.progress(0.0, "started")
    await asyncio.sleep(float(ctx.params.get("seconds", 60)))


@handler("test.hog")
def hog(ctx: JobContext) -> dict[str, object]:
    """Allocates (and touches) 16 MiB at a time up to `mib` MiB, then holds it for a while."""
    ctx.progress(0.0, str(os.getpid()))
    chunks = []
    for _ in range(int(ctx.params.get("mib", 1024)) // 16):
        chunks.append(b"\x01" * (16 << 20))
        time.sleep(0.01)
    time.sleep(float(ctx.params.get("hold", 1)))
    return {"mib": 16 * len(chunks)}


@handler("test.segfault")
def segfault(ctx: JobContext) -> None:
    ctypes.string_at(0)


@handler("test.count")
def count(ctx: JobContext) -> None:
    """Appends a line to the file `path` each time it starts, then sleeps `seconds`."""
    with open(ctx.params["path"], "a") as f:
        f.write(f"{ctx.job_id} {ctx.attempt}\n")
    time.sleep(float(ctx.params.get("seconds", 1)))


@handler(
    "test.types",
    params=[
        Param("count", "integer", minimum=0),
        Param("ratio", "number"),
        Param("mode", "string", choices=("Fast", "Slow")),
    ],
)
def types(ctx: JobContext) -> dict[str, object]:
    """The params it got, and the Python type of each."""
    return {"params": ctx.params, "types": {k: type(v).__name__ for k, v in ctx.params.items()}}


@handler("test.deep")
def deep(ctx: JobContext) -> dict[str, object]:
    """Returns metadata nested `depth` levels deep (protobuf parses 100 nested messages)."""
    value: dict[str, object] = {"leaf": 1}
    for _ in range(int(ctx.params.get("depth", 40)) - 1):
        value = {"x": value}
    return value


@handler("test.outputs")
def outputs(ctx: JobContext) -> Result:
    """`count` outputs of `size` bytes each (out0, out1...), and `text` characters of metadata."""
    size, count = int(ctx.params.get("size", 0)), int(ctx.params.get("count", 1))
    return Result(
        outputs={f"out{i}": bytes([65 + i]) * size for i in range(count)},
        metadata={"text": "t" * int(ctx.params.get("text", 0))},
    )


@handler("test.chatty")
def chatty(ctx: JobContext) -> None:
    """Reports progress, then fails, each with a message of `length` characters."""
    length = int(ctx.params.get("length", 10_000))
    ctx.progress(0.5, "p" * length)
    raise HandlerError("e" * length, code="CHATTY")
