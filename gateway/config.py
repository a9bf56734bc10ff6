"""Gateway settings, each declared once (with `jobmesh.settings_fields`): default, help,
environment variable and flag; `Limits`' fields are gateway settings too.

`GatewaySettings.from_env()` is the one place the gateway reads its environment;
`add_arguments` and `from_args` derive every flag from the same declarations, so
`--max-queued` is `JOBMESH_MAX_QUEUED` is `max_queued`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from jobmesh import settings_fields as sf
from jobmesh.limits import Limits
from jobmesh.logs import check_format
from jobmesh.metrics import check_port
from jobmesh.settings import DEFAULT_MAX_MESSAGE_BYTES, is_loopback, parse_address
from jobmesh.settings_fields import setting

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = "jobmesh.db"


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = setting(DEFAULT_LISTEN, help="HOST:PORT to serve on; port 0 picks a free one")
    db: str = setting(
        DEFAULT_DB,
        help="SQLite file of jobs and events (':memory:' for tests), or a postgresql:// URL "
        "for a database that several gateways share",
    )
    wait_for_db: float = setting(
        0.0,
        help="seconds to wait for the gateway holding --db to exit, as a rolling restart "
        "needs (0: fail at once)",
    )
    ping_interval: float = setting(5.0, help="seconds between health pings to each worker")
    ping_misses: int = setting(
        3, help="unanswered pings before a worker is dead, whatever it sends"
    )
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        help="largest message; larger requests get RESOURCE_EXHAUSTED",
        size=True,
    )
    max_batch: int = setting(1000, help="most jobs in one SubmitBatch")
    max_queued: int = setting(
        1_000_000,
        help="most jobs waiting before Submit is refused (they wait in the database, not in "
        "memory)",
    )
    queue_window: int = setting(
        256,
        help="queued jobs of each queue (kind and tenant) held in memory, claimed from the "
        "database by priority then age and refilled as they are dispatched",
    )
    ack_timeout: float = setting(10.0, help="seconds a worker has to accept a job")
    reattach_grace: float = setting(10.0, help="seconds a lost worker's jobs wait for it to return")
    lease: float = setting(
        15.0,
        help="with gateways sharing a PostgreSQL database: seconds a silent gateway keeps its "
        "jobs before the others take them over",
    )
    default_max_attempts: int = setting(
        3, help="attempts a job gets when its retry policy is silent"
    )
    blob_dir: str = setting(
        "", help="directory of uploaded payloads (default: DB.blobs; needed with PostgreSQL)"
    )
    max_blob_bytes: int = setting(4 << 30, help="largest payload one upload may carry", size=True)
    upload_idle_timeout: float = setting(
        30.0, help="seconds an upload may send nothing before it is dropped"
    )
    max_transfers: int = setting(256, help="most blob uploads and downloads at once")
    max_inline_memory: int = setting(
        256 << 20,
        help="bytes of inline inputs held in memory; the rest are read from the database "
        "at dispatch",
        size=True,
    )
    max_worker_slots: int = setting(256, help="most slots one worker may declare in Attach")
    max_events_per_job: int = setting(
        10_000, help="most events kept per job; later progress updates the job but is not kept"
    )
    max_connections: int = setting(
        0, help="most open client connections (0: the descriptor limit less room for workers)"
    )
    max_concurrent_rpcs: int = setting(10_000, help="most calls served at once, streams included")
    max_streams_per_connection: int = setting(1000, help="most concurrent calls on one connection")
    max_watches_per_peer: int = setting(1000, help="most Watch and Run streams from one address")
    max_connection_idle: float = setting(
        300.0, help="seconds a connection with no call open is kept before it is closed"
    )
    max_connection_age: float = setting(
        0.0, help="seconds before any connection is asked to reconnect (0: never)"
    )
    handshake_timeout: float = setting(10.0, help="seconds a new connection has to say hello")
    retention: float = setting(
        604_800.0,
        help="seconds finished jobs, events and payloads are kept (a job may say its own)",
    )
    blob_grace: float = setting(
        3600.0, help="seconds a payload no job references is kept (the SDK uploads before Submit)"
    )
    sweep_interval: float = setting(
        60.0, help="seconds between sweeps of expired jobs and payloads"
    )
    port_file: str = setting("", help="write the bound port to this file once serving")
    metrics_port: int = setting(0, help="port of Prometheus /metrics (0: not served)")
    metrics_host: str = setting(
        "", help="address /metrics binds (default: the --listen host; 0.0.0.0 in a pod)"
    )
    tls_cert: str = setting(
        "",
        help="PEM certificate chain; with --tls-key the gateway serves TLS (both files are "
        "read again when they change, as cert-manager rotates them)",
    )
    tls_key: str = setting("", help="PEM private key of --tls-cert")
    tls_client_ca: str = setting(
        "",
        help="PEM CA of client and worker certificates: the gateway then also serves "
        "--mtls-listen, where a verified certificate authenticates the caller",
    )
    mtls_listen: str = setting(
        "", help="HOST:PORT that requires a client certificate (needs --tls-client-ca)"
    )
    insecure: bool = setting(
        False,
        help="serve without TLS on an address other than loopback (refused otherwise)",
        parse=sf.parse_bool,
        switch=True,
        metavar="",
    )
    auth_file: str = setting(
        "",
        help="TOML file of principals (token SHA-256, tenant, roles; read again when it "
        "changes); without it or --jwks-file every caller is an admin of tenant default",
    )
    jwks_file: str = setting(
        "",
        help="JWKS file of public keys (read again when it changes): a bearer JWT signed by "
        "one of them authenticates, e.g. a Kubernetes service-account token",
    )
    jwt_issuer: str = setting(
        "", help="the iss a JWT must have (needed with --jwks-file), e.g. the cluster's issuer"
    )
    jwt_audience: str = setting(
        "", help="an aud a JWT must have (needed with --jwks-file): the gateway's audience"
    )
    log_format: str = setting(
        "text", help="text, or json: one object per line with job and trace ids", parse=str.lower
    )
    limits: Limits = field(default_factory=Limits)
    """What one request or worker message may carry (flags from `jobmesh.limits.Limits`)."""

    def __post_init__(self) -> None:
        parse_address(self.listen)
        from gateway.store.open import check_db  # the store's own rule for what --db names

        check_db(self.db)
        if "://" in self.db and not self.blob_dir:
            raise ValueError(
                "blob_dir must be given with a PostgreSQL db: a directory for uploaded payloads"
            )
        positive = (
            "ping_interval",
            "lease",
            "ack_timeout",
            "upload_idle_timeout",
            "retention",
            "sweep_interval",
            "handshake_timeout",
            "max_connection_idle",
            "max_blob_bytes",
        )
        for name in positive:
            value = getattr(self, name)
            if not value > 0:  # NaN too
                raise ValueError(f"{name} must be positive")
        at_least_one = (
            "ping_misses",
            "max_batch",
            "max_queued",
            "queue_window",
            "default_max_attempts",
            "max_inline_memory",
            "max_transfers",
            "max_worker_slots",
            "max_events_per_job",
            "max_concurrent_rpcs",
            "max_streams_per_connection",
            "max_watches_per_peer",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        non_negative = (
            "wait_for_db",
            "reattach_grace",
            "blob_grace",
            "max_connection_age",
            "max_connections",
        )
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        # A stored job holds inputs, params, outputs and metadata: each may take a quarter of
        # a message, so Get, Watch and Assign always fit what the gateway may send.
        quarter = self.max_message_bytes // 4
        capped = {
            name: quarter
            for name in ("max_inline_bytes", "max_params_bytes")
            if getattr(self.limits, name) > quarter
        }
        if capped:
            object.__setattr__(self, "limits", replace(self.limits, **capped))
        check_port(self.metrics_port)
        check_format(self.log_format)
        self._check_transport()

    def _check_transport(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if bool(self.mtls_listen) != bool(self.tls_client_ca):
            raise ValueError("mtls_listen and tls_client_ca go together")
        if self.mtls_listen:
            parse_address(self.mtls_listen)
        if self.jwks_file and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError("jwks_file needs jwt_issuer and jwt_audience")
        if (self.jwt_issuer or self.jwt_audience) and not self.jwks_file:
            raise ValueError("jwt_issuer and jwt_audience are for jwks_file")
        if not self.tls_cert and not self.insecure and not is_loopback(self.listen):
            raise ValueError(
                f"refusing to serve {self.listen} without TLS: give --tls-cert and --tls-key, "
                "or --insecure to accept that anyone on the network can read and forge calls"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def metrics_bind(self) -> str:
        """The host /metrics binds: --metrics-host, else the --listen host."""
        return self.metrics_host or parse_address(self.listen)[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Defaults, overridden by `JOBMESH_<NAME>` variables."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        sf.lay_env(cls, values, env)
        sf.lay_env(Limits, limits, env)
        return cls(**values, limits=Limits(**limits))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, named after it (`max_queued` is `--max-queued`)."""
    sf.add_arguments(parser, GatewaySettings)
    sf.add_arguments(parser, Limits)


def from_args(args: argparse.Namespace) -> GatewaySettings:
    """The environment's settings, overridden by the flags given."""
    settings = GatewaySettings.from_env()
    limits = replace(settings.limits, **sf.flag_values(Limits, args, settings.limits))
    return replace(settings, **sf.flag_values(GatewaySettings, args, settings), limits=limits)


def markdown_table() -> str:
    """The README's table of gateway settings, made from their declarations."""
    rows = [
        "| gateway flag | env | default | |",
        "|---|---|---|---|",
        *sf.markdown_rows(GatewaySettings, file=False),
        *sf.markdown_rows(Limits, file=False),
        "| `--log-level` | | `INFO` | `DEBUG`, `INFO`, `WARNING`, `ERROR` |",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
