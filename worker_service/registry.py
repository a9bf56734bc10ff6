"""What handler authors write against: `@handler`, `JobContext`, `Result`, `HandlerError`.

`@handler` records a function in a registry keyed by job kind and returns the function
unchanged, so process-pool children find it again by importing the same module.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

ExecutorName = Literal["process", "thread", "async"]
EXECUTORS: tuple[ExecutorName, ...] = ("process", "thread", "async")
BUILTIN_MODULES = ("worker_service.handlers.builtin",)

F = TypeVar("F", bound=Callable[..., Any])


class HandlerError(Exception):
    """Raised by a handler to fail its attempt with a code of its choosing.

    Not a `JobmeshError`: it never becomes a gRPC status, only the attempt's `JobError`.
    The default is not retryable, because a handler that names its failure knows it is
    permanent; any other exception is treated as transient and retried.
    """

    def __init__(self, message: str, code: str = "HANDLER_ERROR", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps code and retryable when the error crosses a process boundary.
        return (type(self), (self.message, self.code, self.retryable))


class JobCancelled(HandlerError):
    """Raise when `ctx.cancelled` is seen, to end the attempt as CANCELLED."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message, code="CANCELLED", retryable=False)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


@dataclass
class Result:
    """What a handler returns: named binary outputs and JSON-like metadata."""

    outputs: dict[str, bytes] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class JobContext:
    """One attempt of one job, as its handler sees it."""

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        kind: str,
        tenant: str = "",
        labels: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        inputs: Mapping[str, bytes] | None = None,
        report: Callable[[float, str], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.kind = kind
        self.tenant = tenant
        self.labels: dict[str, str] = dict(labels or {})
        self.params: dict[str, Any] = dict(params or {})
        """Numbers arrive as floats: the job's params travel as a protobuf Struct."""
        self.inputs: dict[str, bytes] = dict(inputs or {})
        self._report = report
        self._is_cancelled = is_cancelled

    def progress(self, fraction: float, message: str = "") -> None:
        """Reports how far the attempt is, 0 to 1 (clamped); safe from any thread."""
        fraction = float(fraction)
        fraction = 0.0 if math.isnan(fraction) else min(1.0, max(0.0, fraction))
        if self._report is not None:
            self._report(fraction, str(message))

    @property
    def cancelled(self) -> bool:
        """True once the gateway asked to cancel this attempt; stopping is up to the handler."""
        return self._is_cancelled is not None and self._is_cancelled()

    def raise_if_cancelled(self) -> None:
        """Raises `JobCancelled` if the attempt was cancelled."""
        if self.cancelled:
            raise JobCancelled()

    def __repr__(self) -> str:
        return f"JobContext(job_id={self.job_id!r}, attempt={self.attempt}, kind={self.kind!r})"


@dataclass(frozen=True)
class HandlerSpec:
    kind: str
    """The job kind the function serves."""
    fn: Callable[[JobContext], Any]
    """The function as written, sync or async."""
    executor: ExecutorName
    """Where it runs: a pool child process, a thread, or the worker's event loop."""
    concurrency: int = 0
    """At most this many at once on one replica; 0 means up to the replica's slots."""

    @property
    def module(self) -> str:
        return self.fn.__module__


class Registry:
    """Handlers by kind. Process-wide in practice (see `handler`); separate ones help tests."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}

    def handler(
        self, kind: str, *, executor: ExecutorName | None = None, concurrency: int = 0
    ) -> Callable[[F], F]:
        """Registers the decorated function for `kind` and returns it unchanged."""

        def register(fn: F) -> F:
            self.add(_spec(kind, fn, executor, concurrency))
            return fn

        return register

    def add(self, spec: HandlerSpec) -> None:
        old = self._specs.get(spec.kind)
        if old is not None and _identity(old.fn) != _identity(spec.fn):
            raise ValueError(
                f"kind {spec.kind!r} already has a handler: {_identity(old.fn)}, "
                f"not also {_identity(spec.fn)}"
            )
        self._specs[spec.kind] = spec

    def get(self, kind: str) -> HandlerSpec | None:
        return self._specs.get(kind)

    def specs(self) -> dict[str, HandlerSpec]:
        """A snapshot, by kind."""
        return dict(self._specs)


_DEFAULT = Registry()


def handler(
    kind: str, *, executor: ExecutorName | None = None, concurrency: int = 0
) -> Callable[[F], F]:
    """Makes the decorated function the handler of jobs of `kind`.

    A plain function runs in the worker's process pool unless `executor="thread"`;
    an `async def` runs on the worker's event loop. `concurrency` caps how many jobs of
    the kind one replica runs at once.
    """
    return _DEFAULT.handler(kind, executor=executor, concurrency=concurrency)


def default_registry() -> Registry:
    return _DEFAULT


def load_handlers(modules: Iterable[str] = ()) -> dict[str, HandlerSpec]:
    """Imports the built-in and the given handler modules; returns every handler known."""
    for name in (*BUILTIN_MODULES, *modules):
        importlib.import_module(name)
    return _DEFAULT.specs()


def _spec(
    kind: str, fn: Callable[..., Any], executor: ExecutorName | None, concurrency: int
) -> HandlerSpec:
    if not isinstance(kind, str) or not kind:
        raise ValueError("a handler's kind must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"@handler({kind!r}) must decorate a function")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0:
        raise ValueError(f"@handler({kind!r}): concurrency must be an int >= 0")
    is_async = inspect.iscoroutinefunction(fn)
    chosen: ExecutorName = executor or ("async" if is_async else "process")
    if chosen not in EXECUTORS:
        raise ValueError(f"@handler({kind!r}): executor must be one of {', '.join(EXECUTORS)}")
    if is_async != (chosen == "async"):
        raise ValueError(
            f"@handler({kind!r}): an async def runs on the event loop, a plain function in "
            f"a process or thread; got {'async def' if is_async else 'def'} "
            f"with executor={chosen!r}"
        )
    if chosen == "process" and "<locals>" in fn.__qualname__:
        raise ValueError(
            f"@handler({kind!r}): a process-pool handler must be defined at module level, "
            "so pool processes can import it"
        )
    return HandlerSpec(kind=kind, fn=fn, executor=chosen, concurrency=concurrency)


def _identity(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"
