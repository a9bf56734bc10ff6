"""Process stats for pongs: CPU %, RSS (pool children included) and event-loop lag."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import psutil

# How often the lag probe asks the loop for a timer.
LAG_PROBE_SECONDS = 0.25


class ProcessStats:
    """CPU and memory of this process and the children `child_pids` names."""

    def __init__(self, child_pids: Callable[[], list[int]] = list) -> None:
        self._child_pids = child_pids
        self._procs: dict[int, psutil.Process] = {}
        self._lag = 0.0

    def sample(self) -> tuple[float, int]:
        """CPU percent since the previous sample (100 = one core) and RSS in bytes."""
        # Keep Process objects across samples: cpu_percent measures since the last call.
        procs: dict[int, psutil.Process] = {}
        cpu, rss = 0.0, 0
        for pid in [os.getpid(), *self._child_pids()]:
            with contextlib.suppress(psutil.Error):  # a child may be gone by now
                proc = self._procs.get(pid) or psutil.Process(pid)
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
                procs[pid] = proc
        self._procs = procs
        return cpu, rss

    def take_loop_lag(self) -> float:
        """The worst timer lateness seen since the previous call, in seconds."""
        lag, self._lag = self._lag, 0.0
        return lag

    async def probe_loop_lag(self) -> None:
        """Runs until cancelled, measuring how late the loop wakes from a sleep."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_PROBE_SECONDS)
            self._lag = max(self._lag, loop.time() - start - LAG_PROBE_SECONDS)
