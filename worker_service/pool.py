"""A process pool that survives its children: one that dies fails only its own job.

`concurrent.futures.ProcessPoolExecutor` marks itself broken when any child dies; here a
dead child costs its job (WORKER_PROCESS_DIED, retryable) and is replaced. The pool also
kills children on purpose: a job that must stop now (`kill`) or whose child's RSS passes
the memory limit; that job ends with the reason given, and the child is replaced too.
Children start with `spawn`, because grpcio and fork() do not mix. Each child owns a duplex
pipe and a cancel Event; blocking pipe I/O and the memory watch run in the pool's own
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import psutil

from jobmesh import telemetry
from jobmesh.codes import Code
from jobmesh.v1 import job_pb2
from worker_service import outcomes
from worker_service.outcomes import Outcome
from worker_service.progress import ProgressFn, loop_reporter
from worker_service.registry import default_registry, load_handlers
from worker_service.task import AttemptKey, Task

log = logging.getLogger("worker_service")

# How often an idle wait and a child's parent watch look up from what they wait on.
_POLL_SECONDS = 0.5
# How often a busy child's RSS is read against the memory limit.
WATCH_SECONDS = 0.2


class PoolError(Exception):
    """The pool could not start a child process (usually a handler module fails to import)."""


@dataclass(eq=False)  # compared and hashed by identity
class _Child:
    process: SpawnProcess
    conn: Connection
    cancel: MpEvent
    killed: bool = False
    """Killed by the pool on purpose; never reused."""
    ps: psutil.Process | None = None

    def rss(self) -> int:
        if self.ps is None:
            self.ps = psutil.Process(self.process.pid)
        return self.ps.memory_info().rss


@dataclass(eq=False)
class _Job:
    """One task from `run` to its outcome; guarded by the pool's lock."""

    child: _Child | None = None
    """The child running it, once one is free."""
    stop: job_pb2.JobError | None = None
    """Set when the job was stopped from outside; the job ends with it."""


