"""Submit → watch → result for each built-in kind, through the SDK, across real processes."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest

from jobmesh import AsyncClient, EventType, JobFailed, JobState
from jobmesh.v1 import admin_service_pb2
from tests.cluster import Cluster, until

DRAINING = admin_service_pb2.WORKER_STATE_DRAINING


async def test_echo_returns_its_inputs_and_params(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit(
            "echo", params={"text": "hi", "n": 3}, inputs={"data": b"\x00\x01bytes"}
        )
        assert submitted.job.state is JobState.QUEUED
        events = [e async for e in client.watch(submitted.job.id)]
        job = await client.get(submitted.job.id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].state is JobState.QUEUED
    assert events[-1].state is JobState.SUCCEEDED
    assert events[-1].result.outputs["data"] == b"\x00\x01bytes"
    assert job.state is JobState.SUCCEEDED
    assert job.result.outputs["data"] == b"\x00\x01bytes"
    assert job.result.metadata == {"text": "hi", "n": 3}
    assert [a.worker_id for a in job.attempts] == ["w1"]


async def test_sleep_streams_progress_every_tenth(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        events = [e async for e in client.run("sleep", params={"seconds": 0.5})]
    progress = [e.progress for e in events if e.type is EventType.PROGRESS]
    assert progress == pytest.approx([i / 10 for i in range(1, 11)])
    states = [e.state for e in events if e.type is EventType.STATE]
    assert states == [
        JobState.QUEUED,
        JobState.ASSIGNED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]


async def test_fail_reports_the_error_and_is_not_retried_unless_retryable(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        permanent = await client.submit("fail", params={"message": "boom"})
        with pytest.raises(JobFailed, match="boom"):
            await client.wait(permanent.job.id, check=True)
        job = await client.get(permanent.job.id)
        assert job.state is JobState.FAILED
        assert job.error.message == "boom"
        assert not job.error.retryable
        assert len(job.attempts) == 1

        transient = await client.submit(
            "fail", params={"message": "flaky", "retryable": True}, max_attempts=2
        )
        job = await client.wait(transient.job.id)
    assert job.state is JobState.FAILED
    assert job.error.retryable
    assert [a.number for a in job.attempts] == [1, 2]
    assert all(a.error.message == "flaky" for a in job.attempts)


async def test_hundreds_of_concurrent_jobs_across_two_replicas_each_run_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--handlers", "tests.integration.handlers", slots=4)
    cluster.worker(gw, "w2", "--handlers", "tests.integration.handlers", slots=4)
    runs = tmp_path / "runs.log"
    n = 300
    async with AsyncClient(gw.address) as client:
        submitted = await asyncio.gather(
            *(
                client.submit("count", params={"log": str(runs)}, inputs={"in": str(i).encode()})
                for i in range(n)
            )
        )
        jobs = await asyncio.gather(*(client.wait(s.job.id) for s in submitted))
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * n
    assert [j.result.outputs["echo"] for j in jobs] == [str(i).encode() for i in range(n)]
    executions = Counter(line.split()[0] for line in runs.read_text().splitlines())
    assert executions == Counter({s.job.id: 1 for s in submitted})
    assert {j.worker_id for j in jobs} == {"w1", "w2"}


async def test_a_worker_killed_mid_job_has_its_job_completed_by_the_other(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    workers = {
        wid: cluster.worker(gw, wid, "--handlers", "tests.integration.handlers", slots=1)
        for wid in ("w1", "w2")
    }
    runs = tmp_path / "runs.log"
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit("count", params={"log": str(runs), "seconds": 2})
        await until(lambda: runs.exists() and runs.read_text() != "")  # the handler started
        first_worker = (await client.get(submitted.job.id)).worker_id
        workers[first_worker].kill()
        job = await client.wait(submitted.job.id)
    assert job.state is JobState.SUCCEEDED
    assert job.attempt == 2
    assert {job.worker_id, first_worker} == {"w1", "w2"}
    assert job.attempts[0].worker_id == first_worker
    assert job.attempts[0].error.code == "WORKER_LOST"
    # It ran twice: once on the killed worker, once to completion.
    assert runs.read_text().split() == [job.id, "1", job.id, "2"]


async def test_an_idempotency_key_returns_the_first_job_and_its_result(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        first = await client.submit("echo", inputs={"in": b"once"}, idempotency_key="order-42")
        done = await client.wait(first.job.id)
        again = await client.submit("echo", inputs={"in": b"twice"}, idempotency_key="order-42")
        jobs, _ = await client.list()
    assert again.existing
    assert again.job.id == first.job.id
    assert again.job.state is JobState.SUCCEEDED
    assert again.job.result.outputs["in"] == done.result.outputs["in"] == b"once"
    assert [j.id for j in jobs] == [first.job.id]


async def test_a_draining_worker_finishes_its_job_while_new_work_goes_elsewhere(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    w1 = cluster.worker(gw, "w1", slots=1)
    async with AsyncClient(gw.address) as client:
        long = await client.submit("sleep", params={"seconds": 1.5})
        async for event in client.watch(long.job.id):
            if event.type is EventType.PROGRESS:
                break  # the handler is running on w1
        w1.signal(signal.SIGTERM)
        await until(lambda: any(w.state == DRAINING for w in gw.workers()))
        cluster.worker(gw, "w2", slots=1)
        short = await client.submit("echo")
        short_job = await client.wait(short.job.id)
        long_job = await client.wait(long.job.id)
    assert w1.wait() == 0
    assert long_job.state is JobState.SUCCEEDED
    assert [a.worker_id for a in long_job.attempts] == ["w1"]
    assert short_job.state is JobState.SUCCEEDED
    assert short_job.worker_id == "w2"


async def test_retries_follow_the_jobs_backoff_policy(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit(
            "fail",
            params={"message": "flaky", "retryable": True},
            max_attempts=3,
            initial_backoff=0.2,
            backoff_multiplier=3,
            max_backoff=10,
        )
        events = [e async for e in client.watch(submitted.job.id)]
    retries = [e for e in events if e.state is JobState.QUEUED and e.error is not None]
    assert [e.attempt for e in retries] == [2, 3]
    assert all(e.error.message == "flaky" for e in retries)
    # Delays of 0.2 s and 0.6 s, each less up to 20 % jitter.
    delays = [float(e.message.split("retry in ")[1].rstrip("s")) for e in retries]
    assert 0.1 <= delays[0] <= 0.2
    assert 0.4 <= delays[1] <= 0.6
    assert events[-1].state is JobState.FAILED


async def test_priority_wins_across_kinds(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=1)
    async with AsyncClient(gw.address) as client:
        backlog = [(await client.submit("sleep", params={"seconds": 0.1})).job.id for _ in range(6)]
        urgent = (await client.submit("echo", priority=10)).job.id
        jobs = {i: await client.wait(i) for i in [*backlog, urgent]}

    def started(job_id: str) -> float:
        return jobs[job_id].attempts[0].start_time.timestamp()

    # The urgent job of another kind goes before the older backlog still waiting; only
    # the sleep job already running (and at most one handed out at the same moment) is ahead.
    later = [i for i in backlog if started(i) > started(urgent)]
    assert len(later) >= len(backlog) - 2
