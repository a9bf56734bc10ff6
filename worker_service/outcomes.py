"""How a handler's return value or exception becomes a `JobResult` or a `JobError`.

Shared by every executor, including pool children, so the mapping is the same wherever
a handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from jobmesh import codes, telemetry
from jobmesh.codes import Code
from jobmesh.errors import InvalidArgument
from jobmesh.limits import DEFAULT_LIMITS
from jobmesh.v1 import job_pb2
from worker_service.registry import HandlerError, JobContext, Result

Outcome = job_pb2.JobResult | job_pb2.JobError

log = logging.getLogger("worker_service")


def params_to_dict(params: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python values (numbers are floats)."""
    return json_format.MessageToDict(params)


def to_result(value: object) -> job_pb2.JobResult:
    """Raises HandlerError(INVALID_RESULT) for anything but a Result, a dict or None."""
    if value is None:
        value = Result()
    elif isinstance(value, Mapping):
        value = Result(metadata=dict(value))
    if not isinstance(value, Result):
        raise HandlerError(
            f"handler returned {type(value).__name__}; expected Result, dict or None",
            code=Code.INVALID_RESULT,
        )
    for name, data in value.outputs.items():
        if not isinstance(name, str) or not isinstance(data, bytes | bytearray | memoryview):
            raise HandlerError(
                f"output {name!r} is {type(data).__name__}; outputs map str to bytes",
                code=Code.INVALID_RESULT,
            )
    result = job_pb2.JobResult(outputs={k: bytes(v) for k, v in value.outputs.items()})
    try:
        result.metadata.update(value.metadata)
    except RecursionError:
        raise HandlerError(
            "metadata: nested too deeply to convert", code=Code.INVALID_RESULT
        ) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise HandlerError(
            f"metadata is not JSON-like: {type(exc).__name__}: {exc}", code=Code.INVALID_RESULT
        ) from exc
    check_result(result)
    return result


def check_result(result: job_pb2.JobResult) -> None:
    """Raises HandlerError(INVALID_RESULT) for a result over the limits the gateway applies
    (`jobmesh.limits`): too many outputs, a name that is no payload name, metadata too large
    or too deep.

    Checked where the handler ran, before the result is copied anywhere: protobuf cannot
    even parse metadata nested near its 100-level limit, so such a result could neither
    cross a pool pipe nor be sent, and a worker resending it would never be heard.
    """
    try:
        DEFAULT_LIMITS.result(result)
    except InvalidArgument as exc:
        raise HandlerError(exc.message, code=Code.INVALID_RESULT) from None


def to_error(exc: BaseException, ctx: JobContext) -> job_pb2.JobError:
    """HandlerError keeps its code; anything else is a retryable HANDLER_ERROR."""
    if isinstance(exc, HandlerError):
        return codes.error(exc.code, exc.message, exc.retryable)
    log.warning("job %s attempt %d (%s) raised", ctx.job_id, ctx.attempt, ctx.kind, exc_info=exc)
    return Code.HANDLER_ERROR.error(f"{type(exc).__name__}: {exc}", retryable=True)


def run_sync(fn: Callable[[JobContext], Any], ctx: JobContext) -> Outcome:
    """Calls a sync handler; never raises for what the handler does."""
    try:
        with telemetry.attached(ctx.trace_context):
            return to_result(fn(ctx))
    except (Exception, SystemExit) as exc:  # sys.exit() in a handler fails only its job
        return to_error(exc, ctx)


async def run_async(fn: Callable[[JobContext], Awaitable[Any]], ctx: JobContext) -> Outcome:
    """Awaits an async handler; never raises for what the handler does."""
    try:
        with telemetry.attached(ctx.trace_context):
            return to_result(await fn(ctx))
    except (Exception, SystemExit) as exc:
        return to_error(exc, ctx)
