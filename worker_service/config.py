"""Worker settings, each declared once: type, default, environment variable, TOML key, flag
and help. The environment (read only here), the config file, the flags and the README's
table are all derived from those declarations.

Precedence: defaults < config file (`--config` / JOBMESH_WORKER_CONFIG) < environment <
flags; per-kind limits merge kind by kind.
"""

from __future__ import annotations

import argparse
import os
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from jobmesh import settings_fields as sf
from jobmesh.channels import TLSConfig, TokenSource, check_token
from jobmesh.logs import check_format
from jobmesh.metrics import check_port
from jobmesh.settings import DEFAULT_GATEWAY, DEFAULT_MAX_MESSAGE_BYTES, parse_address
from jobmesh.settings_fields import parse_size as parse_size
from jobmesh.settings_fields import setting
from worker_service.registry import PRODUCTS

CONFIG_ENV = "JOBMESH_WORKER_CONFIG"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _cpu_count() -> int:
    return os.cpu_count() or 1


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


def parse_products(text: str) -> tuple[str, ...]:
    """`builtin,images` as a tuple; empty: none. Unknown names are left to validation."""
    return tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))


def parse_kind_limits(items: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """KIND=N strings (empty strings skipped) as pairs; raises ValueError otherwise."""
    limits: dict[str, int] = {}
    for item in items:
        if not item.strip():
            continue
        kind, sep, number = item.rpartition("=")
        if not sep or not kind.strip() or not number.strip().isdigit():
            raise ValueError(f"expected a kind's limit as KIND=N, got {item!r}")
        limits[kind.strip()] = int(number)
    return tuple(limits.items())


def merge_limits(
    base: Iterable[tuple[str, int]], over: Iterable[tuple[str, int]]
) -> tuple[tuple[str, int], ...]:
    """Per-kind limits: `over`'s win, kind by kind."""
    return tuple((dict(base) | dict(over)).items())


def _modules_text(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _labels_text(text: str) -> tuple[tuple[str, str], ...]:
    return parse_labels(text.split(","))


def _kinds_text(text: str) -> tuple[tuple[str, int], ...]:
    return parse_kind_limits(text.split(","))


def _modules(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise ValueError(f"expected a list of module names, got {value!r}")
    return tuple(m.strip() for m in value if m.strip())


def _labels(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f'expected a table of strings such as {{ zone = "a" }}, got {value!r}')
    return parse_labels(f"{k}={v}" for k, v in value.items())


def _products(table: Mapping[str, Any]) -> tuple[str, ...]:
    """[products]: each built-in product on (true, the default) or off."""
    sf.known_keys("[products]", table, tuple(PRODUCTS))
    for name, on in table.items():
        if not isinstance(on, bool):
            raise ValueError(f"[products] {name}: expected true or false, got {on!r}")
    return tuple(p for p in PRODUCTS if table.get(p, True))


def _kinds(table: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """[kinds."KIND"] concurrency = N, for each kind."""
    limits: dict[str, int] = {}
    for kind, entry in table.items():
        where = f"[kinds.{kind!r}]" if "." in kind else f"[kinds.{kind}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a table such as {where} concurrency = 2")
        sf.known_keys(where, entry, ("concurrency",))
        if "concurrency" in entry:
            try:
                limits[kind] = sf.toml_int(entry["concurrency"])
            except ValueError as exc:
                raise ValueError(f"{where} concurrency: {exc}") from None
    return tuple(limits.items())


@dataclass(frozen=True)
class WorkerSettings:
    gateway: str = setting(
        DEFAULT_GATEWAY,
        help="the gateway's HOST:PORT, which the worker dials",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="HOST:PORT",
    )
    token: str = setting(
        "",
        help="bearer token sent to the gateway; give it in the environment (from a Kubernetes "
        "Secret): a flag is visible to anyone who can list processes",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="TOKEN",
        secret=True,
    )
    token_file: str = setting(
        "",
        help="file holding the bearer token, read again when it changes (a Kubernetes "
        "projected service-account token); not with `token`",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="PATH",
    )
    tls: bool = setting(
        False,
        help="dial the gateway over TLS, verified against the system's roots (any `tls_*` "
        "setting below turns TLS on too)",
        parse=sf.parse_bool,
        read=sf.toml_bool,
        table="worker",
        switch=True,
        metavar="",
    )
    tls_ca: str = setting(
        "",
        help="PEM file of the CAs the gateway's certificate must chain to (TLS on)",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="PEM",
    )
    tls_cert: str = setting(
        "",
        help="PEM certificate of this worker, for the gateway's mTLS port (TLS on)",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="PEM",
    )
    tls_key: str = setting(
        "",
        help="PEM private key of `tls_cert`",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="PEM",
    )
    tls_server_name: str = setting(
        "",
        help="the name the gateway's certificate must carry, if not the host of `gateway` (TLS on)",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="NAME",
    )
    slots: int = setting(
        factory=_cpu_count,
        help="jobs at once, all kinds together, and pool processes",
        parse=int,
        read=sf.toml_int,
        table="worker",
        metavar="N",
        shown="CPU count",
    )
    handlers: tuple[str, ...] = setting(
        (),
        help="modules with `@handler` functions, comma-separated (repeatable)",
        parse=_modules_text,
        read=_modules,
        table="worker",
        metavar="MOD[,MOD]",
        repeat=True,
    )
    worker_id: str = setting(
        factory=_default_worker_id,
        help="stable name across reconnects",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="ID",
        shown="`HOST-PID`",
    )
    labels: tuple[tuple[str, str], ...] = setting(
        (),
        help="labels sent to the gateway, KEY=VALUE, comma-separated (repeatable)",
        parse=_labels_text,
        read=_labels,
        table="worker",
        flag="--label",
        metavar="KEY=VALUE",
        repeat=True,
        combine=sf.by_key,
    )
    reconnect_initial: float = 0.1
    """First reconnect delay in seconds; doubles up to reconnect_max, with jitter."""
    reconnect_max: float = 5.0
    """Longest reconnect delay in seconds."""
    drain_grace: float = setting(
        30.0,
        help="time in-flight jobs get after SIGTERM",
        parse=float,
        read=sf.toml_number,
        table="worker",
        metavar="S",
    )
    parent_pid: int = setting(
        0,
        help="drain and leave once that process is gone (`jobmesh serve` passes its own, "
        "so its replicas never outlive it)",
        parse=int,
        read=None,
        env=False,
        metavar="PID",
        shown="",
    )
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        help="largest message sent to or received from the gateway, e.g. `64M`",
        parse=parse_size,
        read=sf.toml_size,
        table="worker",
        metavar="SIZE",
        shown="64 MiB",
    )
    cancel_grace: float = setting(
        5.0,
        help="time a handler gets to stop after a cancel or its timeout before it is killed",
        parse=float,
        read=sf.toml_number,
        table="worker",
        metavar="S",
    )
    max_job_memory_bytes: int = setting(
        0,
        help="largest RSS of a pool process running a job, e.g. `512M`, `2G` or bytes; over it "
        "the job is killed (`MEMORY_LIMIT_EXCEEDED`, not retried)",
        name="max_job_memory",
        parse=parse_size,
        read=sf.toml_size,
        table="worker",
        metavar="SIZE",
        shown="`0` (no limit)",
    )
    close_timeout: float = 5.0
    """Seconds after the drain to deliver the last results and close the stream."""
    log_level: str = setting(
        "INFO",
        help="level of the worker's log: DEBUG, INFO, WARNING or ERROR",
        parse=str.upper,
        read=lambda v: sf.toml_str(v).upper(),
        table="worker",
        metavar="LEVEL",
    )
    log_format: str = setting(
        "text",
        help="`text`, or `json`: one object per line, with `job_id` and `trace_id`",
        parse=str.lower,
        read=lambda v: sf.toml_str(v).lower(),
        table="worker",
        metavar="FORMAT",
    )
    metrics_port: int = setting(
        0,
        help="port of the Prometheus `/metrics` endpoint",
        parse=int,
        read=sf.toml_int,
        table="worker",
        metavar="PORT",
        shown="`0` (off)",
    )
    metrics_host: str = setting(
        "0.0.0.0",
        help="address `/metrics` binds (all, so a pod can be scraped)",
        parse=str,
        read=sf.toml_str,
        table="worker",
        metavar="HOST",
    )
    products: tuple[str, ...] = setting(
        tuple(PRODUCTS),
        help="built-in products to serve, comma-separated: `builtin` (echo, sleep, fail), "
        "`images` (image.*); empty: none",
        parse=parse_products,
        read=_products,
        table="products",
        whole=True,
        file_key="`[products]` NAME = true/false",
        metavar="LIST",
    )
    kind_concurrency: tuple[tuple[str, int], ...] = setting(
        (),
        help="at most N jobs of KIND at once on a replica, comma-separated in the environment "
        "(repeatable; 0 lifts a handler's own limit)",
        parse=_kinds_text,
        read=_kinds,
        table="kinds",
        whole=True,
        file_key='`[kinds."KIND"]` concurrency',
        metavar="KIND=N",
        repeat=True,
        combine=sf.by_key,
        layered=True,
    )
    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS,
        help="largest image (width x height) the image kinds decode or produce",
        parse=int,
        read=sf.toml_int,
        table="images",
        metavar="N",
    )

    def __post_init__(self) -> None:
        parse_address(self.gateway)
        check_token(self.token)
        if self.token and self.token_file:
            raise ValueError("token and token_file are exclusive: give one of them")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
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
        check_format(self.log_format)
        check_port(self.metrics_port)
        for key, _ in self.labels:
            if not key:
                raise ValueError("label keys must not be empty")
        if unknown := [p for p in self.products if p not in PRODUCTS]:
            raise ValueError(
                f"unknown products {', '.join(map(repr, unknown))}; there are {', '.join(PRODUCTS)}"
            )
        for kind, limit in self.kind_concurrency:
            if not kind:
                raise ValueError("kind names must not be empty")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"the concurrency of kind {kind!r} must be an integer >= 0")
        if (
            isinstance(self.max_image_pixels, bool)
            or not isinstance(self.max_image_pixels, int)
            or self.max_image_pixels < 1
        ):
            raise ValueError("max_image_pixels must be a positive integer")

    @property
    def tls_config(self) -> TLSConfig | None:
        """How the worker dials: TLS if `tls` or any `tls_*` file or name is set, else None."""
        if not (self.tls or self.tls_ca or self.tls_cert or self.tls_server_name):
            return None
        return TLSConfig(
            ca=self.tls_ca or None,
            cert=self.tls_cert or None,
            key=self.tls_key or None,
            server_name=self.tls_server_name or None,
        )

    def token_source(self) -> TokenSource:
        """The token to send, `token_file` read now; InvalidArgument if it cannot be."""
        return TokenSource(self.token, self.token_file or None, setting="token_file")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, config_file: str | None = None
    ) -> WorkerSettings:
        """The config file's settings (`config_file`, else $JOBMESH_WORKER_CONFIG, if
        either names one) with the environment's laid over them."""
        env = os.environ if env is None else env
        path = env.get(CONFIG_ENV, "") if config_file is None else config_file
        values: dict[str, Any] = read_config_file(path) if path else {}
        sf.lay_env(cls, values, env)
        return cls(**values)


