"""How a handler's return value or exception becomes a `JobResult` or a `JobError`.

Shared by every executor, including pool children, so the mapping is the same wherever
a handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from jobmesh import codes, telemetry
from jobmesh.codes import Code
from jobmesh.errors import InvalidArgument
from jobmesh.limits import DEFAULT_LIMITS
from jobmesh.params import encode
from jobmesh.v1 import job_pb2
from worker_service.registry import HandlerError, JobContext, Result

Outcome = job_pb2.JobResult | job_pb2.JobError

log = logging.getLogger("worker_service")


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
    try:
        result = job_pb2.JobResult(
            outputs={k: bytes(v) for k, v in value.outputs.items()},
            metadata_json=encode(value.metadata, "metadata"),
        )
    except InvalidArgument as exc:  # not JSON, or an integer JSON clients cannot read
        raise HandlerError(exc.message, code=Code.INVALID_RESULT) from None
    except ValueError as exc:  # text protobuf cannot carry, e.g. a lone surrogate
        raise HandlerError(
            f"the result cannot be encoded: {exc}", code=Code.INVALID_RESULT
        ) from None
    check_result(result)
    return result


def check_result(result: job_pb2.JobResult) -> None:
    """Raises HandlerError(INVALID_RESULT) for a result over the limits the gateway applies
    (`jobmesh.limits`): too many outputs, a name that is no payload name, metadata too large
    or too deep.

    Checked where the handler ran, before the result is sent: the gateway would refuse it,
    and an attempt that fails here says why instead of costing a delivery.
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
