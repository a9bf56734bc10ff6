"""Runs a task where its handler asked to run: pool process, thread, or the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jobmesh.v1 import job_pb2
from worker_service import outcomes
from worker_service.outcomes import Outcome
from worker_service.pool import ProcessPool
from worker_service.progress import ProgressFn, loop_reporter
from worker_service.registry import HandlerSpec
from worker_service.task import AttemptKey, Task

# Room for the rest of a Completed message around the result.
_ENVELOPE_BYTES = 64 * 1024


class Executor:
    """Runs tasks by kind and carries cancellation to them, cooperatively."""

    def __init__(
        self,
        specs: Mapping[str, HandlerSpec],
        pool: ProcessPool | None,
        *,
        threads: int,
        max_result_bytes: int,
    ) -> None:
        self._specs = dict(specs)
        self._pool = pool
        self._threads = ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="jobmesh-handler"
        )
        self._max_result_bytes = max(1, max_result_bytes - _ENVELOPE_BYTES)
        self._cancel_flags: dict[AttemptKey, threading.Event] = {}
        self._busy_threads = 0

    @property
    def busy_threads(self) -> int:
        """Thread handlers running now; they cannot be stopped from outside."""
        return self._busy_threads

    def run(self, task: Task, on_progress: ProgressFn) -> Coroutine[Any, Any, Outcome]:
        """Runs `task` to its outcome; the handler's failures come back as JobError.

        Not `async def`: the attempt is cancellable from this call on, before the
        returned coroutine first runs (a Cancel may follow its Assign closely).
        """
        cancelled = threading.Event()
        self._cancel_flags[task.key] = cancelled
        return self._run_to_outcome(task, cancelled, on_progress)

    async def _run_to_outcome(
        self, task: Task, cancelled: threading.Event, on_progress: ProgressFn
    ) -> Outcome:
        try:
            spec = self._specs.get(task.kind)
            if spec is None:
                return outcomes.error("UNKNOWN_KIND", f"no handler for kind {task.kind!r}", False)
            outcome = await self._run(spec, task, cancelled, on_progress)
        finally:
            self._cancel_flags.pop(task.key, None)
        if isinstance(outcome, job_pb2.JobResult) and outcome.ByteSize() > self._max_result_bytes:
            return outcomes.error(
                "RESULT_TOO_LARGE",
                f"the result is {outcome.ByteSize()} bytes; "
                f"at most {self._max_result_bytes} fit in a message",
                False,
            )
        return outcome

    def cancel(self, key: AttemptKey) -> bool:
        """Raises the attempt's cancel flag; False if the attempt is not running here."""
        flag = self._cancel_flags.get(key)
        if flag is None:
            return False
        flag.set()
        if self._pool is not None:
            self._pool.notify_cancel(key)
        return True

    def close(self) -> None:
        """Stops taking thread work; a thread handler still running cannot be interrupted."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _thread_done(self, _: object) -> None:
        self._busy_threads -= 1

    async def _run(
        self, spec: HandlerSpec, task: Task, cancelled: threading.Event, on_progress: ProgressFn
    ) -> Outcome:
        if spec.executor == "process":
            if self._pool is None:
                return outcomes.error("UNKNOWN_KIND", "this worker has no process pool", False)
            return await self._pool.run(task, cancelled, on_progress)
        ctx = task.context(loop_reporter(on_progress), cancelled.is_set)
        if spec.executor == "thread":
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._threads, outcomes.run_sync, spec.fn, ctx)
            self._busy_threads += 1
            future.add_done_callback(self._thread_done)
            return await future
        return await outcomes.run_async(spec.fn, ctx)
