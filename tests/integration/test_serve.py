"""`jobmesh serve`: its replicas do not outlive it, even when it is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import psutil

from jobmesh import AsyncClient, JobState
from tests.cluster import ROOT, until


async def test_the_replicas_of_a_killed_serve_leave_too(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    log = (tmp_path / "serve.log").open("wb")
    serve = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jobmesh"),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        str(tmp_path / "jobs.db"),
        "--workers",
        "2",
        "--port-file",
        str(port_file),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=log,
    )
    try:
        await until(port_file.exists)
        async with AsyncClient(f"127.0.0.1:{port_file.read_text().strip()}") as client:
            await until_workers(client, 2)
            job = await client.wait((await client.submit("echo")).job.id)
        assert job.state is JobState.SUCCEEDED
        replicas = psutil.Process(serve.pid).children()
        assert len(replicas) == 2
        serve.send_signal(signal.SIGKILL)
        await serve.wait()
        await until(lambda: not any(r.is_running() and r.status() != "zombie" for r in replicas))
    finally:
        if serve.returncode is None:
            serve.kill()
        log.close()


async def until_workers(client: AsyncClient, n: int) -> None:
    for _ in range(600):
        if len(await client.list_workers()) >= n:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{n} workers did not attach")
