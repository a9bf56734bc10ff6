"""Callbacks after a delay, all cancelled together when the gateway stops.

A callback checks for itself whether it still applies (the scheduler's `_live` guard): a
timer is never cancelled one by one, only all at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Timers:
    def __init__(self) -> None:
        self._handles: set[asyncio.TimerHandle] = set()

    def after(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        """Runs `callback(*args)` in `delay` seconds."""

        def fire() -> None:
            self._handles.discard(handle)
            callback(*args)

        handle = asyncio.get_running_loop().call_later(max(0.0, delay), fire)
        self._handles.add(handle)

    def cancel_all(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)
