"""Nothing grows forever: finished jobs, their events and their payloads expire."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from jobmesh import AsyncClient, NotFound
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster, until


async def gone(client: AsyncClient, job_id: str) -> str | None:
    """Get's NOT_FOUND message for the job, or None while it is still there."""
    try:
        await client.get(job_id)
    except NotFound as exc:
        return exc.message
    return None


def blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


async def test_finished_jobs_and_their_blobs_expire_and_get_says_so(cluster: Cluster) -> None:
    gw = cluster.gateway("--retention", "3600", "--sweep-interval", "0.2", "--blob-grace", "0.5")
    cluster.worker(gw, "w1")
    blobs = cluster.blob_dir
    async with AsyncClient(gw.address) as client:
        big = os.urandom(3 << 20)  # uploaded as a blob by the SDK
        short = await client.wait(
            (await client.submit("echo", inputs={"in": big}, retention=0.5)).job.id
        )
        kept = await client.wait((await client.submit("echo", params={"keep": True})).job.id)
        assert short.state == kept.state == job_pb2.JOB_STATE_SUCCEEDED
        assert blob_files(blobs)

        async with asyncio.timeout(30):
            while await gone(client, short.id) is None:  # noqa: ASYNC110  # the gateway sweeps
                await asyncio.sleep(0.1)
        assert "expired" in (await gone(client, short.id) or "")
        # Its input and output blob go once no job uses them and the grace is over.
        await until(lambda: not blob_files(blobs))
        assert [e async for e in client.watch(kept.id)][-1].state == job_pb2.JOB_STATE_SUCCEEDED
        jobs, _ = await client.list()
        assert [j.id for j in jobs] == [kept.id]
        with pytest.raises(NotFound, match="not found"):
            await client.get("0123456789abcdef0123456789abcdef")
