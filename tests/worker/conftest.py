"""Fixtures for tests that run `python -m worker_service` against a scripted gateway."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.worker.fake_gateway import FakeGateway, StartWorker

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = "tests.worker.handlers_for_tests"


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gw = FakeGateway()
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
async def start_worker(tmp_path: Path, gateway: FakeGateway) -> AsyncIterator[StartWorker]:
    """Starts a worker replica (id w1, 2 slots, the test handlers); `env` adds variables."""
    procs: list[tuple[asyncio.subprocess.Process, Path]] = []

    async def start(
        *extra: str, slots: int = 2, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        log = tmp_path / f"worker{len(procs)}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("JOBMESH_")}
        environ["PYTHONPATH"] = str(ROOT)
        environ.update(env or {})
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "worker_service", "--gateway", gateway.address),
                *("--worker-id", "w1", "--slots", str(slots), "--handlers", HANDLERS),
                *("--label", "zone=a", "--log-level", "debug", *extra),
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=out,
            )
        procs.append((proc, log))
        return proc

    yield start
    for proc, log in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        print(f"===== {log.name}\n{log.read_text(errors='replace')[-6000:]}")