class ProcessPool:
    """`size` spawned children that import `modules` and run sync handlers by kind.

    Each child calls `initializer(*initargs)`, if given, once its handlers are loaded
    (a module-level function, so the child can import it).
    """

    def __init__(
        self,
        size: int,
        modules: Sequence[str],
        *,
        start_timeout: float = 60.0,
        memory_limit: int = 0,
        watch_interval: float = WATCH_SECONDS,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._size = size
        self._modules = tuple(dict.fromkeys(modules))
        self._initializer = initializer
        self._initargs = initargs
        self._start_timeout = start_timeout
        self._memory_limit = memory_limit
        self._watch_interval = watch_interval
        self._mp = multiprocessing.get_context("spawn")
        # One thread per running job plus room for replacing dead children meanwhile.
        self._threads = ThreadPoolExecutor(max_workers=2 * size, thread_name_prefix="jobmesh-pool")
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._children: set[_Child] = set()
        self._jobs: dict[AttemptKey, _Job] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()

    @property
    def size(self) -> int:
        return self._size

    def start(self) -> None:
        """Starts every child and waits until each has imported its handlers (blocking)."""
        children = [self._launch() for _ in range(self._size)]
        try:
            for child in children:
                self._await_ready(child)
        except BaseException:
            for child in children:
                _kill(child)
            raise
        for child in children:
            self._adopt(child)

    async def run(self, task: Task, cancelled: threading.Event, on_progress: ProgressFn) -> Outcome:
        """Runs `task` in a free child; `on_progress` is called on the caller's loop."""
        loop = asyncio.get_running_loop()
        report = loop_reporter(on_progress)
        job = _Job()
        with self._lock:  # known from now on, so `kill` reaches it even before a child is free
            self._jobs[task.key] = job
        try:
            return await loop.run_in_executor(
                self._threads, self._exchange, task, job, cancelled, report
            )
        except asyncio.CancelledError:
            # The caller gave up (shutdown). A job still waiting for a child must not start.
            self._stop(job, Code.WORKER_SHUTDOWN.error("the worker is shutting down"))
            raise

    def notify_cancel(self, key: AttemptKey) -> None:
        """Sets the cancel Event of the child running `key`, if one is."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.child is not None:
                job.child.cancel.set()

    def kill(self, key: AttemptKey, error: job_pb2.JobError) -> bool:
        """Ends the job `key` with `error` now: its child is killed (and replaced), or, if it
        waits for a child still, it never starts. False if the pool does not run `key`."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            return False
        self._stop(job, error)
        return True

    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for c in self._children if c.process.pid is not None]

    def close(self, timeout: float = 5.0) -> None:
        """Stops idle children, kills busy ones (their jobs fail), waits for all (blocking)."""
        with self._lock:
            self._closing.set()
            children = list(self._children)
            busy = {job.child for job in self._jobs.values() if job.child is not None}
        for child in children:
            if child in busy:
                child.process.kill()
            else:
                with contextlib.suppress(OSError):
                    child.conn.send(None)
        deadline = time.monotonic() + timeout
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                child.process.kill()
                child.process.join(1.0)
        self._threads.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._children.clear()
        for child in children:
            child.conn.close()

    def kill_now(self) -> None:
        """SIGKILLs every child without waiting; for an immediate exit."""
        with self._lock:
            self._closing.set()
            children = list(self._children)
        for child in children:
            with contextlib.suppress(Exception):
                child.process.kill()

    # Everything below runs in the pool's threads.

    def _launch(self) -> _Child:
        parent_end, child_end = self._mp.Pipe(duplex=True)
        cancel = self._mp.Event()
        process = self._mp.Process(
            target=_child_main,
            args=(
                child_end,
                cancel,
                self._modules,
                os.getpid(),
                log.getEffectiveLevel(),
                self._initializer,
                self._initargs,
            ),
            name="jobmesh-pool",
            # Daemonic, so an abrupt exit of the worker takes its children along.
            daemon=True,
        )
        process.start()
        child_end.close()  # so the parent sees EOF when the child dies
        return _Child(process, parent_end, cancel)

    def _await_ready(self, child: _Child) -> None:
        if not child.conn.poll(self._start_timeout):
            raise PoolError(f"pool process {child.process.pid} did not start in time")
        try:
            message = child.conn.recv()
        except (EOFError, OSError):
            child.process.join(1.0)
            raise PoolError(
                f"pool process {child.process.pid} exited with code {child.process.exitcode} "
                "while starting"
            ) from None
        if message[0] != "ready":
            raise PoolError(f"pool process could not load handlers: {message[1]}")

    def _adopt(self, child: _Child) -> None:
        with self._lock:
            adopted = not self._closing.is_set()
            if adopted:
                self._children.add(child)
        if adopted:
            self._idle.put(child)
        else:
            _kill(child)

    def _acquire(self, job: _Job) -> _Child | None:
        """A live idle child for `job`; None if the pool closes or the job is stopped first."""
        while True:
            try:
                child = self._idle.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self._closing.is_set() or job.stop is not None:
                    return None
                continue
            if not child.process.is_alive():
                self._discard(child)  # died while idle (e.g. the OOM killer); nobody's job
                continue
            with self._lock:
                if not (self._closing.is_set() or job.stop is not None):
                    child.cancel.clear()  # under the lock, so a cancel for this job sticks
                    job.child = child
                    return child
            self._idle.put(child)
            return None

    def _exchange(
        self, task: Task, job: _Job, cancelled: threading.Event, report: ProgressFn
    ) -> Outcome:
        try:
            child = self._acquire(job)
            if child is None:
                return job.stop or Code.WORKER_SHUTDOWN.error("the worker is shutting down")
            if cancelled.is_set():
                child.cancel.set()
            outcome = self._talk(task, job, child, report)
        finally:
            with self._lock:
                if self._jobs.get(task.key) is job:
                    del self._jobs[task.key]
                killed = job.child is not None and job.child.killed
                job.child = None  # the child is not this job's any more: `_stop` leaves it be
        if outcome is not None and not killed:
            self._idle.put(child)
            return outcome
        child.process.join(1.0)
        code = child.process.exitcode
        self._discard(child)
        if job.stop is not None:
            log.info(
                "pool process %s killed (%s) for job %s attempt %d; replacing it",
                child.process.pid,
                job.stop.code,
                task.job_id,
                task.attempt,
            )
            return job.stop
        log.warning(
            "pool process %s died (exit code %s) running job %s attempt %d",
            child.process.pid,
            code,
            task.job_id,
            task.attempt,
        )
        return Code.WORKER_PROCESS_DIED.error(
            f"the worker's pool process exited with code {code} while running the job"
        )

    def _talk(self, task: Task, job: _Job, child: _Child, report: ProgressFn) -> Outcome | None:
        """Sends `task` to `child` and relays its progress; None if the child died."""
        try:
            child.conn.send(task)
            # Without a memory limit there is nothing to look up for: block on the pipe.
            interval = self._watch_interval if self._memory_limit else None
            while True:
                if not child.conn.poll(interval):
                    self._watch(task, job, child)
                    continue
                message = child.conn.recv()
                if message[0] != "progress":
                    return _decode(message)
                if message[1] == task.key:  # a stray thread of an earlier job may report late
                    report(message[2], message[3])
        except (EOFError, OSError):
            return None

    def _watch(self, task: Task, job: _Job, child: _Child) -> None:
        if not self._memory_limit:
            return
        try:
            rss = child.rss()
        except psutil.Error:
            return  # gone: the pipe says so next
        if rss <= self._memory_limit:
            return
        log.warning(
            "job %s attempt %d: pool process %s uses %s, over the %s limit; killing it",
            task.job_id,
            task.attempt,
            child.process.pid,
            _mib(rss),
            _mib(self._memory_limit),
        )
        error = Code.MEMORY_LIMIT_EXCEEDED.error(
            f"the job's process used {_mib(rss)} ({rss} bytes) of memory (RSS), over the "
            f"limit of {_mib(self._memory_limit)} ({self._memory_limit} bytes)"
        )
        self._stop(job, error)

    def _stop(self, job: _Job, error: job_pb2.JobError) -> None:
        """Ends `job` with `error` (unless it has a reason already) and kills its child."""
        with self._lock:
            if job.stop is None:
                job.stop = error
            child = job.child
            if child is not None:
                child.killed = True
        if child is not None:
            with contextlib.suppress(Exception):  # exited meanwhile
                child.process.kill()

    def _discard(self, child: _Child) -> None:
        with self._lock:
            self._children.discard(child)
            closing = self._closing.is_set()
        _kill(child)
        if not closing:
            with contextlib.suppress(RuntimeError):  # the thread pool shut down meanwhile
                self._threads.submit(self._replace)

    def _replace(self) -> None:
        delay = 1.0
        while not self._closing.is_set():
            child = self._launch()
            try:
                self._await_ready(child)
            except PoolError:
                _kill(child)
                log.exception("could not replace a dead pool process; retrying in %.0f s", delay)
                self._closing.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._adopt(child)
            return


