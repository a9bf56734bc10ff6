"""The gateway process: wires the store, scheduler and services into one gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from gateway.admin_service import AdminService
from gateway.blob_service import BlobService
from gateway.blobs import BlobStore
from gateway.config import GatewaySettings
from gateway.interceptors import ErrorInterceptor
from gateway.job_service import JobService
from gateway.metrics import GatewayMetrics
from gateway.scheduler import Scheduler
from gateway.sessions import Dispatcher
from gateway.store.sqlite import SqliteStore
from gateway.watchers import EventHub
from jobmesh import logs, telemetry
from jobmesh.metrics import MetricsServer
from jobmesh.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    blob_service_pb2,
    blob_service_pb2_grpc,
    dispatcher_pb2,
    dispatcher_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
)

log = logging.getLogger("gateway")

SERVICE_NAMES = (
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    dispatcher_pb2.DESCRIPTOR.services_by_name["Dispatcher"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    blob_service_pb2.DESCRIPTOR.services_by_name["BlobService"].full_name,
)


class Gateway:
    """One gateway: `start()` binds and serves, `stop()` drains and closes the store."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.port = 0
        self._hub = EventHub()
        self._store = SqliteStore(settings.db)
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if settings.blob_dir:
            blob_dir = Path(settings.blob_dir)
        elif settings.db == ":memory:":
            self._scratch = tempfile.TemporaryDirectory(prefix="jobmesh-blobs-")
            blob_dir = Path(self._scratch.name)
        else:
            blob_dir = Path(settings.db + ".blobs")
        self._blobs = BlobStore(blob_dir, settings.max_blob_bytes)
        self.metrics = GatewayMetrics()
        self._scheduler = Scheduler(settings, self._store, self._blobs, self.metrics)
        self._metrics_server: MetricsServer | None = None
        self._health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        telemetry.setup("jobmesh-gateway")
        await self._store.open(self._hub.publish)
        recovered = await self._scheduler.recover()
        limit = self.settings.max_message_bytes
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]  # type: ignore[type-arg]
        if telemetry.enabled():
            # The worker sessions live as long as the workers: no span for them.
            not_sessions = filters.negate(filters.service_name(SERVICE_NAMES[1]))
            tracing = aio_server_interceptor(filter_=not_sessions)  # type: ignore[no-untyped-call]
            interceptors.insert(0, tracing)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Workers keep their session alive through proxies with pings.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.so_reuseport", 0),
            ],
        )
        job_service_pb2_grpc.add_JobServiceServicer_to_server(
            JobService(
                self._scheduler,
                self._store,
                self._hub,
                self._blobs,
                max_batch=self.settings.max_batch,
            ),
            server,
        )
        dispatcher_pb2_grpc.add_DispatcherServicer_to_server(
            Dispatcher(self._scheduler, self.settings), server
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminService(self._scheduler, self.metrics), server
        )
        blob_service_pb2_grpc.add_BlobServiceServicer_to_server(BlobService(self._blobs), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(self.settings.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        await server.start()
        self._server = server
        self.metrics.watch_workers(lambda: self._scheduler.sessions, asyncio.get_running_loop())
        if self.settings.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port
            )
            self._metrics_server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.port_file:
            _write_atomically(Path(self.settings.port_file), f"{self.port}\n")
        host = self.settings.listen.rpartition(":")[0]
        log.info(
            "gateway listening on %s:%d (db %s, %d unfinished jobs recovered)",
            host,
            self.port,
            self.settings.db,
            recovered,
        )
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking calls, lets running ones end within `grace`, then flushes the store."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        # Running attempts stay as they are in the store; their workers re-attach to the
        # next gateway and carry on, instead of the jobs being run twice.
        self._scheduler.stop()
        await self._server.stop(grace)
        self._server = None
        if self._metrics_server is not None:
            self._metrics_server.stop()
        await self._store.close()
        if self._scratch is not None:
            self._scratch.cleanup()
        telemetry.flush()
        log.info("gateway stopped")

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help="HOST:PORT to serve on (env JOBMESH_LISTEN)")
    parser.add_argument("--db", help="SQLite file (env JOBMESH_DB; ':memory:' for tests)")
    parser.add_argument("--ping-interval", type=float, help="seconds between worker pings")
    parser.add_argument("--ping-misses", type=int, help="missed pings before a worker is dead")
    parser.add_argument("--max-message-bytes", type=int, help="largest message accepted")
    parser.add_argument("--max-queued", type=int, help="most jobs waiting before Submit is refused")
    parser.add_argument("--ack-timeout", type=float, help="seconds a worker has to accept a job")
    parser.add_argument(
        "--reattach-grace", type=float, help="seconds a lost worker's jobs wait for it to return"
    )
    parser.add_argument("--blob-dir", help="directory of uploaded payloads (default: DB.blobs)")
    parser.add_argument("--max-blob-bytes", type=int, help="largest payload one upload may carry")
    parser.add_argument("--port-file", help="write the bound port to this file once serving")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--log-format", help="text (default) or json: one object per line (env JOBMESH_LOG_FORMAT)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="port of Prometheus /metrics (env JOBMESH_METRICS_PORT; default 0: not served)",
    )
    parser.add_argument(
        "--metrics-host", help="address of /metrics (env JOBMESH_METRICS_HOST; default 0.0.0.0)"
    )


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings.from_env().with_overrides(
        listen=args.listen,
        db=args.db,
        ping_interval=args.ping_interval,
        ping_misses=args.ping_misses,
        max_message_bytes=args.max_message_bytes,
        max_queued=args.max_queued,
        ack_timeout=args.ack_timeout,
        reattach_grace=args.reattach_grace,
        blob_dir=args.blob_dir,
        max_blob_bytes=args.max_blob_bytes,
        port_file=args.port_file,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        log_format=args.log_format,
    )


async def serve(settings: GatewaySettings) -> None:
    """Runs a gateway until SIGINT or SIGTERM, then stops it gracefully."""
    gateway = Gateway(settings)
    await gateway.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        log.info("signal received; stopping")
    finally:
        await gateway.stop()


def run(settings: GatewaySettings) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logs.configure(args.log_level, settings.log_format)
    return run(settings)
