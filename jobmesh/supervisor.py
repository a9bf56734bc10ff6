"""Keeps child processes running: one that exits unexpectedly is started again.

`jobmesh serve` runs its embedded worker replicas this way. Children get their own session,
so a Ctrl-C in the terminal reaches only the supervisor, which then stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    """How logs call the child, e.g. 'embedded-0'."""
    argv: tuple[str, ...]
    """The command that starts it."""


@dataclass(frozen=True)
class RestartPolicy:
    initial: float = 0.5
    """Seconds before the first restart; doubles for each quick crash after it."""
    maximum: float = 10.0
    """Longest wait before a restart."""
    stable_after: float = 30.0
    """A child that ran this long is healthy again: its next restart waits `initial`."""

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("need 0 < initial <= maximum")
        if self.stable_after <= 0:
            raise ValueError("stable_after must be positive")


class Supervisor:
    """Starts the children, restarts any that exits, and stops them all on request."""

    def __init__(self, children: Sequence[ChildSpec], policy: RestartPolicy | None = None):
        self._children = tuple(children)
        self._policy = policy or RestartPolicy()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        # What a child started while stopping gets at once: SIGTERM, or SIGKILL after kill().
        self._stop_signal = signal.SIGTERM
        self.restarts = 0
        """Children started again after they exited; for logs and tests."""

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(child)) for child in self._children]

    def pids(self) -> dict[str, int]:
        """The live children by name."""
        return {name: p.pid for name, p in self._procs.items() if p.returncode is None}

    async def stop(self, grace: float) -> None:
        """SIGTERM every child, wait up to `grace` seconds, then SIGKILL what is left."""
        self._stopping.set()
        self._signal_all(signal.SIGTERM)
        if not self._tasks:
            return
        # Each child's task ends when the child does.
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        if pending:
            log.warning("%d child(ren) still running after %.0fs; killing", len(pending), grace)
            self.kill()
            await asyncio.wait(pending)

    def kill(self) -> None:
        """SIGKILL every child at once (a second Ctrl-C)."""
        self._stopping.set()
        self._stop_signal = signal.SIGKILL
        self._signal_all(signal.SIGKILL)

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in self._procs.values():
            _signal(proc, sig)

    async def _keep(self, child: ChildSpec) -> None:
        loop = asyncio.get_running_loop()
        delay = self._policy.initial
        while not self._stopping.is_set():
            started = loop.time()
            try:
                proc = await asyncio.create_subprocess_exec(*child.argv, start_new_session=True)
            except OSError as e:
                log.error("cannot start %s: %s", child.name, e)
                code: int | None = None
            else:
                self._procs[child.name] = proc
                if self._stopping.is_set():  # stop() came while it was starting
                    _signal(proc, self._stop_signal)
                log.info("started %s (pid %d)", child.name, proc.pid)
                code = await proc.wait()
            if self._stopping.is_set():
                return
            if loop.time() - started >= self._policy.stable_after:
                delay = self._policy.initial
            log.warning("%s exited with code %s; restarting in %.1fs", child.name, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self._policy.maximum)
            if not self._stopping.is_set():
                self.restarts += 1


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
