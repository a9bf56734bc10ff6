"""Getting progress reports from handlers to the gateway without letting a flood through.

A handler may call `ctx.progress` in a tight loop. Two stages keep that cheap: reports from
other threads reach the event loop newest-only (`loop_reporter`), and each attempt's
reports leave for the gateway at most once per `PROGRESS_GAP` (`ProgressThrottle`), the
newest one always last, so the final word of a burst is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from jobmesh.v1 import dispatcher_pb2
from worker_service.task import AttemptKey

ProgressFn = Callable[[float, str], None]

# At most this often per attempt, in seconds; far below what a person watching notices.
PROGRESS_GAP = 0.02


def loop_reporter(on_progress: ProgressFn) -> ProgressFn:
    """Calls `on_progress` on the current loop from any thread; a backlog keeps the newest."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    lock = threading.Lock()
    pending: list[tuple[float, str]] = []

    def deliver() -> None:
        with lock:
            report = pending.pop()
        on_progress(*report)

    def report(fraction: float, message: str) -> None:
        if threading.get_ident() == loop_thread:
            on_progress(fraction, message)
            return
        with lock:
            scheduled = bool(pending)
            pending[:] = [(fraction, message)]
        if not scheduled:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(deliver)

    return report


@dataclass
class _Attempt:
    last_sent: float
    pending: dispatcher_pb2.Progress | None = None
    timer: asyncio.TimerHandle | None = None


class ProgressThrottle:
    """Sends each attempt's progress at once, then at most every `gap` seconds."""

    def __init__(
        self, send: Callable[[dispatcher_pb2.Progress], None], gap: float = PROGRESS_GAP
    ) -> None:
        self._send = send
        self._gap = gap
        self._attempts: dict[AttemptKey, _Attempt] = {}

    def report(self, key: AttemptKey, fraction: float, message: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        item = dispatcher_pb2.Progress(
            job_id=key[0], attempt=key[1], fraction=fraction, message=message
        )
        state = self._attempts.get(key)
        if state is None or (state.timer is None and now - state.last_sent >= self._gap):
            self._attempts[key] = _Attempt(last_sent=now)
            self._send(item)
            return
        state.pending = item
        if state.timer is None:
            state.timer = loop.call_at(state.last_sent + self._gap, self._flush, key)

    def forget(self, key: AttemptKey) -> None:
        """Drops what is pending for an attempt that ended: its result supersedes it."""
        state = self._attempts.pop(key, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    def _flush(self, key: AttemptKey) -> None:
        state = self._attempts.get(key)
        if state is None:
            return
        state.timer = None
        if state.pending is None:
            return
        state.last_sent = asyncio.get_running_loop().time()
        item, state.pending = state.pending, None
        self._send(item)
