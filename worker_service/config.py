"""Worker settings: defaults, environment (read only here), and validation."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from jobmesh.settings import DEFAULT_GATEWAY, DEFAULT_MAX_MESSAGE_BYTES, parse_address

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def parse_labels(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE strings as pairs (empty strings skipped); raises ValueError otherwise."""
    labels: dict[str, str] = {}
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected a label as KEY=VALUE, got {item!r}")
        labels[key.strip()] = value.strip()
    return tuple(labels.items())


def parse_size(text: str) -> int:
    """A byte count such as `1048576`, `512M`, `512MiB` or `2G` (binary units); ValueError else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])I?B?|B)?\s*", text.upper())
    if match is None:
        raise ValueError(f"expected a size such as 512M, 2G or a byte count, got {text!r}")
    return int(float(match[1]) * _SIZE_UNITS[match[2] or ""])


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
    cancel_grace: float = 5.0
    """Seconds a handler gets to stop by itself after a cancel or its timeout; then a pool
    handler's process is killed (and replaced) and an async handler is cancelled."""
    max_job_memory_bytes: int = 0
    """Largest RSS a pool process may reach running a job; over it the job is killed and
    fails with MEMORY_LIMIT_EXCEEDED. 0: no limit."""
    close_timeout: float = 5.0
    """Seconds after the drain to deliver the last results and close the stream."""
    log_level: str = "INFO"
    """Level of the `worker_service` log (DEBUG, INFO, WARNING, ERROR)."""

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
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if self.cancel_grace < 0:
            raise ValueError("cancel_grace must not be negative")
        if self.max_job_memory_bytes < 0:
            raise ValueError("max_job_memory_bytes must not be negative")
        if self.close_timeout < 0:
            raise ValueError("close_timeout must not be negative")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        for key, _ in self.labels:
            if not key:
                raise ValueError("label keys must not be empty")

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
        if "JOBMESH_CANCEL_GRACE" in env:
            values["cancel_grace"] = float(env["JOBMESH_CANCEL_GRACE"])
        if "JOBMESH_MAX_JOB_MEMORY" in env:
            values["max_job_memory_bytes"] = parse_size(env["JOBMESH_MAX_JOB_MEMORY"])
        if "JOBMESH_LABELS" in env:
            values["labels"] = parse_labels(env["JOBMESH_LABELS"].split(","))
        if "JOBMESH_MAX_MESSAGE_BYTES" in env:
            values["max_message_bytes"] = int(env["JOBMESH_MAX_MESSAGE_BYTES"])
        if "JOBMESH_LOG_LEVEL" in env:
            values["log_level"] = env["JOBMESH_LOG_LEVEL"].upper()
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> WorkerSettings:
        """A copy with the given fields replaced; None values are ignored (unset CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
