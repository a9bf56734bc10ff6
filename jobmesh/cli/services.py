"""The commands that run services: gateway, worker, and serve (both on one machine).

The services are imported only when one of these runs, so client commands start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from jobmesh import logs
from jobmesh.cli import args as cli_args
from jobmesh.errors import FailedPrecondition, InvalidArgument
from jobmesh.settings import parse_address
from jobmesh.supervisor import ChildSpec, Supervisor

if TYPE_CHECKING:
    from gateway.config import GatewaySettings

log = logging.getLogger("jobmesh.serve")

# Seconds the gateway gives running calls (watches) once the workers are gone.
GATEWAY_GRACE = 5.0
# Seconds a worker may take to exit after its drain grace, before it is killed.
WORKER_EXIT_MARGIN = 5.0

SERVE = "run a gateway with embedded worker replicas, on one machine"
# Top-level modules of the distributions that `jobmesh[server]` adds to the client.
SERVER_MODULES = frozenset(
    {"grpc_health", "grpc_reflection", "opentelemetry", "prometheus_client", "psutil"}
)


def import_service(module: str) -> ModuleType:
    """The service's module; FailedPrecondition naming the extra when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        raise FailedPrecondition(
            f"running a gateway or a worker needs the server extra ({e.name} is missing): "
            "pip install 'jobmesh[server]'"
        ) from None


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The services' own parsers take the rest of the line; see `forward` in jobmesh.cli.
    for name, module, what in (
        ("gateway", "gateway.app", "run a gateway"),
        ("worker", "worker_service.app", "run a worker replica"),
    ):
        p = commands.add_parser(name, add_help=False, help=f"{what} (--help for its options)")
        p.set_defaults(func=_delegate, module=module, forward=True)

    p = commands.add_parser("serve", add_help=False, help=f"{SERVE} (--help for its options)")
    p.set_defaults(func=serve, forward=True)


# The worker settings `serve` passes on to its replicas; the gateway's settings (all of
# them, --log-format and --metrics-port included) are the gateway's flags.
REPLICA_SETTINGS = (
    "slots",
    "handlers",
    "labels",
    "drain_grace",
    "cancel_grace",
    "max_job_memory_bytes",
    "products",
    "kind_concurrency",
    "max_image_pixels",
    "log_level",
    "tls_ca",
    "tls_server_name",
)


def serve_parser() -> argparse.ArgumentParser:
    """`jobmesh serve`'s flags: the gateway's and the replicas', from their declarations."""
    gateway_config = import_service("gateway.config")
    worker_config = import_service("worker_service.config")

    p = argparse.ArgumentParser(prog="jobmesh serve", description=f"{SERVE[0].upper()}{SERVE[1:]}.")
    p.add_argument(
        "--workers", type=cli_args.count, default=2, help="worker replicas to run (default: 2)"
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send traces over OTLP/gRPC here, e.g. http://localhost:4317 (sets "
        "OTEL_EXPORTER_OTLP_ENDPOINT for the gateway and its replicas)",
    )
    gateway_config.add_arguments(p)
    worker_config.add_arguments(
        p,
        only=REPLICA_SETTINGS,
        notes={
            "slots": " of each replica; here the CPUs are shared among the replicas",
            "log_level": "; the gateway's too",
            "tls_ca": "; for the replicas (with --tls-cert, by default the gateway's own "
            "certificate)",
            "tls_server_name": "; for the replicas, which dial the --listen host (127.0.0.1 "
            "for 0.0.0.0)",
        },
    )
    return p


def _delegate(args: argparse.Namespace) -> int:
    """Runs `python -m gateway` or `python -m worker_service` as `jobmesh gateway|worker`."""
    app = import_service(args.module)
    parser = argparse.ArgumentParser(prog=f"jobmesh {args.command}", description=app.__doc__)
    app.add_arguments(parser)
    own = parser.parse_args(args.rest)
    try:
        settings = app.settings_from_args(own)
    except ValueError as e:
        # One line, not argparse's usage: the flags parsed; their values do not fit.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    level = str(getattr(settings, "log_level", None) or getattr(own, "log_level", "INFO"))
    configure_logging(level, settings.log_format)
    return int(app.run(settings))


