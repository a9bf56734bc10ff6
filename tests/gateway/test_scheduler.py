"""The scheduler in-process, on a real SQLite store and hand-driven worker sessions: the
queue lives in the store, and the gateway holds only each queue's head (its window) and the
running attempts, yet dispatches by priority then age, restarts without reading the queue,
and honours not_before, deadlines, cancels and retries of jobs that wait in the store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.blobs import BlobStore
from gateway.config import GatewaySettings
from gateway.jobs import S, ts_seconds
from gateway.metrics import GatewayMetrics
from gateway.scheduler import Scheduler
from gateway.sessions import apply
from gateway.store.sqlite import SqliteStore
from gateway.workers import WorkerSession
from jobmesh import job_spec
from jobmesh.codes import Code
from jobmesh.v1 import dispatcher_pb2, job_pb2
from tests.cluster import until

WINDOW = 4
TENANT = "default"


class Harness:
    """A scheduler over a SQLite file, restartable as a gateway is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.settings = GatewaySettings(db=str(path / "jobs.db"), queue_window=WINDOW)
        self.metrics = GatewayMetrics()
        self.store = SqliteStore(self.settings.db)
        self.scheduler = Scheduler(
            self.settings, self.store, BlobStore(path / "blobs", 1 << 20), self.metrics
        )

    async def start(self) -> Harness:
        await self.store.open(lambda events: None)
        await self.store.forget_leases()  # as the gateway does, holding the database alone
        await self.scheduler.recover()
        return self

    async def stop(self) -> None:
        self.scheduler.stop()
        await self.scheduler.settled()
        await self.store.close()

    async def submit(self, n: int = 1, **options: object) -> list[str]:
        spec = job_spec("echo", **options).spec  # type: ignore[arg-type]
        inserted = await self.scheduler.submit(TENANT, [spec] * n)
        return [item.job.id for item in inserted]

    async def attach(
        self, slots: int = 1, worker_id: str = "w1", *, answered: bool = True
    ) -> WorkerSession:
        session = WorkerSession(
            session_id=worker_id, worker_id=worker_id, kinds={"echo": 0}, slots=slots
        )
        # A worker gets work once it answered a ping.
        session.answered = int(answered)
        self.scheduler.attach(session, ())
        await self.scheduler.settled()
        return session

    async def complete(self, session: WorkerSession) -> str:
        """Completes the session's one attempt; its job id."""
        [(job_id, attempt)] = session.inflight
        done = dispatcher_pb2.Completed(job_id=job_id, attempt=attempt)
        apply(self.scheduler, session, dispatcher_pb2.SessionRequest(completed=[done]))
        await self.scheduler.settled()
        return job_id

    async def job(self, job_id: str) -> job_pb2.Job:
        await self.store.barrier()
        return await self.scheduler.get(TENANT, job_id)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await Harness(tmp_path).start()
    try:
        yield h
    finally:
        await h.stop()


def running(session: WorkerSession) -> list[str]:
    return [job_id for job_id, _ in session.inflight]


async def test_a_queue_far_longer_than_its_window_runs_by_priority_then_age(
    harness: Harness,
) -> None:
    low = await harness.submit(10)
    high = [(await harness.submit(priority=5))[0] for _ in range(3)]
    assert harness.scheduler.held == 0  # no worker serves echo yet: all wait in the store
    session = await harness.attach(slots=1)
    ran = [await harness.complete(session)]  # and the next starts
    # A job of a higher priority than the whole window still goes next.
    urgent = await harness.submit(priority=9)
    while session.inflight:
        assert harness.scheduler.held <= WINDOW + 1
        ran.append(await harness.complete(session))
    assert ran == [*high[:2], *urgent, high[2], *low]
    assert harness.scheduler.queued == 0


