"""Worker settings: defaults, environment (read only here), and validation."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from jobmesh.settings import DEFAULT_GATEWAY, DEFAULT_MAX_MESSAGE_BYTES, parse_address


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings:
    gateway: str = DEFAULT_GATEWAY
    """The gateway's HOST:PORT to dial."""
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Jobs run at once, all kinds together; also the size of the process pool."""
    handlers: tuple[str, ...] = ()
    """Modules to import for their @handler functions, besides the built-in ones."""
    worker_id: str = field(default_factory=_default_worker_id)
    """Stable name of this replica across reconnects."""
    labels: tuple[tuple[str, str], ...] = ()
    """Labels sent in Attach."""
    reconnect_initial: float = 0.1
    """First reconnect delay in seconds; doubles up to reconnect_max, with jitter."""
    reconnect_max: float = 5.0
    """Longest reconnect delay in seconds."""
    drain_grace: float = 30.0
    """Seconds in-flight jobs get to finish after SIGTERM."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest message sent to or received from the gateway."""

    def __post_init__(self) -> None:
        parse_address(self.gateway)
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if not 0 < self.reconnect_initial <= self.reconnect_max:
            raise ValueError("need 0 < reconnect_initial <= reconnect_max")
        if self.drain_grace < 0:
            raise ValueError("drain_grace must not be negative")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if "JOBMESH_GATEWAY" in env:
            values["gateway"] = env["JOBMESH_GATEWAY"]
        if "JOBMESH_SLOTS" in env:
            values["slots"] = int(env["JOBMESH_SLOTS"])
        if "JOBMESH_HANDLERS" in env:
            values["handlers"] = tuple(m for m in env["JOBMESH_HANDLERS"].split(",") if m)
        if "JOBMESH_WORKER_ID" in env:
            values["worker_id"] = env["JOBMESH_WORKER_ID"]
        if "JOBMESH_DRAIN_GRACE" in env:
            values["drain_grace"] = float(env["JOBMESH_DRAIN_GRACE"])
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> WorkerSettings:
        """A copy with the given fields replaced; None values are ignored (unset CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
