"""Prometheus exposition shared by the gateway and the worker: the /metrics HTTP server.

Each service keeps its metrics in a `CollectorRegistry` of its own (gateway/metrics.py,
worker_service/metrics.py) and serves it with `MetricsServer` on `--metrics-port`.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
"""Seconds: from a few milliseconds (echo) to an hour (a long build)."""


class MetricsServer:
    """Serves a registry at http://HOST:PORT/metrics from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port, once started."""
        return self._server.server_port if self._server is not None else 0

    def start(self) -> None:
        """Binds and serves; raises OSError when the port is taken."""
        self._server, self._thread = start_http_server(
            self._port, addr=self._host, registry=self._registry
        )
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None


def check_port(port: int) -> None:
    """ValueError unless `port` is 0 (no metrics) or a TCP port."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"metrics_port must be from 0 (off) to 65535, got {port!r}")
