"""The one boundary where errors become gRPC status codes, and where calls are checked.

A JobmeshError is answered with its code and message. A request that does not
parse is answered INVALID_ARGUMENT, with one log line (at most one a second),
not a traceback. Anything else is a bug: it is logged with its traceback and
answered INTERNAL with a generic message, and the server keeps serving.

Before a handler runs, the guard (`gateway.auth.Authenticator.authorize`) authenticates
the call and checks its roles; what it refuses (Unauthenticated, PermissionDenied) is
answered like any JobmeshError, before the request is looked at.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from jobmesh.errors import InvalidArgument, JobmeshError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the stubs make it generic; the runtime class is not
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

Behavior = Callable[..., Any]
Deserializer = Callable[[bytes], Any]
Guard = Callable[[str, "grpc.aio.ServicerContext[Any, Any]"], None]
"""Raises a JobmeshError unless the call (method, context) may go ahead."""


class _Malformed:
    """What a request that did not parse becomes, so the handler can answer for it."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _RateLimitedLog:
    """Logs a warning at most once per `interval`, counting what it left out."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._skipped = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        skipped, self._skipped, self._next = self._skipped, 0, now + self._interval
        suffix = f" ({skipped} more since the last report)" if skipped else ""
        log.warning(message + suffix, *args)


_malformed_log = _RateLimitedLog()


def _tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            return _Malformed(str(exc) or type(exc).__name__)

    return parse


def _refuse(request: _Malformed, method: str) -> InvalidArgument:
    _malformed_log.warning("malformed request to %s: %s", method, request.reason)
    return InvalidArgument(f"the request does not parse as {method}'s message: {request.reason}")


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            raise _refuse(request, method)
        yield request


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:  # type: ignore[type-arg]
    if isinstance(exc, JobmeshError):
        await context.abort(exc.code, exc.message)
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the gateway log has details")


def _request(request: Any, method: str) -> Any:
    """The request, or its messages checked as they come; raises for one that did not parse."""
    if isinstance(request, _Malformed):
        raise _refuse(request, method)
    if hasattr(request, "__aiter__"):
        return _checked(request, method)
    return request


def _wrap_unary(behavior: Behavior, method: str, guard: Guard | None) -> Behavior:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        try:
            if guard is not None:
                guard(method, context)
            return await behavior(_request(request, method), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return wrapper


def _wrap_stream(behavior: Behavior, method: str, guard: Guard | None) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
            try:
                if guard is not None:
                    guard(method, context)
                async for response in behavior(_request(request, method), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)

        return generator
    return _wrap_unary(behavior, method, guard)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps errors to status codes; with a `guard`, runs it first in every call's task (so
    what it sets in a context variable is that call's)."""

    def __init__(self, guard: Guard | None = None) -> None:
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self._guard), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self._guard), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, self._guard), **kwargs
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, self._guard), **kwargs
            )
        return handler
