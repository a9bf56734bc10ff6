"""`pip install jobmesh` is a light client: without the server extras the SDK and the
client commands work, and running a service says which extra it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.cluster import Cluster

ROOT = Path(__file__).parents[2]
# What `jobmesh[server]` and `jobmesh[images]` bring; a client must not need any of it.
SERVER_ONLY = (
    "PIL",
    "psutil",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "opentelemetry.instrumentation",
)

# Runs the CLI as if the distributions of the modules in BLOCKED were not installed.
WITHOUT = """
import importlib.abc, sys
BLOCKED = %r

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from jobmesh.cli import main
sys.exit(main(sys.argv[1:]))
"""


def light(
    *args: str, gateway: str = "127.0.0.1:1", missing: tuple[str, ...] = SERVER_ONLY
) -> subprocess.CompletedProcess[str]:
    """`jobmesh ARGS` as it runs where the `missing` modules are not installed."""
    env = {**os.environ, "JOBMESH_GATEWAY": gateway}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return subprocess.run(
        [sys.executable, "-c", WITHOUT % (missing,), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_client_commands_work_without_the_server_extras(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    done = light("submit", "echo", "-p", "text=light", "--wait", "--json", gateway=gw.address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["state"] == "SUCCEEDED"


def test_running_a_service_without_the_server_extra_says_which_to_install() -> None:
    for command in ("gateway", "worker", "serve"):
        done = light(command)
        assert done.returncode == 3, (command, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
        assert "pip install 'jobmesh[server]'" in done.stderr


def test_the_plain_install_leaves_the_server_dependencies_to_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = " ".join(project["dependencies"]).lower()
    for name in ("pillow", "psutil", "prometheus", "grpcio-health", "grpcio-reflection"):
        assert name not in plain
    extras = project["optional-dependencies"]
    assert any("pillow" in d.lower() for d in extras["images"])
    assert any("psutil" in d for d in extras["server"])


def test_a_worker_without_pillow_says_which_extra_the_image_kinds_need() -> None:
    done = light("worker", "--products", "images", missing=("PIL",))
    assert done.returncode == 2, done.stderr
    assert "pip install 'jobmesh[images]'" in done.stderr
