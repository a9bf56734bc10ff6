"""What handler authors write against: `@handler`, `JobContext`, `Result`, `HandlerError`
(imported as `jobmesh.worker`).

`@handler` records a function in a registry keyed by job kind and returns the function
unchanged, so process-pool children find it again by importing the same module.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from opentelemetry import trace

from jobmesh import telemetry
from jobmesh.codes import Code
from jobmesh.params import Param, Schema, check_schema

_tracer = trace.get_tracer("jobmesh.worker")

ExecutorName = Literal["process", "thread", "async"]
EXECUTORS: tuple[ExecutorName, ...] = ("process", "thread", "async")
PRODUCTS: dict[str, tuple[str, ...]] = {
    "builtin": ("worker_service.handlers.builtin",),
    "images": ("worker_service.handlers.images",),
}
"""The built-in products, each a set of kinds, and the modules that hold them."""
EXTRAS = {"images": "images"}
"""The pip extra (`jobmesh[images]`) that installs what a product needs."""

F = TypeVar("F", bound=Callable[..., Any])


class HandlerError(Exception):
    """Raised by a handler to fail its attempt with a code of its choosing.

    The code is a `jobmesh.Code` or a string of the handler's own; either way the attempt's
    error carries it with `retryable` as given here. Not a `JobmeshError`: it never becomes
    a gRPC status, only the attempt's `JobError`. The default is not retryable, because a
    handler that names its failure knows it is permanent; any other exception is treated as
    transient and retried.
    """

    def __init__(
        self, message: str, code: str = Code.HANDLER_ERROR, retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = str(code)  # the wire string, a member's or the handler's own
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps code and retryable when the error crosses a process boundary.
        return (type(self), (self.message, self.code, self.retryable))


class JobCancelled(HandlerError):
    """Raise when `ctx.cancelled` is seen, to end the attempt as CANCELLED."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message, code=Code.CANCELLED, retryable=False)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


@dataclass
class Result:
    """What a handler returns: named binary outputs and metadata, a JSON object (integers
    within +-(2^53 - 1)); anything else fails the attempt as INVALID_RESULT."""

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
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.kind = kind
        self.tenant = tenant
        self.labels: dict[str, str] = dict(labels or {})
        self.params: dict[str, Any] = dict(params or {})
        """The job's params, decoded and checked once by the worker. With a declared schema
        they are typed: an `integer` param is an `int`, a `number` a `float`, a choice in its
        declared spelling, and params not given (or null) are absent. Without one they are
        the JSON as sent (integers exact)."""
        self.inputs: dict[str, bytes] = dict(inputs or {})
        self._report = report
        self._is_cancelled = is_cancelled
        self.trace_context: dict[str, str] = dict(trace_context or {})
        """W3C trace context the handler runs in; `step` spans are children of it."""

    def step(self, name: str) -> AbstractContextManager[trace.Span]:
        """A span for one step of the handler (`with ctx.step("decode"): ...`), in the job's
        trace when tracing is on."""
        return _tracer.start_as_current_span(
            name, attributes={telemetry.JOB_ID: self.job_id, telemetry.ATTEMPT: self.attempt}
        )

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
    params: Schema | None = None
    """The params the kind takes; None: any (no schema is declared)."""

    @property
    def module(self) -> str:
        return self.fn.__module__


class Registry:
    """Handlers by kind. Process-wide in practice (see `handler`); separate ones help tests."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}

    def handler(
        self,
        kind: str,
        *,
        executor: ExecutorName | None = None,
        concurrency: int = 0,
        params: Sequence[Param] | None = None,
    ) -> Callable[[F], F]:
        """Registers the decorated function for `kind` and returns it unchanged."""
        schema = None if params is None else _schema(kind, params)

        def register(fn: F) -> F:
            self.add(_spec(kind, fn, executor, concurrency, schema))
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
    kind: str,
    *,
    executor: ExecutorName | None = None,
    concurrency: int = 0,
    params: Sequence[Param] | None = None,
) -> Callable[[F], F]:
    """Makes the decorated function the handler of jobs of `kind`.

    A plain function runs in the worker's process pool unless `executor="thread"`;
    an `async def` runs on the worker's event loop. `concurrency` caps how many jobs of
    the kind one replica runs at once. `params` declares every param the kind takes
    (`Param`s; an empty list: none): jobs with others, or ill-typed ones, are refused,
    and the handler gets the params typed (see `JobContext.params`).
    """
    return _DEFAULT.handler(kind, executor=executor, concurrency=concurrency, params=params)


def default_registry() -> Registry:
    return _DEFAULT


def load_handlers(
    modules: Iterable[str] = (), products: Iterable[str] = tuple(PRODUCTS)
) -> dict[str, HandlerSpec]:
    """Imports the given products' and handler modules; returns the handlers they serve.

    Kinds of a product left out are not returned even if their module was imported
    (by another module, say).
    """
    enabled = set(products)
    if unknown := enabled - set(PRODUCTS):
        raise ValueError(f"unknown products: {', '.join(sorted(unknown))}")
    modules = tuple(modules)
    if modules:
        _search_cwd()
    for product in (p for p in PRODUCTS if p in enabled):
        try:
            for name in PRODUCTS[product]:
                importlib.import_module(name)
        except ModuleNotFoundError as e:
            if product not in EXTRAS:
                raise
            raise ValueError(
                f"the {product} product needs {e.name}: pip install 'jobmesh[{EXTRAS[product]}]' "
                f"(or leave the product out: --products with the others)"
            ) from None
    for name in modules:
        importlib.import_module(name)
    left_out = {m for p, ms in PRODUCTS.items() if p not in enabled for m in ms}
    return {k: s for k, s in _DEFAULT.specs().items() if s.module not in left_out}


def _search_cwd() -> None:
    # As `python -m` does: `jobmesh worker --handlers myapp.jobs` finds ./myapp/jobs.py, though
    # the `jobmesh` script puts only its own directory on sys.path.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _schema(kind: str, params: Sequence[Param]) -> Schema:
    if isinstance(params, str | bytes | Mapping):
        raise TypeError(f"@handler({kind!r}): params must be a list of Param")
    try:
        return check_schema(params)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"@handler({kind!r}): {exc}") from None


def _spec(
    kind: str,
    fn: Callable[..., Any],
    executor: ExecutorName | None,
    concurrency: int,
    params: Schema | None = None,
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
    return HandlerSpec(kind=kind, fn=fn, executor=chosen, concurrency=concurrency, params=params)


def _identity(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"