def serve(args: argparse.Namespace) -> int:
    parser = serve_parser()
    import_service("gateway.app")
    import_service("worker_service.app")
    from gateway import config as gateway_config
    from worker_service import config as worker_config

    own = parser.parse_args(args.rest)
    if own.otlp_endpoint:
        # Read by the gateway here and inherited by the replicas: one switch for all.
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = own.otlp_endpoint
        os.environ.setdefault("OTEL_EXPORTER_OTLP_INSECURE", "true")
    try:
        settings = gateway_config.from_args(own)
        if settings.metrics_port and settings.metrics_port + own.workers > 65535:
            raise ValueError(f"--metrics-port leaves no ports for {own.workers} replica(s)")
        # The replicas read the same environment, so they drain for as long as this says.
        replica = worker_config.from_args(own)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    configure_logging(replica.log_level, settings.log_format)
    if getattr(own, "slots", None) is None:
        own.slots = max(1, (os.cpu_count() or 1) // max(own.workers, 1))
    own.log_level = replica.log_level
    worker_args = [*_replica_flags(own), "--log-format", settings.log_format]
    if settings.tls and not replica.tls_ca:
        # grpc takes the gateway's own certificate as what to trust: nothing else to give.
        worker_args += ["--tls-ca", os.path.abspath(settings.tls_cert)]
    return asyncio.run(
        _serve(settings, own.workers, worker_args, replica.drain_grace + WORKER_EXIT_MARGIN)
    )


def _replica_flags(args: argparse.Namespace) -> list[str]:
    """The replica settings given to `serve`, as the replicas' flags."""
    from jobmesh import settings_fields
    from worker_service.config import WorkerSettings

    flags = []
    for f, how in settings_fields.settings_of(WorkerSettings):
        value = getattr(args, f.name, None)
        if f.name in REPLICA_SETTINGS and value is not None:
            value = how.combine(value) if how.repeat else value
            flags += [settings_fields.flag_name(f), _as_text(value)]
    return flags


def _as_text(value: object) -> str:
    """A parsed setting as the text its flag takes: lists comma-separated, pairs as K=V."""
    if isinstance(value, tuple):
        return ",".join("=".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in value)
    return str(value)


async def _serve(
    settings: GatewaySettings, workers: int, worker_args: list[str], grace: float
) -> int:
    from gateway.app import Gateway

    gateway = Gateway(settings)
    port = await gateway.start()
    address = f"{_dial_host(settings.listen)}:{port}"
    command = (
        *(sys.executable, "-m", "worker_service", "--gateway", address),
        *("--parent-pid", str(os.getpid()), *worker_args),
    )
    supervisor = Supervisor(
        [
            ChildSpec(
                f"embedded-{i}",
                (*command, "--worker-id", f"embedded-{i}", *_metrics_args(settings, i)),
            )
            for i in range(workers)
        ]
    )
    supervisor.start()
    log.info("serving on %s with %d worker replica(s)", address, workers)

    stop = asyncio.Event()

    def on_signal() -> None:
        if not stop.is_set():
            log.info("stopping: worker replicas drain, then the gateway stops")
            stop.set()
        else:
            log.warning("second signal: killing the worker replicas")
            supervisor.kill()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    closed = asyncio.create_task(gateway.wait_closed())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            log.error("the gateway stopped by itself; stopping the worker replicas")
        await supervisor.stop(grace)
    finally:
        await gateway.stop(GATEWAY_GRACE)
        closed.cancel()
        stopped.cancel()
    return 0 if stop.is_set() else 1


def configure_logging(level: str, fmt: str = "text") -> None:
    logs.configure(level, fmt)


def _metrics_args(settings: GatewaySettings, replica: int) -> tuple[str, ...]:
    """Replica `replica`'s metrics port: the gateway's + 1 + replica, or 0 (off) with it off."""
    port = settings.metrics_port + 1 + replica if settings.metrics_port else 0
    return ("--metrics-port", str(port))


def _dial_host(listen: str) -> str:
    """The host a local worker dials to reach a gateway listening on `listen`."""
    host, _ = parse_address(listen)
    if host in ("0.0.0.0", "::", "*"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
