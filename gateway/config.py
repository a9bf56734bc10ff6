"""Gateway settings: defaults, environment (read only here), and validation."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from jobmesh.logs import check_format
from jobmesh.metrics import check_port
from jobmesh.settings import DEFAULT_MAX_MESSAGE_BYTES, parse_address

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = "jobmesh.db"


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = DEFAULT_LISTEN
    """HOST:PORT to serve on; port 0 picks a free one."""
    db: str = DEFAULT_DB
    """SQLite file of jobs and events; ':memory:' is for tests only."""
    ping_interval: float = 5.0
    """Seconds between health pings to each worker replica."""
    ping_misses: int = 3
    """Pings a replica may leave unanswered before it is declared dead."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest request or worker message accepted; larger ones get RESOURCE_EXHAUSTED."""
    max_batch: int = 1000
    """Most jobs in one SubmitBatch."""
    max_queued: int = 100_000
    """Most jobs waiting at once; Submit beyond it gets RESOURCE_EXHAUSTED (backpressure)."""
    ack_timeout: float = 10.0
    """Seconds a worker has to accept an Assign before the job goes back to the queue."""
    reattach_grace: float = 10.0
    """Seconds the attempts of a worker whose stream broke wait for it to re-attach."""
    default_max_attempts: int = 3
    """Attempts a job gets when its retry policy does not say."""
    blob_dir: str = ""
    """Directory of uploaded payloads; default: `<db>.blobs` beside the database."""
    max_blob_bytes: int = 4 << 30
    """Largest payload one upload may carry."""
    port_file: str = ""
    """If set, the bound port is written here once the gateway serves (for tests and scripts)."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0: not served."""
    metrics_host: str = "0.0.0.0"
    """Address the /metrics endpoint binds (all interfaces, so a pod can be scraped)."""
    log_format: str = "text"
    """`text` lines, or `json`: one object per line, with job_id and trace_id when known."""

    def __post_init__(self) -> None:
        parse_address(self.listen)
        if not self.db:
            raise ValueError("db must name a file or ':memory:'")
        if self.ping_interval <= 0:
            raise ValueError("ping_interval must be positive")
        if self.ping_misses < 1:
            raise ValueError("ping_misses must be at least 1")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if self.ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        if self.reattach_grace < 0:
            raise ValueError("reattach_grace must not be negative")
        if self.max_blob_bytes < 1:
            raise ValueError("max_blob_bytes must be positive")
        if self.default_max_attempts < 1:
            raise ValueError("default_max_attempts must be at least 1")
        check_port(self.metrics_port)
        check_format(self.log_format)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var, conv in (
            ("listen", "JOBMESH_LISTEN", str),
            ("db", "JOBMESH_DB", str),
            ("ping_interval", "JOBMESH_PING_INTERVAL", float),
            ("ping_misses", "JOBMESH_PING_MISSES", int),
            ("max_message_bytes", "JOBMESH_MAX_MESSAGE_BYTES", int),
            ("max_queued", "JOBMESH_MAX_QUEUED", int),
            ("ack_timeout", "JOBMESH_ACK_TIMEOUT", float),
            ("reattach_grace", "JOBMESH_REATTACH_GRACE", float),
            ("blob_dir", "JOBMESH_BLOB_DIR", str),
            ("max_blob_bytes", "JOBMESH_MAX_BLOB_BYTES", int),
            ("metrics_port", "JOBMESH_METRICS_PORT", int),
            ("metrics_host", "JOBMESH_METRICS_HOST", str),
            ("log_format", "JOBMESH_LOG_FORMAT", str.lower),
        ):
            if var in env:
                values[name] = conv(env[var])
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> GatewaySettings:
        """A copy with the given fields replaced; None values are ignored (unset CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
