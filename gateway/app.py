"""The gateway process: wires the store, scheduler and services into one gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from gateway import config, jwts, tls
from gateway.admin_service import AdminService
from gateway.auth import Authenticator
from gateway.blob_service import BlobAccess, BlobService
from gateway.blobs import BlobStore
from gateway.config import GatewaySettings
from gateway.interceptors import ErrorInterceptor
from gateway.job_service import JobService
from gateway.mesh import Mesh, SharedStore
from gateway.metrics import GatewayMetrics
from gateway.retention import Retention
from gateway.scheduler import Scheduler
from gateway.sessions import Dispatcher
from gateway.store.lock import DatabaseLock
from gateway.store.open import open_store, shown
from gateway.watchers import EventHub
from jobmesh import logs, telemetry
from jobmesh.metrics import MetricsServer
from jobmesh.settings import parse_address
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

EXIT_ERROR = 3  # the CLI's "any other error"

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
        # Read first: a bad auth or JWKS file is the one line of a failed start (OSError).
        verifier = None
        if settings.jwks_file:
            verifier = jwts.Verifier(
                jwts.JwksFile(Path(settings.jwks_file)),
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
            )
        self._auth = Authenticator(
            settings.auth_file, certificates=bool(settings.tls_client_ca), jwts=verifier
        )
        self.port = 0
        self.mtls_port = 0
        """The port of --mtls-listen, where client certificates are required (0: none)."""
        self._hub = EventHub()
        self._db_lock = DatabaseLock(settings.db)
        self._store = open_store(settings.db, retention=settings.retention)
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if settings.blob_dir:
            blob_dir = Path(settings.blob_dir)
        elif settings.db == ":memory:":
            self._scratch = tempfile.TemporaryDirectory(prefix="jobmesh-blobs-")
            blob_dir = Path(self._scratch.name)
        else:
            blob_dir = Path(settings.db + ".blobs")
        self._blobs = BlobStore(
            blob_dir, settings.max_blob_bytes, upload_idle_timeout=settings.upload_idle_timeout
        )
        self.metrics = GatewayMetrics()
        self._scheduler = Scheduler(
            settings, self._store, self._blobs, self.metrics, quotas=self._auth.quota
        )
        self._mesh: Mesh | None = None
        if getattr(self._store, "shared", False):
            self._mesh = Mesh(
                cast(SharedStore, self._store),
                self._scheduler.name,
                self._scheduler,
                self._hub,
                lease=settings.lease,
                reattach_grace=settings.reattach_grace,
            )
            self._scheduler.join(self._mesh)
        self._metrics_server: MetricsServer | None = None
        self._health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._retention: asyncio.Task[None] | None = None
        self._queue_ages: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Binds, serves and returns the port; OSError, with nothing left open, if it cannot."""
        # Before the ports are checked: in a rolling restart the gateway holding the database
        # holds the port this one is to serve, until it exits.
        await self._db_lock.acquire(self.settings.wait_for_db)
        try:
            # Before anything else is opened, and so that grpc has no reason to log.
            check_listen(self.settings.listen)
            if self.settings.mtls_listen:
                check_listen(self.settings.mtls_listen)
            self._credentials = tls.port_credentials(self.settings)
            if self.settings.metrics_port:
                check_listen(f"{self.settings.metrics_bind}:{self.settings.metrics_port}")
            log.info("%s", self._auth.mode)  # the first line once it can serve: who may call
            telemetry.setup("jobmesh-gateway")
            await self._store.open(self._hub.publish)
        except BaseException:
            self._db_lock.release()
            raise
        try:
            return await self._start()
        except BaseException:
            if self._server is not None:  # what failed came after it (/metrics, the port file)
                await self.stop(0)
            else:
                await self._close()
            raise

    async def _start(self) -> int:
        if self._mesh is not None:
            await self._mesh.start()
        else:
            # It holds the database alone (its lock): what an earlier gateway held leased
            # goes back to the queue.
            await self._store.forget_leases()
        recovered = await self._scheduler.recover()
        retention = Retention(self._store, self._blobs, blob_grace=self.settings.blob_grace)
        self._retention = asyncio.create_task(retention.run(self.settings.sweep_interval))
        self._queue_ages = asyncio.create_task(self._scheduler.watch_queue_ages())
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(self._auth.authorize)]  # type: ignore[type-arg]
        if telemetry.enabled():
            # The worker sessions live as long as the workers: no span for them.
            not_sessions = filters.negate(filters.service_name(SERVICE_NAMES[1]))
            tracing = aio_server_interceptor(filter_=not_sessions)  # type: ignore[no-untyped-call]
            interceptors.insert(0, tracing)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=server_options(self.settings, raise_descriptor_limit()),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        job_service_pb2_grpc.add_JobServiceServicer_to_server(
            JobService(
                self._scheduler,
                self._store,
                self._hub,
                self._blobs,
                limits=self.settings.limits,
                max_batch=self.settings.max_batch,
                max_watches_per_peer=self.settings.max_watches_per_peer,
                # Room for the response's own framing within the message limit.
                max_page_bytes=self.settings.max_message_bytes // 2,
            ),
            server,
        )
        dispatcher_pb2_grpc.add_DispatcherServicer_to_server(
            Dispatcher(self._scheduler, self.settings), server
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminService(self._scheduler, self.metrics), server
        )
        blob_service_pb2_grpc.add_BlobServiceServicer_to_server(
            BlobService(
                self._blobs,
                self.settings.max_transfers,
                BlobAccess(
                    self._store, self._blobs, self._scheduler.holds_blob, quotas=self._auth.quota
                ),
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        main, mtls = self._credentials
        self.port = _add_port(server, self.settings.listen, main)
        if mtls is not None:
            self.mtls_port = _add_port(server, self.settings.mtls_listen, mtls)
        await server.start()
        self._server = server
        self.metrics.watch_workers(lambda: self._scheduler.sessions, asyncio.get_running_loop())
        if self.settings.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics.registry, self.settings.metrics_bind, self.settings.metrics_port
            )
            self._metrics_server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.port_file:
            _write_atomically(Path(self.settings.port_file), f"{self.port}\n")
        host = self.settings.listen.rpartition(":")[0]
        ports = f"{host}:{self.port} {'over TLS' if main else 'in plaintext'}"
        if self.mtls_port:
            mtls_host = self.settings.mtls_listen.rpartition(":")[0]
            ports += f", {mtls_host}:{self.mtls_port} over TLS with client certificates"
        log.info(
            "gateway listening on %s (db %s, %d unfinished jobs recovered)",
            ports,
            shown(self.settings.db),
            recovered,
        )
        return self.port

    @property
    def name(self) -> str:
        return self._scheduler.name

    def lost(self) -> asyncio.Future[bool]:
        """Done if this gateway lost its place among the gateways sharing its database (it
        was cut off from it longer than its lease, and the others took its work over)."""
        if self._mesh is None:
            return asyncio.get_running_loop().create_future()  # never
        return asyncio.ensure_future(self._mesh.lost.wait())

    @property
    def lost_reason(self) -> str:
        return "" if self._mesh is None else self._mesh.reason

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
        await self._close()
        log.info("gateway stopped")

    async def _close(self) -> None:
        """Closes what `start` opened besides the server."""
        if self._mesh is not None:
            with contextlib.suppress(Exception):  # what cannot be written is logged
                await self._store.barrier()  # written as a member, before it leaves
            await self._mesh.stop()
        for task in (self._retention, self._queue_ages):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._metrics_server is not None:
            self._metrics_server.stop()
        await self._store.close()
        self._db_lock.release()
        if self._scratch is not None:
            self._scratch.cleanup()
        telemetry.flush()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _add_port(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Serves `address` (TLS with `credentials`) and returns its port; OSError if it cannot."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # taken since check_listen
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def check_listen(listen: str) -> None:
    """OSError saying why, if nothing can listen on `listen` (HOST:PORT) now: grpc would only
    log the reason and raise a RuntimeError."""
    host, port = parse_address(listen)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
    errors: list[OSError] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
            try:
                probe.bind(address)
                return  # grpc serves if it can bind any of them
            except OSError as exc:
                errors.append(exc)
    reason = errors[0].strerror if errors and errors[0].strerror else "no address to bind"
    raise OSError(f"cannot listen on {listen}: {reason[0].lower()}{reason[1:]}")


# Descriptors kept free, beyond one per blob transfer, for what is not a connection: the
# database, log and metrics files, the process pool of an embedded worker.
RESERVED_DESCRIPTORS = 256


def raise_descriptor_limit() -> int:
    """Raises this process's open-file limit to its hard limit; returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit from %d to %d", soft, hard)
    return soft


def server_options(settings: GatewaySettings, descriptors: int) -> list[tuple[str, int]]:
    """gRPC server options: message size, connection quota, keepalive enforcement, idle and
    age limits, so that neither a flood of connections nor idle ones exhaust the gateway."""
    limit = settings.max_message_bytes
    reserved = RESERVED_DESCRIPTORS + settings.max_transfers
    connections = settings.max_connections or max(16, descriptors - reserved)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_allowed_incoming_connections", connections),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout * 1000)),
        # A connection with no call open goes after this; worker sessions are calls.
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle * 1000)),
        # Workers keep their session alive through proxies with pings; more often than this
        # is abuse, and the connection is closed after two such strikes.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 2),
        # The gateway pings quiet connections itself, so dead peers free their descriptors.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", 30_000))
    return options


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return config.from_args(args)


async def serve(settings: GatewaySettings) -> None:
    """Runs a gateway until SIGINT or SIGTERM, then stops it gracefully."""
    gateway = Gateway(settings)
    await gateway.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        lost = gateway.lost()
        signalled: asyncio.Future[bool] = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait([signalled, lost], return_when=asyncio.FIRST_COMPLETED)
        if lost in done:
            raise OSError(f"gateway {gateway.name} stopped: {gateway.lost_reason}")
        log.info("signal received; stopping")
    finally:
        await gateway.stop()


def run(settings: GatewaySettings) -> int:
    """Serves until a signal; a startup error is one line on stderr and exit code 3."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings))
    except OSError as exc:
        print(f"jobmesh: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        # One line, not argparse's usage: the flags parsed; their values do not fit.
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level, settings.log_format)
    return run(settings)
