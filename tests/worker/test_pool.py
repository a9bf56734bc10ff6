"""The process pool: real spawned children, real deaths, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator

import pytest

from jobmesh.v1 import job_pb2
from worker_service.outcomes import Outcome
from worker_service.pool import PoolError, ProcessPool
from worker_service.task import Task

HANDLERS = "tests.worker.handlers_for_tests"


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPool]:
    p = ProcessPool(2, [HANDLERS])
    p.start()
    try:
        yield p
    finally:
        p.close()


def task(kind: str, job_id: str = "job", **params: object) -> Task:
    """A task as the executor hands it to the pool: params already decoded and typed."""
    return Task(job_id=job_id, attempt=1, kind=kind, params=dict(params), inputs={"in": b"data"})


async def run(pool: ProcessPool, t: Task, cancelled: threading.Event | None = None) -> Outcome:
    return await pool.run(t, cancelled or threading.Event(), lambda f, m: None)


def metadata(outcome: Outcome) -> dict[str, object]:
    assert isinstance(outcome, job_pb2.JobResult), outcome
    meta: dict[str, object] = json.loads(outcome.metadata_json)
    return meta


def error(outcome: Outcome) -> job_pb2.JobError:
    assert isinstance(outcome, job_pb2.JobError), outcome
    return outcome


async def test_a_sync_handler_runs_in_a_child_process(pool: ProcessPool) -> None:
    meta = metadata(await run(pool, task("test.pid", n=3)))
    assert meta["pid"] != os.getpid()
    assert meta["pid"] in pool.pids()
    assert meta["params"] == {"n": 3}
    assert meta["inputs"] == ["in"]


async def test_jobs_run_side_by_side(pool: ProcessPool) -> None:
    _, b = await asyncio.gather(
        run(pool, task("test.pid", "a")), run(pool, task("sleep", "b", seconds=0.2))
    )
    assert metadata(b) == {"slept": 0.2}


async def test_progress_reaches_the_loop(pool: ProcessPool) -> None:
    seen: list[tuple[float, str]] = []
    outcome = await pool.run(
        task("test.progress"), threading.Event(), lambda f, m: seen.append((f, m))
    )
    assert isinstance(outcome, job_pb2.JobResult)
    assert seen == [(0.25, "step 0.25"), (0.5, "step 0.5"), (0.75, "step 0.75")]


async def test_handler_errors_cross_the_process_boundary(pool: ProcessPool) -> None:
    assert error(await run(pool, task("test.handler_error", retry=True))) == job_pb2.JobError(
        code="BAD_INPUT", message="bad input", retryable=True
    )
    assert error(await run(pool, task("test.raise"))) == job_pb2.JobError(
        code="HANDLER_ERROR", message="ValueError: boom", retryable=True
    )


async def test_a_child_that_exits_fails_only_its_job(pool: ProcessPool) -> None:
    e = error(await run(pool, task("test.exit", code=3)))
    assert (e.code, e.retryable) == ("WORKER_PROCESS_DIED", True)
    assert "code 3" in e.message
    for i in range(3):  # more jobs than the one child left, so the replacement serves too
        assert "pid" in metadata(await run(pool, task("test.pid", f"after-{i}")))
    await _until(lambda: len(pool.pids()) == 2)


async def test_a_child_killed_mid_job_fails_that_job(pool: ProcessPool) -> None:
    started = asyncio.Event()
    pids: list[int] = []

    def on_progress(fraction: float, message: str) -> None:
        pids.append(int(message))
        started.set()

    running = asyncio.ensure_future(pool.run(task("test.block"), threading.Event(), on_progress))
    await asyncio.wait_for(started.wait(), 30)
    os.kill(pids[0], signal.SIGKILL)
    e = error(await running)
    assert (e.code, e.retryable) == ("WORKER_PROCESS_DIED", True)
    assert "pid" in metadata(await run(pool, task("test.pid", "next")))
    await _until(lambda: len(pool.pids()) == 2 and pids[0] not in pool.pids())


async def test_cancel_reaches_a_sleep_in_a_child(pool: ProcessPool) -> None:
    cancelled = threading.Event()
    started = asyncio.Event()
    t = task("sleep", "long", seconds=30)
    running = asyncio.ensure_future(pool.run(t, cancelled, lambda f, m: started.set()))
    await asyncio.wait_for(started.wait(), 30)  # first tenth slept: it runs in a child
    cancelled.set()
    pool.notify_cancel(t.key)
    e = error(await asyncio.wait_for(running, 30))
    assert (e.code, e.retryable) == ("CANCELLED", False)
    # The next job in that child does not inherit the cancel.
    assert metadata(await run(pool, task("sleep", "short", seconds=0.1))) == {"slept": 0.1}


async def test_a_cancel_that_arrives_before_dispatch_is_not_lost(pool: ProcessPool) -> None:
    cancelled = threading.Event()
    cancelled.set()
    e = error(await run(pool, task("sleep", "early", seconds=30), cancelled))
    assert e.code == "CANCELLED"


async def test_a_segfault_fails_only_its_job(pool: ProcessPool) -> None:
    e = error(await run(pool, task("test.segfault")))
    assert (e.code, e.retryable) == ("WORKER_PROCESS_DIED", True)
    assert f"code {-signal.SIGSEGV}" in e.message
    await _until(lambda: len(pool.pids()) == 2)
    assert "pid" in metadata(await run(pool, task("test.pid", "next")))


async def test_kill_ends_a_job_that_ignores_its_cancel_flag(pool: ProcessPool) -> None:
    started = asyncio.Event()
    pids: list[int] = []

    def on_progress(fraction: float, message: str) -> None:
        pids.append(int(message))
        started.set()

    t = task("test.stubborn", "spinning", spin=True)
    cancelled = threading.Event()
    running = asyncio.ensure_future(pool.run(t, cancelled, on_progress))
    await asyncio.wait_for(started.wait(), 30)
    cancelled.set()
    pool.notify_cancel(t.key)  # ignored by this handler
    reason = job_pb2.JobError(code="TIMEOUT", message="too long", retryable=True)
    assert pool.kill(t.key, reason)
    assert error(await asyncio.wait_for(running, 30)) == reason
    assert not pool.kill(t.key, reason)  # over: nothing to kill
    await _until(lambda: len(pool.pids()) == 2 and pids[0] not in pool.pids())
    for i in range(3):
        assert "pid" in metadata(await run(pool, task("test.pid", f"after-{i}")))


async def test_a_job_killed_while_it_waits_for_a_process_never_starts(pool: ProcessPool) -> None:
    started = [asyncio.Event(), asyncio.Event()]
    busy = [
        asyncio.ensure_future(
            pool.run(task("test.stubborn", f"busy{i}"), threading.Event(), _sets(event))
        )
        for i, event in enumerate(started)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    waiting = asyncio.ensure_future(run(pool, task("test.pid", "waiting")))
    await asyncio.sleep(0.2)
    reason = job_pb2.JobError(code="CANCELLED", message="no longer wanted")
    assert pool.kill(("waiting", 1), reason)
    assert error(await asyncio.wait_for(waiting, 30)) == reason
    for i, running in enumerate(busy):
        assert pool.kill((f"busy{i}", 1), reason)
        assert error(await asyncio.wait_for(running, 30)) == reason
    await _until(lambda: len(pool.pids()) == 2)
    assert "pid" in metadata(await run(pool, task("test.pid", "next")))


async def test_a_job_over_the_memory_limit_is_killed_and_its_process_replaced() -> None:
    limited = ProcessPool(1, [HANDLERS], memory_limit=150 << 20)
    limited.start()
    try:
        first = limited.pids()
        e = error(await run(limited, task("test.hog", "hog", mib=1024)))
        assert (e.code, e.retryable) == ("MEMORY_LIMIT_EXCEEDED", False)
        assert "limit of 150.0 MiB" in e.message
        assert metadata(await run(limited, task("test.hog", "small", mib=32, hold=0))) == {
            "mib": 32
        }
        assert len(limited.pids()) == 1
        assert limited.pids() != first
    finally:
        limited.close()


def test_a_handler_module_that_does_not_import_stops_the_start() -> None:
    bad = ProcessPool(1, ["tests.worker.no_such_module"], start_timeout=30)
    with pytest.raises(PoolError, match="no_such_module"):
        bad.start()
    bad.close()


def test_children_exit_when_the_pool_closes() -> None:
    p = ProcessPool(1, [])
    p.start()
    pids = p.pids()
    p.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _sets(event: asyncio.Event) -> Callable[[float, str], None]:
    return lambda fraction, message: event.set()


async def _until(condition: Callable[[], bool]) -> None:
    """Polls `condition`: replacing a child announces itself to nobody."""
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition never held")
