"""Runs a task where its handler asked to run: pool process, thread, or the event loop.

Each attempt is watched until it ends. On a cancel, or when its timeout runs out, the
handler's cancel flag goes up first (`ctx.cancelled`); a handler still running
`cancel_grace` seconds later is stopped by force: its pool process is killed (the pool
replaces it), its asyncio task is cancelled. A thread cannot be stopped: its attempt is
reported all the same, and the thread holds a slot (`held`) until it returns.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from jobmesh import codes
from jobmesh.codes import Code
from jobmesh.errors import InvalidArgument
from jobmesh.v1 import job_pb2
from worker_service import outcomes
from worker_service.outcomes import Outcome
from worker_service.pool import ProcessPool
from worker_service.progress import ProgressFn, loop_reporter
from worker_service.registry import HandlerSpec
from worker_service.task import AttemptKey, Task

log = logging.getLogger("worker_service")

# How long a cancelled asyncio task gets to unwind before it is left to itself.
_UNWIND_SECONDS = 1.0


@dataclass(eq=False)
class _Attempt:
    task: Task
    cancelled: threading.Event = field(default_factory=threading.Event)
    """What the handler reads as `ctx.cancelled`."""
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    """Set with `stop`, to wake the attempt's watch."""
    stop: job_pb2.JobError | None = None
    """Why the attempt must end (CANCELLED or TIMEOUT); it ends with this error."""


