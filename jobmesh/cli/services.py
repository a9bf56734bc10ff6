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
from typing import TYPE_CHECKING

from jobmesh import logs
from jobmesh.cli import args as cli_args
from jobmesh.errors import InvalidArgument
from jobmesh.settings import parse_address
from jobmesh.supervisor import ChildSpec, Supervisor

if TYPE_CHECKING:
    from gateway.config import GatewaySettings

log = logging.getLogger("jobmesh.serve")

# Seconds the gateway gives running calls (watches) once the workers are gone.
GATEWAY_GRACE = 5.0
# Seconds a worker may take to exit after its drain grace, before it is killed.
WORKER_EXIT_MARGIN = 5.0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The services' own parsers take the rest of the line; see `forward` in jobmesh.cli.
    for name, module, what in (
        ("gateway", "gateway.app", "run a gateway"),
        ("worker", "worker_service.app", "run a worker replica"),
    ):
        p = commands.add_parser(name, add_help=False, help=f"{what} (--help for its options)")
        p.set_defaults(func=_delegate, module=module, forward=True)

    p = commands.add_parser(
        "serve", help="run a gateway with embedded worker replicas, on one machine"
    )
    p.add_argument("--listen", type=cli_args.address, help="HOST:PORT (default: 127.0.0.1:50051)")
    p.add_argument("--db", help="SQLite file of jobs (default: jobmesh.db)")
    p.add_argument(
        "--workers", type=cli_args.count, default=2, help="worker replicas to run (default: 2)"
    )
    p.add_argument(
        "--slots",
        type=cli_args.positive,
        help="jobs each replica runs at once (default: the CPUs shared among the replicas)",
    )
    p.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MOD[,MOD]",
        help="modules with @handler functions for the replicas to load (repeatable)",
    )
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send traces over OTLP/gRPC here, e.g. http://localhost:4317 (sets "
        "OTEL_EXPORTER_OTLP_ENDPOINT for the gateway and its replicas)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text, or json: one object per line (default: $JOBMESH_LOG_FORMAT, else text)",
    )
    p.add_argument(
        "--metrics-port",
        type=cli_args.count,
        metavar="PORT",
        help="serve the gateway's Prometheus /metrics on PORT and replica i's on PORT+1+i "
        "(default: $JOBMESH_METRICS_PORT, else 0: not served)",
    )
    p.set_defaults(func=serve)


def _delegate(args: argparse.Namespace) -> int:
    """Runs `python -m gateway` or `python -m worker_service` as `jobmesh gateway|worker`."""
    app = importlib.import_module(args.module)
    parser = argparse.ArgumentParser(prog=f"jobmesh {args.command}", description=app.__doc__)
    app.add_arguments(parser)
    own = parser.parse_args(args.rest)
    try:
        settings = app.settings_from_args(own)
    except ValueError as e:
        parser.error(str(e))
    configure_logging(getattr(own, "log_level", "INFO"), settings.log_format)
    return int(app.run(settings))


def serve(args: argparse.Namespace) -> int:
    from gateway.config import GatewaySettings
    from worker_service.config import WorkerSettings

    if args.otlp_endpoint:
        # Read by the gateway here and inherited by the replicas: one switch for all.
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = args.otlp_endpoint
        os.environ.setdefault("OTEL_EXPORTER_OTLP_INSECURE", "true")
    try:
        settings = GatewaySettings.from_env().with_overrides(
            listen=args.listen,
            db=args.db,
            port_file=args.port_file,
            log_format=args.log_format,
            metrics_port=args.metrics_port,
        )
        if settings.metrics_port and settings.metrics_port + args.workers > 65535:
            raise ValueError(f"--metrics-port leaves no ports for {args.workers} replica(s)")
        # The replicas read the same environment, so they drain for as long as this says.
        drain_grace = WorkerSettings.from_env().drain_grace
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    configure_logging(args.log_level, settings.log_format)
    slots = args.slots or max(1, (os.cpu_count() or 1) // max(args.workers, 1))
    worker_args = ["--slots", str(slots), "--log-level", args.log_level]
    worker_args += ["--log-format", settings.log_format]
    for module in args.handlers:
        worker_args += ["--handlers", module]
    return asyncio.run(
        _serve(settings, args.workers, worker_args, drain_grace + WORKER_EXIT_MARGIN)
    )


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
