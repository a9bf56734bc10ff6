"""AsyncClient and Client against real gateway and worker processes: resumed watches across a
killed gateway, results, typed errors, paging."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobmesh import (
    AsyncClient,
    Client,
    EventType,
    InvalidArgument,
    JobEvent,
    JobFailed,
    JobState,
    NotFound,
    ResourceExhausted,
    Unavailable,
    job_spec,
)
from tests.cluster import Cluster, Gateway, until

PROGRESS = EventType.PROGRESS


async def _collect(events: AsyncIterator[JobEvent], into: list[JobEvent]) -> None:
    async for event in events:
        into.append(event)


async def _replace(cluster: Cluster, gw: Gateway, events: list[JobEvent]) -> int:
    """Kills the gateway and starts another on the same file and port, with a worker; returns
    how many events had arrived when the gateway died."""
    gw.kill()
    seen = len(events)
    # Started in threads, so the client keeps trying to resume while the gateway is down.
    gw2 = await asyncio.to_thread(cluster.gateway, port=gw.port)
    await asyncio.to_thread(cluster.worker, gw2, "w2", slots=1)
    return seen


async def test_watch_resumes_across_a_killed_gateway_and_loses_no_event(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=1)
    async with AsyncClient(gw.address) as client:
        job_id = (await client.submit("sleep", params={"seconds": 2})).job.id
        events: list[JobEvent] = []
        watching = asyncio.create_task(_collect(client.watch(job_id), events))
        await until(lambda: any(e.type == PROGRESS for e in events))  # the job is running
        seen = await _replace(cluster, gw, events)
        async with asyncio.timeout(60):
            await watching
        replay = [e async for e in client.watch(job_id)]
    assert events[seen - 1].state is JobState.RUNNING  # the gateway died mid-job
    assert events[-1].state is JobState.SUCCEEDED
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events == replay


async def test_run_continues_with_watch_across_a_killed_gateway(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=1)
    async with AsyncClient(gw.address) as client:
        events: list[JobEvent] = []
        running = asyncio.create_task(_collect(client.run("sleep", params={"seconds": 2}), events))
        await until(lambda: any(e.type == PROGRESS for e in events))
        seen = await _replace(cluster, gw, events)
        async with asyncio.timeout(60):
            await running
        replay = [e async for e in client.watch(events[0].job_id)]
    assert events[seen - 1].state is JobState.RUNNING
    assert events[-1].state is JobState.SUCCEEDED
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events == replay


async def test_wait_returns_the_ended_job_and_check_raises_unless_it_succeeded(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        ok = await client.submit("echo", params={"n": 3}, inputs={"a": b"1"})
        job = await client.wait(ok.job.id, check=True)
        assert job.state is JobState.SUCCEEDED
        assert dict(job.result.outputs) == {"a": b"1"}

        failed = await client.submit("fail", params={"message": "boom"})
        assert (await client.wait(failed.job.id)).state is JobState.FAILED
        with pytest.raises(JobFailed, match=r"FAILED: \[FAILED_ON_PURPOSE\] boom"):
            await client.wait(failed.job.id, check=True)

        stranded = await client.submit("nobody-serves-this")
        assert stranded.warnings  # the caller hears that no worker serves the kind
        await client.cancel(stranded.job.id, "typo")
        with pytest.raises(JobFailed, match=r"CANCELLED: \[CANCELLED\] typo"):
            await client.wait(stranded.job.id, check=True)


async def test_failed_calls_raise_typed_errors(cluster: Cluster) -> None:
    gw = cluster.gateway("--max-message-bytes", "1024")
    async with AsyncClient(gw.address) as client:
        with pytest.raises(NotFound, match="job 'nope' not found"):
            await client.get("nope")
        with pytest.raises(NotFound):
            await client.cancel("nope")
        with pytest.raises(NotFound):
            [e async for e in client.watch("nope")]
        with pytest.raises(InvalidArgument, match=r"spec\.kind: must not be empty"):
            await client.submit("")
        with pytest.raises(InvalidArgument, match=r"page_token"):
            await client.list(page_token="garbage")
        with pytest.raises(ResourceExhausted):
            await client.submit("echo", inputs={"big": b"\0" * 4096})
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    async with AsyncClient(closed) as client:
        with pytest.raises(Unavailable):
            await client.get("nope")


async def test_list_all_walks_every_page(cluster: Cluster) -> None:
    gw = cluster.gateway()
    async with AsyncClient(gw.address) as client:
        ids = [(await client.submit("echo", params={"i": i})).job.id for i in range(7)]
        first, token = await client.list(page_size=3)
        everything = [j.id async for j in client.list_all(page_size=3)]
    newest_first = ids[::-1]
    assert [j.id for j in first] == newest_first[:3]
    assert token
    assert everything == newest_first


def test_the_blocking_client_runs_the_same_calls(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    with Client(gw.address) as client:
        [a, b] = client.submit_batch(
            [job_spec("echo", inputs={"in": b"data"}), job_spec("fail", params={"message": "no"})]
        )
        assert client.wait(a.job.id).result.outputs["in"] == b"data"
        events = list(client.watch(b.job.id))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].state is JobState.FAILED
        # Leaving a watch early closes its stream.
        for event in client.watch(a.job.id):
            assert event.seq == 1
            break
        ran = list(client.run("echo", params={"text": "hi"}))
        assert ran[-1].state is JobState.SUCCEEDED
        # Cancelling an ended job changes nothing.
        assert client.cancel(a.job.id, "no longer needed").state is JobState.SUCCEEDED
        jobs, token = client.list()
        assert [j.id for j in jobs] == [ran[0].job_id, b.job.id, a.job.id]
        assert token == ""
        assert [w.worker_id for w in client.list_workers()] == ["w1"]
        with pytest.raises(JobFailed, match="no"):
            client.wait(b.job.id, check=True)
        with pytest.raises(NotFound):
            client.get("nope")


def test_inputs_go_up_from_paths_and_outputs_come_down_to_paths(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    small, big = tmp_path / "small.txt", tmp_path / "big.bin"
    small.write_bytes(b"hi")
    big.write_bytes(os.urandom(3 << 20))  # over the inline limit: streamed up as a blob
    with Client(gw.address) as client:
        [submitted] = client.submit_batch([job_spec("echo", inputs={"s": small, "b": str(big)})])
        job = client.wait(submitted.job.id, check=True)
        assert job.result.outputs == {"s": b"hi"}
        client.download(job.result.output_blobs["b"].id, tmp_path / "copy.bin")
        assert client.outputs(job) == {"s": b"hi", "b": big.read_bytes()}
    assert (tmp_path / "copy.bin").read_bytes() == big.read_bytes()