def _kill(child: _Child) -> None:
    with contextlib.suppress(Exception):
        child.process.kill()
        child.process.join(1.0)
    child.conn.close()


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _encode(outcome: Outcome) -> tuple[Any, ...]:
    """An outcome as it crosses the pipe. Outputs go as plain bytes beside the message, so
    no protobuf size limit (2 GiB) applies to what the replica then moves to blobs."""
    if isinstance(outcome, job_pb2.JobError):
        return ("outcome", False, outcome.SerializeToString(), {})
    outputs = dict(outcome.outputs)
    outcome.ClearField("outputs")
    return ("outcome", True, outcome.SerializeToString(), outputs)


def _decode(message: tuple[Any, ...]) -> Outcome:
    _, ok, data, outputs = message
    if not ok:
        return job_pb2.JobError.FromString(data)
    result = job_pb2.JobResult.FromString(data)
    for name, value in outputs.items():
        result.outputs[name] = value
    return result


# Everything below runs in the child process.


def _child_main(
    conn: Connection,
    cancel: MpEvent,
    modules: Sequence[str],
    parent_pid: int,
    log_level: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
) -> None:
    # Ctrl-C reaches the whole process group; the parent decides how the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s pool[{os.getpid()}] %(message)s"
    )
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        # The parent names the modules of the products it serves; builtin is cheap to add.
        load_handlers(modules, products=("builtin",))
        if initializer is not None:
            initializer(*initargs)
        telemetry.setup("jobmesh-worker")
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    send_lock = threading.Lock()
    while True:
        try:
            task: Task | None = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        outcome = _run_in_child(task, conn, send_lock, cancel)
        telemetry.flush()  # this process may be killed at any time: its spans go now
        with send_lock:
            conn.send(_encode(outcome))


def _run_in_child(
    task: Task, conn: Connection, send_lock: threading.Lock, cancel: MpEvent
) -> Outcome:
    done = False

    def report(fraction: float, message: str) -> None:
        with send_lock:
            if not done:
                conn.send(("progress", task.key, fraction, message))

    spec = default_registry().get(task.kind)
    if spec is None or spec.executor != "process":
        return Code.UNKNOWN_KIND.error(f"no process-pool handler for {task.kind!r}")
    try:
        return outcomes.run_sync(spec.fn, task.context(report, cancel.is_set))
    finally:
        with send_lock:
            done = True


def _exit_with_parent(parent_pid: int) -> None:
    # A child busy in a handler does not read its pipe, so it would not see EOF.
    while os.getppid() == parent_pid:
        time.sleep(_POLL_SECONDS)
    os._exit(1)
