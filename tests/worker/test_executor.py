"""Executors: where handlers run, progress, cancellation, timeouts, stopping by force."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from jobmesh.v1 import job_pb2
from tests.worker.fake_gateway import until
from worker_service.executor import Executor
from worker_service.outcomes import Outcome
from worker_service.pool import ProcessPool
from worker_service.registry import load_handlers
from worker_service.task import Task

HANDLERS = "tests.worker.handlers_for_tests"


@pytest.fixture
async def executor() -> AsyncIterator[Executor]:
    specs = load_handlers([HANDLERS])
    in_process = {k: s for k, s in specs.items() if s.executor != "process"}
    ex = Executor(in_process, None, threads=2)
    yield ex
    ex.close()


def task(kind: str, **params: object) -> Task:
    return Task(job_id="j", attempt=1, kind=kind, params_json=json.dumps(params))


async def test_thread_handlers_run_in_a_thread_and_report_progress(executor: Executor) -> None:
    seen: list[tuple[float, str]] = []
    outcome = await executor.run(task("test.thread"), lambda f, m: seen.append((f, m)))
    assert isinstance(outcome, job_pb2.JobResult)
    assert outcome.outputs["thread"].startswith(b"jobmesh-handler")
    assert seen == [(0.5, "halfway")]


async def test_async_handlers_run_in_this_process(executor: Executor) -> None:
    seen: list[tuple[float, str]] = []
    outcome = await executor.run(task("test.async"), lambda f, m: seen.append((f, m)))
    assert isinstance(outcome, job_pb2.JobResult)
    assert json.loads(outcome.metadata_json) == {"pid": os.getpid()}
    assert seen == [(0.5, "halfway")]


@pytest.mark.parametrize("kind", ["test.thread", "test.async"])
async def test_cancel_sets_the_flag_the_handler_reads(executor: Executor, kind: str) -> None:
    started = asyncio.Event()
    t = task(kind, wait_cancel=True)
    running = asyncio.ensure_future(executor.run(t, lambda f, m: started.set()))
    await asyncio.wait_for(started.wait(), 10)
    assert executor.cancel(t.key)
    outcome = await asyncio.wait_for(running, 10)
    assert isinstance(outcome, job_pb2.JobError)
    assert (outcome.code, outcome.retryable) == ("CANCELLED", False)
    assert not executor.cancel(t.key)  # over: nothing to cancel


async def test_a_result_larger_than_a_message_comes_back_whole(executor: Executor) -> None:
    # Its size is checked only once the replica has moved large outputs to blobs.
    outcome: Outcome = await executor.run(task("test.big", size=2 << 20), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobResult)
    assert len(outcome.outputs["blob"]) == 2 << 20


async def test_an_unknown_kind_fails(executor: Executor) -> None:
    outcome = await executor.run(task("no.such.kind"), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobError)
    assert outcome.code == "UNKNOWN_KIND"


# Stopping handlers: on timeout or cancel, the flag first, force after the grace.

GRACE = 0.3


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPool]:
    p = ProcessPool(1, [HANDLERS])
    p.start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def stopper(pool: ProcessPool) -> AsyncIterator[Executor]:
    ex = Executor(load_handlers([HANDLERS]), pool, threads=2, cancel_grace=GRACE)
    yield ex
    ex.close()


def timed(kind: str, timeout: float | None, job_id: str = "j", **params: object) -> Task:
    return Task(
        job_id=job_id, attempt=1, kind=kind, params_json=json.dumps(params), timeout=timeout
    )


def failure(outcome: Outcome) -> job_pb2.JobError:
    assert isinstance(outcome, job_pb2.JobError), outcome
    return outcome


async def started(ex: Executor, t: Task) -> tuple[asyncio.Future[Outcome], list[str]]:
    """Starts `t` and returns once its handler reported (the stubborn ones say so first)."""
    first = asyncio.Event()
    messages: list[str] = []

    def on_progress(fraction: float, message: str) -> None:
        messages.append(message)
        first.set()

    running = asyncio.ensure_future(ex.run(t, on_progress))
    await asyncio.wait_for(first.wait(), 30)
    return running, messages


async def test_a_pool_handler_that_ignores_its_timeout_is_killed(
    stopper: Executor, pool: ProcessPool
) -> None:
    running, messages = await started(stopper, timed("test.stubborn", 0.3, spin=True))
    e = failure(await asyncio.wait_for(running, 30))
    assert (e.code, e.retryable) == ("TIMEOUT", True)
    assert "0.3 s limit" in e.message
    assert "killed" in e.message
    # The pool has its one process again, a new one, and it serves.
    outcome = await stopper.run(timed("test.pid", 30, "next"), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobResult)
    assert pool.pids() != [int(messages[0])]


async def test_a_handler_that_stops_when_asked_times_out_without_a_kill(
    stopper: Executor, pool: ProcessPool
) -> None:
    before = pool.pids()
    e = failure(await stopper.run(timed("test.block", 0.2), lambda f, m: None))
    assert (e.code, e.retryable, e.message) == (
        "TIMEOUT",
        True,
        "the attempt ran longer than its 0.2 s limit",
    )
    assert pool.pids() == before


async def test_cancel_kills_a_pool_handler_that_ignores_it(
    stopper: Executor, pool: ProcessPool
) -> None:
    t = timed("test.stubborn", None)
    running, messages = await started(stopper, t)
    assert stopper.cancel(t.key, "the user changed their mind")
    e = failure(await asyncio.wait_for(running, 30))
    assert (e.code, e.retryable) == ("CANCELLED", False)
    assert e.message.startswith("the user changed their mind")
    outcome = await stopper.run(timed("test.pid", None, "next"), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobResult)
    assert pool.pids() != [int(messages[0])]


async def test_a_handler_that_honours_a_cancel_keeps_its_own_message(stopper: Executor) -> None:
    t = timed("test.block", None)
    running, _ = await started(stopper, t)
    stopper.cancel(t.key)
    assert failure(await asyncio.wait_for(running, 30)) == job_pb2.JobError(
        code="CANCELLED", message="cancelled", retryable=False
    )


async def test_an_async_handler_that_ignores_its_timeout_is_cancelled(stopper: Executor) -> None:
    e = failure(await stopper.run(timed("test.stubborn_async", 0.2), lambda f, m: None))
    assert (e.code, e.retryable) == ("TIMEOUT", True)
    assert "cancelled" in e.message
    assert stopper.held() == 0


async def test_a_thread_handler_that_ignores_its_timeout_holds_its_slot_until_it_returns(
    stopper: Executor,
) -> None:
    t = timed("test.stubborn_thread", 0.2, seconds=1.5)
    e = failure(await stopper.run(t, lambda f, m: None))
    assert (e.code, e.retryable) == ("TIMEOUT", True)
    assert "still holds its slot" in e.message
    assert (stopper.held(), stopper.held("test.stubborn_thread"), stopper.busy_threads) == (1, 1, 1)
    await until(lambda: stopper.held() == 0)
    assert stopper.busy_threads == 0


async def test_a_handler_that_ends_in_time_is_not_touched(stopper: Executor) -> None:
    outcome = await stopper.run(timed("sleep", 30, seconds=0.1), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobResult)
