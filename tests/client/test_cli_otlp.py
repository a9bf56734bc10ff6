"""A collector that is down neither fails a command nor holds it up."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.client.test_cli import JOBMESH
from tests.cluster import Cluster


def test_an_unreachable_collector_does_not_hold_a_command(cluster: Cluster) -> None:
    gw = cluster.gateway()
    with socket.socket() as unused:  # a port nothing listens on once this closes
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    env = {
        **os.environ,
        "JOBMESH_GATEWAY": gw.address,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    env.pop("OTEL_EXPORTER_OTLP_TIMEOUT", None)
    # Without a bound on the export the command waited ~7 s for the collector's retries;
    # the subprocess timeout is what a hung command would hit.
    done = subprocess.run(
        [str(JOBMESH), "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("{")
