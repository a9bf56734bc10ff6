"""Worker settings: defaults, the TOML config file, environment (read only here), validation.

Precedence: defaults < config file (`--config` / JOBMESH_WORKER_CONFIG) < environment <
flags (see `app.settings_from_args`).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from jobmesh.logs import check_format
from jobmesh.metrics import check_port
from jobmesh.settings import DEFAULT_GATEWAY, DEFAULT_MAX_MESSAGE_BYTES, parse_address
from worker_service.registry import PRODUCTS

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

CONFIG_ENV = "JOBMESH_WORKER_CONFIG"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

T = TypeVar("T")


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
    parent_pid: int = 0
    """If set, the replica drains and leaves once that process is gone (`jobmesh serve`
    sets it, so its replicas do not outlive it even when it is killed)."""
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
    log_format: str = "text"
    """`text` lines, or `json`: one object per line, with job_id and trace_id when known."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0: not served."""
    metrics_host: str = "0.0.0.0"
    """Address the /metrics endpoint binds (all interfaces, so a pod can be scraped)."""
    products: tuple[str, ...] = tuple(PRODUCTS)
    """Built-in products served: `builtin` (echo, sleep, fail) and `images` (image.*)."""
    kind_concurrency: tuple[tuple[str, int], ...] = ()
    """Per-kind limits (kind, jobs at once) over the handlers' own; 0 lifts one."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width x height) the image kinds decode or produce."""

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

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, config_file: str | None = None
    ) -> WorkerSettings:
        """The config file's settings (`config_file`, else $JOBMESH_WORKER_CONFIG, if
        either names one) with the environment's laid over them."""
        env = os.environ if env is None else env
        path = env.get(CONFIG_ENV, "") if config_file is None else config_file
        values: dict[str, Any] = {}
        if path:
            values = read_config_file(path)
        for name, key, convert in _ENV:
            if name in env:
                values[key] = _converted(name, env[name], convert)
        if "JOBMESH_KIND_CONCURRENCY" in env:
            limits = _converted(
                "JOBMESH_KIND_CONCURRENCY",
                env["JOBMESH_KIND_CONCURRENCY"],
                lambda text: parse_kind_limits(text.split(",")),
            )
            values["kind_concurrency"] = merge_limits(values.get("kind_concurrency", ()), limits)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> WorkerSettings:
        """A copy with the given fields replaced; None values are ignored (unset CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def merge_limits(
    base: Iterable[tuple[str, int]], over: Iterable[tuple[str, int]]
) -> tuple[tuple[str, int], ...]:
    """Per-kind limits: `over`'s win, kind by kind."""
    return tuple((dict(base) | dict(over)).items())