async def test_a_restarted_gateway_leaves_the_queue_in_the_store(tmp_path: Path) -> None:
    first = await Harness(tmp_path).start()
    ids = await first.submit(50)
    await first.attach(answered=False)  # claims a window, leased to this gateway
    assert first.scheduler.held == WINDOW
    await first.stop()

    again = await Harness(tmp_path).start()
    try:
        assert (again.scheduler.held, again.scheduler.queued) == (0, 50)
        session = await again.attach(slots=1)
        ran: list[str] = []
        while session.inflight:
            assert again.scheduler.held <= WINDOW + 1
            ran.append(await again.complete(session))
        # The first gateway's window went back to the queue, in its place.
        assert ran == ids
    finally:
        await again.stop()


async def test_not_before_holds_a_job_queued_until_its_time(harness: Harness) -> None:
    at = datetime.now(UTC) + timedelta(seconds=0.5)
    [later] = await harness.submit(not_before=at)
    [now] = await harness.submit()
    session = await harness.attach(slots=1)
    assert running(session) == [now]
    await harness.scheduler.refresh_queue_ages()
    assert set(harness.metrics.oldest_ages(time.time())) == set()  # the delayed one is not ready
    await harness.complete(session)
    assert not session.inflight
    await until(lambda: running(session) == [later])
    job = await harness.job(later)
    assert ts_seconds(job.attempts[0].start_time) >= at.timestamp()


async def test_a_countdown_counts_from_submit() -> None:
    spec = job_spec("echo", not_before=30).spec
    assert 29 < ts_seconds(spec.not_before) - time.time() <= 30


async def test_jobs_waiting_in_the_store_fail_at_their_deadlines(harness: Harness) -> None:
    [closing] = await harness.submit(schedule_to_close_timeout=0.3)
    [starting] = await harness.submit(schedule_to_start_timeout=0.3)
    [patient] = await harness.submit()
    for job_id, code in (
        (closing, Code.DEADLINE_EXCEEDED),
        (starting, Code.SCHEDULE_TO_START_TIMEOUT),
    ):
        job = await harness.job(job_id)
        while job.state == S.JOB_STATE_QUEUED:
            await asyncio.sleep(0.05)
            job = await harness.job(job_id)
        assert (job.state, job.error.code) == (S.JOB_STATE_FAILED, code.value)
    assert (await harness.job(patient)).state == S.JOB_STATE_QUEUED
    assert harness.scheduler.queued == 1


async def test_a_cancel_reaches_a_job_waiting_in_the_store(harness: Harness) -> None:
    ids = await harness.submit(WINDOW * 3)
    cancelled = await harness.scheduler.cancel(TENANT, ids[-1], "not needed")
    assert cancelled.state == S.JOB_STATE_CANCELLED
    session = await harness.attach(slots=1)
    ran = []
    while session.inflight:
        ran.append(await harness.complete(session))
    assert ran == ids[:-1]
    assert (await harness.job(ids[-1])).state == S.JOB_STATE_CANCELLED


async def test_a_retry_waits_its_backoff_in_the_store_then_runs(harness: Harness) -> None:
    [flaky] = await harness.submit(initial_backoff=0.3, max_attempts=2)
    session = await harness.attach(slots=1)
    failed = dispatcher_pb2.Failed(
        job_id=flaky, attempt=1, error=Code.HANDLER_ERROR.error("try again", retryable=True)
    )
    apply(harness.scheduler, session, dispatcher_pb2.SessionRequest(failed=[failed]))
    assert harness.scheduler.held == 0  # waiting out its backoff in the store
    await until(lambda: bool(session.inflight))
    assert session.inflight.keys() == {(flaky, 2)}


async def test_the_oldest_ready_job_gives_each_kind_its_queue_age(harness: Harness) -> None:
    await harness.submit(3)
    await asyncio.sleep(0.05)
    await harness.scheduler.refresh_queue_ages()
    ages = harness.metrics.oldest_ages(time.time())
    assert set(ages) == {"echo"}
    assert ages["echo"] >= 0.05
