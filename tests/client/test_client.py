"""AsyncClient and Client against a scripted gateway: resumed watches, results, errors."""

from __future__ import annotations

import pytest

from jobmesh import AsyncClient, Client, InvalidArgument, JobFailed, NotFound, job_spec
from jobmesh.v1 import job_pb2
from tests.client.fake_gateway import FakeGateway

S = job_pb2.JobState


async def test_watch_resumes_after_a_broken_stream_and_loses_no_event(
    fake: FakeGateway, gateway: str
) -> None:
    job = fake.add(job_pb2.JobSpec(kind="echo"))
    fake.break_watches = [2, 0, 1]  # two events, then a refused resume, then one more
    async with AsyncClient(gateway) as client:
        events = [e async for e in client.watch(job.id)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[-1].state == S.JOB_STATE_SUCCEEDED
    assert [r.after_seq for r in fake.watch_requests] == [0, 2, 2, 3]


async def test_watch_past_the_terminal_event_ends_at_once(fake: FakeGateway, gateway: str) -> None:
    job = fake.add(job_pb2.JobSpec(kind="echo"))
    async with AsyncClient(gateway) as client:
        assert [e async for e in client.watch(job.id, after_seq=5)] == []


async def test_run_continues_with_watch_when_its_stream_breaks(
    fake: FakeGateway, gateway: str
) -> None:
    fake.break_watches = [3]
    async with AsyncClient(gateway) as client:
        events = [e async for e in client.run("echo", inputs={"in": b"data"})]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[-1].result.outputs["in"] == b"data"
    assert [r.after_seq for r in fake.watch_requests] == [3]


async def test_wait_returns_the_ended_job_and_check_raises_for_a_failure(
    fake: FakeGateway, gateway: str
) -> None:
    async with AsyncClient(gateway) as client:
        ok = await client.submit("echo", params={"n": 3}, inputs={"a": b"1"})
        assert ok.warnings == ("no worker serves it yet",)
        job = await client.wait(ok.job.id, check=True)
        assert job.state == S.JOB_STATE_SUCCEEDED
        assert job.result.outputs == {"a": b"1"}
        failed = await client.submit("fail")
        assert (await client.wait(failed.job.id)).state == S.JOB_STATE_FAILED
        with pytest.raises(JobFailed, match=r"FAILED: \[HANDLER_ERROR\] boom"):
            await client.wait(failed.job.id, check=True)


async def test_failed_calls_raise_typed_errors(gateway: str) -> None:
    async with AsyncClient(gateway) as client:
        with pytest.raises(NotFound, match="no job nope"):
            await client.get("nope")
        with pytest.raises(InvalidArgument, match=r"spec\.kind"):
            await client.submit("")


async def test_list_all_walks_every_page(fake: FakeGateway, gateway: str) -> None:
    for _ in range(5):
        fake.add(job_pb2.JobSpec(kind="echo"))
    async with AsyncClient(gateway) as client:
        first, token = await client.list(page_size=2)
        everything = [j.id async for j in client.list_all(page_size=2)]
    assert [j.id for j in first] == ["job-5", "job-4"]
    assert token
    assert everything == ["job-5", "job-4", "job-3", "job-2", "job-1"]


def test_the_blocking_client_runs_the_same_calls(fake: FakeGateway, gateway: str) -> None:
    with Client(gateway) as client:
        [a, b] = client.submit_batch([job_spec("echo"), job_spec("fail")])
        assert client.wait(a.job.id).state == S.JOB_STATE_SUCCEEDED
        fake.break_watches = [1]
        assert [e.seq for e in client.watch(b.job.id)] == [1, 2, 3, 4, 5]
        # Leaving a watch early closes its stream.
        for event in client.watch(a.job.id):
            assert event.seq == 1
            break
        assert client.cancel(a.job.id, "no longer needed").error.message == "no longer needed"
        jobs, token = client.list()
        assert [j.id for j in jobs] == [b.job.id, a.job.id]
        assert token == ""
        assert client.list_workers() == []
        with pytest.raises(JobFailed):
            client.wait(b.job.id, check=True)
