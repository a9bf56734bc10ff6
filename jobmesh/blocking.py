"""The blocking client: an AsyncClient run on a private event loop in a daemon thread.

Every method is the AsyncClient's, so the logic (watch resumption, error wrapping) exists
once; async iterators become plain iterators.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from opentelemetry import context as otel_context

from jobmesh.channels import TLS, StrPath
from jobmesh.client import AsyncClient
from jobmesh.errors import FailedPrecondition
from jobmesh.settings import ClientSettings

P = ParamSpec("P")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._async, *args, **kwargs))

    return call


def _iterating(
    method: Callable[Concatenate[AsyncClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[Client, P], Iterator[T]]:
    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self._async, *args, **kwargs))

    return call


class Client:
    """The blocking twin of AsyncClient, with the same methods and arguments; use it with
    `with`."""

    def __init__(
        self,
        gateway: str | None = None,
        *,
        token: str | None = None,
        token_file: StrPath | None = None,
        tls: TLS | None = None,
        settings: ClientSettings | None = None,
    ):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="jobmesh-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            # grpc.aio binds a channel to the loop it is created on.
            self._async = self._run(_open(gateway, token, token_file, tls, settings))
        except BaseException:
            self._stop_loop()
            raise

    @property
    def settings(self) -> ClientSettings:
        return self._async.settings

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._run(self._async.close())
            self._run(_settle())
        finally:
            self._closed = True
            self._stop_loop()

    submit = _blocking(AsyncClient.submit)
    submit_batch = _blocking(AsyncClient.submit_batch)
    get = _blocking(AsyncClient.get)
    cancel = _blocking(AsyncClient.cancel)
    watch = _iterating(AsyncClient.watch)
    run = _iterating(AsyncClient.run)
    wait = _blocking(AsyncClient.wait)
    list = _blocking(AsyncClient.list)
    list_all = _iterating(AsyncClient.list_all)
    list_workers = _blocking(AsyncClient.list_workers)
    watch_stats = _iterating(AsyncClient.watch_stats)
    upload = _blocking(AsyncClient.upload)
    download = _blocking(AsyncClient.download)
    outputs = _blocking(AsyncClient.outputs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs `coro` on the client's loop and waits for it; an interrupt cancels it."""
        if self._closed:
            coro.close()
            raise FailedPrecondition("the client is closed")
        # The caller's trace context, so that its span is the parent of the calls made.
        carried = _carrying(otel_context.get_current(), coro)
        future: Future[T] = asyncio.run_coroutine_threadsafe(carried, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_next(iterator))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None and not self._closed:
                self._run(aclose())

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


_SETTLE_SECONDS = 1.0


async def _settle() -> None:
    """Lets the tasks grpc still runs once the channel is closed (a stream's status handler)
    end, then cancels what is left, so that stopping the loop destroys no pending task."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    if not pending:
        return
    _, left = await asyncio.wait(pending, timeout=_SETTLE_SECONDS)
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


async def _open(
    gateway: str | None,
    token: str | None,
    token_file: StrPath | None,
    tls: TLS | None,
    settings: ClientSettings | None,
) -> AsyncClient:
    return AsyncClient(gateway, token=token, token_file=token_file, tls=tls, settings=settings)


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


async def _carrying(ctx: otel_context.Context, coro: Coroutine[Any, Any, T]) -> T:
    token = otel_context.attach(ctx)
    try:
        return await coro
    finally:
        otel_context.detach(token)