class Executor:
    """Runs tasks by kind; stops them on cancel or timeout, by force after `cancel_grace`."""

    def __init__(
        self,
        specs: Mapping[str, HandlerSpec],
        pool: ProcessPool | None,
        *,
        threads: int,
        cancel_grace: float = 5.0,
    ) -> None:
        self._specs = dict(specs)
        self._pool = pool
        self._threads = ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="jobmesh-handler"
        )
        self._cancel_grace = cancel_grace
        self._attempts: dict[AttemptKey, _Attempt] = {}
        self._busy_threads = 0
        self._held: Counter[str] = Counter()

    @property
    def busy_threads(self) -> int:
        """Thread handlers running now; they cannot be stopped from outside."""
        return self._busy_threads

    def held(self, kind: str | None = None) -> int:
        """Slots held by handlers (of `kind`) still running after their attempt was reported."""
        return self._held[kind] if kind is not None else self._held.total()

    def run(self, task: Task, on_progress: ProgressFn) -> Coroutine[Any, Any, Outcome]:
        """Runs `task` to its outcome; the handler's failures come back as JobError.

        Not `async def`: the attempt is cancellable, and its timeout runs, from this call
        on, before the returned coroutine first runs (a Cancel may follow its Assign closely).
        """
        attempt = _Attempt(task)
        self._attempts[task.key] = attempt
        if task.timeout is not None:
            limit = task.timeout
            timer = asyncio.get_running_loop().call_later(
                limit,
                self._stop,
                attempt,
                Code.TIMEOUT.error(f"the attempt ran longer than its {limit:g} s limit"),
            )
        else:
            timer = None
        return self._run_to_outcome(attempt, on_progress, timer)

    def cancel(self, key: AttemptKey, reason: str = "") -> bool:
        """Stops the attempt as CANCELLED; False if the attempt is not running here."""
        attempt = self._attempts.get(key)
        if attempt is None:
            return False
        self._stop(attempt, Code.CANCELLED.error(reason or "cancelled on request"))
        return True

    def close(self) -> None:
        """Stops taking thread work; a thread handler still running cannot be interrupted."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _stop(self, attempt: _Attempt, error: job_pb2.JobError) -> None:
        if attempt.stop is not None:  # the first reason stands
            return
        attempt.stop = error
        attempt.cancelled.set()
        if self._pool is not None:
            self._pool.notify_cancel(attempt.task.key)
        attempt.stopping.set()

    async def _run_to_outcome(
        self, attempt: _Attempt, on_progress: ProgressFn, timer: asyncio.TimerHandle | None
    ) -> Outcome:
        task = attempt.task
        try:
            spec = self._specs.get(task.kind)
            if spec is None:
                return Code.UNKNOWN_KIND.error(f"no handler for kind {task.kind!r}")
            # Once, here: the handler reads typed values and checks nothing. The gateway
            # checked at Submit too; this covers a job submitted before the schema changed.
            try:
                attempt.task = task = task.with_params(spec.params)
            except InvalidArgument as exc:
                return Code.INVALID_PARAMS.error(exc.message)
            # Not checked for size here: the replica moves large outputs to blobs first.
            return await self._watch(spec, attempt, on_progress)
        finally:
            if timer is not None:
                timer.cancel()
            self._attempts.pop(task.key, None)

    async def _watch(
        self, spec: HandlerSpec, attempt: _Attempt, on_progress: ProgressFn
    ) -> Outcome:
        """Runs the handler; stops it when `attempt.stop` is set, by force after the grace."""
        handler = asyncio.ensure_future(self._run(spec, attempt, on_progress))
        stopping = asyncio.ensure_future(attempt.stopping.wait())
        forced = ""
        try:
            await asyncio.wait({handler, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done():
                await asyncio.wait({handler}, timeout=self._cancel_grace)
            if not handler.done():
                forced = await self._force_stop(spec, attempt, handler)
        except asyncio.CancelledError:
            handler.cancel()
            raise
        finally:
            stopping.cancel()
        stop = attempt.stop
        if stop is None:
            return handler.result()
        if not handler.done():
            self._hold(spec.kind, handler)
        elif not handler.cancelled() and handler.exception() is None:
            own = handler.result()
            # A handler that saw the cancel and said so keeps its own words.
            if (
                stop.code == Code.CANCELLED
                and isinstance(own, job_pb2.JobError)
                and own.code == stop.code
            ):
                return own
        return codes.error(stop.code, stop.message + forced, stop.retryable)

    async def _force_stop(
        self, spec: HandlerSpec, attempt: _Attempt, handler: asyncio.Future[Outcome]
    ) -> str:
        """Stops a handler that ignored its cancel flag; returns what to add to the message."""
        job_id, number = attempt.task.key
        grace = self._cancel_grace
        assert attempt.stop is not None
        if spec.executor == "process" and self._pool is not None:
            log.warning(
                "job %s attempt %d: still running %g s after %s; killing its pool process",
                job_id,
                number,
                grace,
                attempt.stop.code,
            )
            self._pool.kill(attempt.task.key, attempt.stop)
            await asyncio.wait({handler})  # the pool answers as soon as the child is gone
            return f"; its pool process was killed {grace:g} s later"
        if spec.executor == "async":
            log.warning(
                "job %s attempt %d: still running %g s after %s; cancelling its task",
                job_id,
                number,
                grace,
                attempt.stop.code,
            )
            handler.cancel()
            await asyncio.wait({handler}, timeout=_UNWIND_SECONDS)
            if handler.done():
                return f"; the handler was cancelled {grace:g} s later"
        log.warning(
            "job %s attempt %d: %s handler still running %g s after %s and it cannot be "
            "killed; reported anyway, it keeps its slot until it returns",
            job_id,
            number,
            spec.executor,
            grace,
            attempt.stop.code,
        )
        return "; the handler did not stop and still holds its slot"

    def _hold(self, kind: str, handler: asyncio.Future[Outcome]) -> None:
        self._held[kind] += 1

        def release(future: asyncio.Future[Outcome]) -> None:
            self._held[kind] -= 1
            if not future.cancelled():
                future.exception()  # retrieved: nobody else will
            log.info("a %s handler that outlived its attempt has returned", kind)

        handler.add_done_callback(release)

    def _thread_done(self, _: object) -> None:
        self._busy_threads -= 1

    async def _run(self, spec: HandlerSpec, attempt: _Attempt, on_progress: ProgressFn) -> Outcome:
        task = attempt.task
        if spec.executor == "process":
            if self._pool is None:
                return Code.UNKNOWN_KIND.error("this worker has no process pool")
            return await self._pool.run(task, attempt.cancelled, on_progress)
        ctx = task.context(loop_reporter(on_progress), attempt.cancelled.is_set)
        if spec.executor == "thread":
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._threads, outcomes.run_sync, spec.fn, ctx)
            self._busy_threads += 1
            future.add_done_callback(self._thread_done)
            return await future
        return await outcomes.run_async(spec.fn, ctx)
