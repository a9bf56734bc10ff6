"""Thread and event-loop handlers: where they run, progress, cancellation, result limits."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from google.protobuf import json_format

from jobmesh.v1 import job_pb2
from worker_service.executor import Executor
from worker_service.outcomes import Outcome
from worker_service.registry import load_handlers
from worker_service.task import Task


@pytest.fixture
async def executor() -> AsyncIterator[Executor]:
    specs = load_handlers(["tests.worker.handlers_for_tests"])
    in_process = {k: s for k, s in specs.items() if s.executor != "process"}
    ex = Executor(in_process, None, threads=2, max_result_bytes=1 << 20)
    yield ex
    ex.close()


def task(kind: str, **params: object) -> Task:
    return Task(job_id="j", attempt=1, kind=kind, params=dict(params))


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
    assert json_format.MessageToDict(outcome.metadata) == {"pid": os.getpid()}
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


async def test_a_result_too_large_for_a_message_fails_without_retry(executor: Executor) -> None:
    outcome: Outcome = await executor.run(task("test.big", size=2 << 20), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobError)
    assert (outcome.code, outcome.retryable) == ("RESULT_TOO_LARGE", False)


async def test_an_unknown_kind_fails(executor: Executor) -> None:
    outcome = await executor.run(task("no.such.kind"), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobError)
    assert outcome.code == "UNKNOWN_KIND"