def read_config_file(path: str) -> dict[str, Any]:
    """The settings a worker TOML file sets, as WorkerSettings fields; ValueError naming the
    file and the key for anything wrong with it.

    [worker] takes the settings the flags set (gateway, slots, handlers, worker_id, labels,
    drain_grace, cancel_grace, max_job_memory, max_message_bytes, log_level, log_format,
    metrics_port, metrics_host); [products]
    turns built-in products on and off; [kinds."KIND"] concurrency caps a kind;
    [images] max_image_pixels bounds the image kinds.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ValueError(f"worker config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"worker config {path}: not valid TOML: {exc}") from None
    try:
        values = _file_values(data)
        WorkerSettings(**values)  # so a bad value is blamed on the file
    except ValueError as exc:
        raise ValueError(f"worker config {path}: {exc}") from None
    return values


def _file_values(data: Mapping[str, Any]) -> dict[str, Any]:
    _known_keys("the file", data, ("worker", "products", "kinds", "images"))
    values: dict[str, Any] = {}
    worker = _table(data, "worker")
    _known_keys("[worker]", worker, tuple(_WORKER_KEYS))
    for key, (target, read) in _WORKER_KEYS.items():
        if key in worker:
            try:
                values[target] = read(worker[key])
            except ValueError as exc:
                raise ValueError(f"[worker] {key}: {exc}") from None
    products = _table(data, "products")
    _known_keys("[products]", products, tuple(PRODUCTS))
    for name, on in products.items():
        if not isinstance(on, bool):
            raise ValueError(f"[products] {name}: expected true or false, got {on!r}")
    values["products"] = tuple(p for p in PRODUCTS if products.get(p, True))
    limits: dict[str, int] = {}
    for kind, table in _table(data, "kinds").items():
        where = f"[kinds.{kind!r}]" if "." in kind else f"[kinds.{kind}]"
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}: expected a table such as {where} concurrency = 2")
        _known_keys(where, table, ("concurrency",))
        if "concurrency" in table:
            try:
                limits[kind] = _int(table["concurrency"])
            except ValueError as exc:
                raise ValueError(f"{where} concurrency: {exc}") from None
    if limits:
        values["kind_concurrency"] = tuple(limits.items())
    images = _table(data, "images")
    _known_keys("[images]", images, ("max_image_pixels",))
    if "max_image_pixels" in images:
        try:
            values["max_image_pixels"] = _int(images["max_image_pixels"])
        except ValueError as exc:
            raise ValueError(f"[images] max_image_pixels: {exc}") from None
    return values


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, Mapping):
        raise ValueError(f"{name} must be a table ([{name}])")
    return table


def _known_keys(where: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
    if unknown := sorted(set(table) - set(known)):
        raise ValueError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; expected {', '.join(known)}"
        )


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _bytes(value: object) -> int:
    return parse_size(value) if isinstance(value, str) else _int(value)


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


_WORKER_KEYS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "gateway": ("gateway", _str),
    "slots": ("slots", _int),
    "handlers": ("handlers", _modules),
    "worker_id": ("worker_id", _str),
    "labels": ("labels", _labels),
    "drain_grace": ("drain_grace", _number),
    "cancel_grace": ("cancel_grace", _number),
    "max_job_memory": ("max_job_memory_bytes", _bytes),
    "max_message_bytes": ("max_message_bytes", _bytes),
    "log_level": ("log_level", lambda v: _str(v).upper()),
    "log_format": ("log_format", lambda v: _str(v).lower()),
    "metrics_port": ("metrics_port", _int),
    "metrics_host": ("metrics_host", _str),
}
"""[worker] keys: the WorkerSettings field each sets, and how its value is read."""

_ENV: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("JOBMESH_GATEWAY", "gateway", str),
    ("JOBMESH_SLOTS", "slots", int),
    ("JOBMESH_HANDLERS", "handlers", lambda v: tuple(m for m in v.split(",") if m)),
    ("JOBMESH_WORKER_ID", "worker_id", str),
    ("JOBMESH_DRAIN_GRACE", "drain_grace", float),
    ("JOBMESH_CANCEL_GRACE", "cancel_grace", float),
    ("JOBMESH_MAX_JOB_MEMORY", "max_job_memory_bytes", parse_size),
    ("JOBMESH_LABELS", "labels", lambda v: parse_labels(v.split(","))),
    ("JOBMESH_MAX_MESSAGE_BYTES", "max_message_bytes", int),
    ("JOBMESH_LOG_LEVEL", "log_level", str.upper),
    ("JOBMESH_LOG_FORMAT", "log_format", str.lower),
    ("JOBMESH_METRICS_PORT", "metrics_port", int),
    ("JOBMESH_METRICS_HOST", "metrics_host", str),
    ("JOBMESH_PRODUCTS", "products", parse_products),
    ("JOBMESH_MAX_IMAGE_PIXELS", "max_image_pixels", int),
)
"""Environment variables: the WorkerSettings field each sets, and how its text is read."""


def _converted(name: str, text: str, convert: Callable[[str], T]) -> T:
    try:
        return convert(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
