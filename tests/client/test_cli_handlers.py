"""`jobmesh worker --handlers myapp.jobs` finds ./myapp/jobs.py, as `python -m` would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.client.test_cli import JOBMESH, jobmesh
from tests.cluster import Cluster

JOBS = """
from worker_service import Result, handler

@handler("myapp.hello")
def hello(ctx):  # a plain function: it runs in the worker's spawned pool processes
    return Result(outputs={"hello.txt": b"hello from myapp"})
"""


def test_the_worker_finds_handler_modules_in_the_current_directory(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    app = tmp_path / "project"
    (app / "myapp").mkdir(parents=True)
    (app / "myapp" / "__init__.py").write_text("")
    (app / "myapp" / "jobs.py").write_text(JOBS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JOBMESH_GATEWAY")}
    argv = [str(JOBMESH), "worker", "--gateway", gw.address, "--handlers", "myapp.jobs"]
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [*argv, "--worker-id", "mine", "--slots", "1", "--products", "builtin"],
            cwd=app,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        gw.wait_for_workers({"mine"})
        out = tmp_path / "out"
        done = jobmesh(gw.address, "submit", "myapp.hello", "--wait", "--output", str(out))
        assert done.returncode == 0, done.stderr
        assert (out / "hello.txt").read_bytes() == b"hello from myapp"
    finally:
        worker.kill()
        worker.wait(10)
