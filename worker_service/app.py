"""`python -m worker_service`: flags, settings, and the process's life from start to drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import psutil

from jobmesh import logs, telemetry
from jobmesh.channels import channel_credentials
from jobmesh.errors import InvalidArgument
from jobmesh.metrics import MetricsServer
from jobmesh.settings import is_loopback
from worker_service import config
from worker_service.config import WorkerSettings
from worker_service.executor import Executor
from worker_service.metrics import WorkerMetrics
from worker_service.pool import PoolError, ProcessPool
from worker_service.registry import HandlerSpec, load_handlers
from worker_service.replica import Replica
from worker_service.stats import ProcessStats

PARENT_POLL_SECONDS = 1.0

log = logging.getLogger("worker_service")

EXIT_OK = 0
EXIT_CONFIG = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's flags, from the settings' declarations (`worker_service.config`)."""
    config.add_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """The config file's and environment's settings with the flags that were given laid
    over them."""
    return config.from_args(args)


def run(settings: WorkerSettings) -> int:
    """Runs a worker replica until it has drained; returns the exit code."""
    _configure_logging(settings.log_level, settings.log_format)
    if settings.tls_config is not None:
        try:  # read again at each dial; checked here so that a typo stops the worker at once
            channel_credentials(settings.tls_config)
        except InvalidArgument as exc:
            log.error("cannot dial the gateway over TLS: %s", exc)
            return EXIT_CONFIG
    elif (settings.token or settings.token_file) and not is_loopback(settings.gateway):
        log.warning("sending a token to %s without TLS, readable on the way", settings.gateway)
    try:  # read again when it changes; checked here so that a typo stops the worker at once
        settings.token_source()
    except InvalidArgument as exc:
        log.error("cannot read the token: %s", exc)
        return EXIT_CONFIG
    try:
        specs = load_handlers(settings.handlers, settings.products)
    except Exception as exc:  # an import error in a user's module, a duplicate kind...
        log.error("cannot load handlers: %s: %s", type(exc).__name__, exc)
        return EXIT_CONFIG
    specs = with_kind_limits(specs, settings.kind_concurrency)
    initializer, initargs = _pool_initializer(settings)
    process_specs = [s for s in specs.values() if s.executor == "process"]
    if stray := sorted(s.kind for s in process_specs if s.module == "__main__"):
        log.error("handlers %s are defined in __main__; pool processes need a module", stray)
        return EXIT_CONFIG
    pool = ProcessPool(
        settings.slots,
        [*settings.handlers, *sorted({s.module for s in process_specs})],
        memory_limit=settings.max_job_memory_bytes,
        initializer=initializer,
        initargs=initargs,
    )
    try:
        pool.start()
    except PoolError as exc:
        log.error("cannot start the process pool: %s", exc)
        return EXIT_CONFIG
    executor = Executor(
        specs,
        pool,
        threads=settings.slots,
        cancel_grace=settings.cancel_grace,
    )
    telemetry.setup("jobmesh-worker")
    try:
        code = asyncio.run(_serve(settings, specs, pool, executor))
    finally:
        executor.close()
        pool.close()
        telemetry.shutdown()  # sends the spans still buffered
    if executor.busy_threads:
        # A thread handler is stuck; the interpreter would wait for it forever at exit.
        log.warning("%d thread handler(s) still running; exiting anyway", executor.busy_threads)
        logging.shutdown()
        os._exit(code)
    log.info("worker %s stopped", settings.worker_id)
    return code


def with_kind_limits(
    specs: Mapping[str, HandlerSpec], limits: tuple[tuple[str, int], ...]
) -> dict[str, HandlerSpec]:
    """The specs with the configured per-kind concurrency laid over the handlers' own."""
    by_kind = dict(limits)
    if unserved := sorted(set(by_kind) - set(specs)):
        log.warning("concurrency set for kinds this worker does not serve: %s", unserved)
    return {
        kind: replace(spec, concurrency=by_kind.get(kind, spec.concurrency))
        for kind, spec in specs.items()
    }


def _pool_initializer(
    settings: WorkerSettings,
) -> tuple[Callable[..., object] | None, tuple[Any, ...]]:
    """What each pool process runs before its first job: the image limits, when served."""
    if "images" not in settings.products:
        return None, ()
    from worker_service.handlers import images

    images.configure(settings.max_image_pixels)  # for thread handlers in this process
    return images.configure, (settings.max_image_pixels,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker_service", description="A jobmesh worker replica."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        # One line, not argparse's usage: the flags parsed; their values do not fit.
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return run(settings)


async def _serve(
    settings: WorkerSettings,
    specs: Mapping[str, HandlerSpec],
    pool: ProcessPool,
    executor: Executor,
) -> int:
    metrics = WorkerMetrics(slots=settings.slots)
    replica = Replica(settings, specs, executor, ProcessStats(pool.pids), metrics)
    metrics.watch(
        pool_processes=lambda: len(pool.pids()), connected=lambda: replica.session.connected
    )
    metrics_server = None
    if settings.metrics_port:
        metrics_server = MetricsServer(
            metrics.registry, settings.metrics_host, settings.metrics_port
        )
        metrics_server.start()
    log.info(
        "worker %s: %d slot(s), kinds %s; dialing %s %s",
        settings.worker_id,
        settings.slots,
        ", ".join(sorted(specs)),
        settings.gateway,
        "over TLS" if settings.tls_config else "in plaintext",
    )

    def on_signal(signum: int) -> None:
        if replica.draining:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            pool.kill_now()
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s: draining", signal.Signals(signum).name)
        replica.drain()

    async def watch_parent(pid: int) -> None:
        while psutil.pid_exists(pid):  # noqa: ASYNC110  # another process; nothing to await
            await asyncio.sleep(PARENT_POLL_SECONDS)
        log.warning("parent process %d is gone: draining", pid)
        replica.drain()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    orphan_watch = (
        asyncio.create_task(watch_parent(settings.parent_pid)) if settings.parent_pid else None
    )
    try:
        await replica.run()
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if metrics_server is not None:
            metrics_server.stop()
    return EXIT_OK


def _configure_logging(level: str, fmt: str) -> None:
    logging.getLogger("worker_service").setLevel(level)
    root = logging.getLogger()
    if not root.handlers:  # leave an embedding program's set-up alone
        root.addHandler(logs.handler(fmt, sys.stderr))
