"""Callbacks after a delay, all cancelled together when the gateway stops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Timers:
    def __init__(self) -> None:
        self._handles: set[asyncio.TimerHandle] = set()

    def after(self, delay: float, callback: Callable[[], None]) -> None:
        """Runs `callback` in `delay` seconds; it checks for itself whether it still applies."""

        def fire() -> None:
            self._handles.discard(handle)
            callback()

        handle = asyncio.get_running_loop().call_later(max(0.0, delay), fire)
        self._handles.add(handle)

    def cancel_all(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)
