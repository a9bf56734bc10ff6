"""The @handler decorator, the registry and JobContext, as a handler author meets them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from worker_service import JobContext, handler
from worker_service.registry import Registry, load_handlers
from worker_service.registry import handler as registry_handler


def plain(ctx: JobContext) -> None:
    return None


def other_plain(ctx: JobContext) -> None:
    return None


async def coro(ctx: JobContext) -> None:
    return None


def test_decorator_returns_the_function_unchanged() -> None:
    registry = Registry()
    assert registry.handler("k")(plain) is plain
    assert handler is registry_handler


def test_sync_runs_in_the_process_pool_and_async_on_the_loop_by_default() -> None:
    registry = Registry()
    registry.handler("sync")(plain)
    registry.handler("async")(coro)
    registry.handler("thread", executor="thread", concurrency=2)(other_plain)
    specs = registry.specs()
    assert (specs["sync"].executor, specs["sync"].concurrency) == ("process", 0)
    assert specs["async"].executor == "async"
    assert (specs["thread"].executor, specs["thread"].concurrency) == ("thread", 2)


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        (coro, {"executor": "process"}),
        (coro, {"executor": "thread"}),
        (plain, {"executor": "async"}),
        (plain, {"executor": "fork"}),
        (plain, {"concurrency": -1}),
        (plain, {"concurrency": 1.5}),
    ],
)
def test_impossible_combinations_fail_at_import(
    fn: Callable[[JobContext], object], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=r"@handler\('k'\)"):
        Registry().handler("k", **kwargs)(fn)


def test_empty_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Registry().handler("")(plain)


def test_a_process_handler_must_be_importable_by_pool_processes() -> None:
    def nested(ctx: JobContext) -> None:
        return None

    registry = Registry()
    with pytest.raises(ValueError, match="module level"):
        registry.handler("nested")(nested)
    registry.handler("nested", executor="thread")(nested)  # threads share the parent's objects


def test_two_functions_for_one_kind_is_an_error_but_reimport_is_not() -> None:
    registry = Registry()
    registry.handler("k")(plain)
    registry.handler("k")(plain)
    with pytest.raises(ValueError, match="already has a handler"):
        registry.handler("k")(other_plain)


def test_load_handlers_always_includes_the_builtins() -> None:
    specs = load_handlers(["tests.worker.handlers_for_tests"])
    assert {"echo", "sleep", "fail", "test.pid"} <= set(specs)
    assert specs["echo"].executor == "async"
    assert specs["sleep"].executor == "process"
    assert specs["test.one_at_a_time"].concurrency == 1


def test_unknown_module_fails_loudly() -> None:
    with pytest.raises(ModuleNotFoundError):
        load_handlers(["tests.worker.no_such_module"])


def test_progress_is_clamped_and_cancelled_reads_the_flag() -> None:
    reports: list[tuple[float, str]] = []
    flag = [False]
    ctx = JobContext(
        job_id="j",
        attempt=1,
        kind="k",
        report=lambda f, m: reports.append((f, m)),
        is_cancelled=lambda: flag[0],
    )
    ctx.progress(-1)
    ctx.progress(0.5, "half")
    ctx.progress(7, "done")
    ctx.progress(float("nan"))
    assert reports == [(0.0, ""), (0.5, "half"), (1.0, "done"), (0.0, "")]
    assert not ctx.cancelled
    flag[0] = True
    assert ctx.cancelled