def add_arguments(
    parser: argparse.ArgumentParser,
    only: Iterable[str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """The worker's flags (`only` those fields, if given; `notes` appended to their help).
    Flags not given are absent from the namespace, so the file's, environment's or default
    values stay."""
    if only is None:
        parser.add_argument(
            "--config",
            metavar="PATH",
            default=argparse.SUPPRESS,
            help=f"worker TOML config file (env {CONFIG_ENV}); env and flags override it",
        )
    sf.add_arguments(parser, WorkerSettings, only, notes)


def from_args(args: argparse.Namespace) -> WorkerSettings:
    """The config file's and environment's settings with the flags that were given laid
    over them."""
    settings = WorkerSettings.from_env(config_file=getattr(args, "config", None))
    return replace(settings, **sf.flag_values(WorkerSettings, args, settings))


def read_config_file(path: str) -> dict[str, Any]:
    """The settings a worker TOML file sets, as WorkerSettings fields; ValueError naming the
    file and the key for anything wrong with it. Its tables and keys are the declared ones
    (`markdown_table()` lists them)."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ValueError(f"worker config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"worker config {path}: not valid TOML: {exc}") from None
    try:
        values = sf.file_values(WorkerSettings, data)
        WorkerSettings(**values)  # so a bad value is blamed on the file
    except ValueError as exc:
        raise ValueError(f"worker config {path}: {exc}") from None
    return values


def markdown_table() -> str:
    """The README's table of worker settings, made from their declarations."""
    rows = [
        "| worker flag | env | config file | default | |",
        "|---|---|---|---|---|",
        f"| `--config` | `{CONFIG_ENV}` | | | the worker configuration file (below) |",
        *sf.markdown_rows(WorkerSettings),
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
