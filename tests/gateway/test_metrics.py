"""GatewayMetrics: what the scheduler's reports add up to, in WatchStats and in Prometheus."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.jobs import S, now
from gateway.metrics import MAX_CODES, MAX_KINDS, MAX_TENANTS, OTHER, RECENT_JOBS, GatewayMetrics
from gateway.workers import WorkerSession
from jobmesh.v1 import job_pb2

ECHO = frozenset({("kind", "echo"), ("tenant", "default")})


def new_job(job_id: str, kind: str = "echo", tenant: str = "default") -> job_pb2.Job:
    job = job_pb2.Job(
        id=job_id, tenant=tenant, spec=job_pb2.JobSpec(kind=kind), state=S.JOB_STATE_QUEUED
    )
    job.attempt = 1
    job.create_time.FromSeconds(1000)
    return job


def move(metrics: GatewayMetrics, job: job_pb2.Job, state: int) -> None:
    """What Scheduler._set_state does."""
    metrics.state_changed(job, state)
    job.state = state  # type: ignore[assignment]


def run(
    metrics: GatewayMetrics, job: job_pb2.Job, end: int, seconds: float, code: str = ""
) -> None:
    """Assigns the job at t=1000 and ends it `seconds` later in state `end`."""
    move(metrics, job, S.JOB_STATE_ASSIGNED)
    metrics.assigned(job, waited=0.5)
    attempt = job.attempts.add(number=job.attempt)
    attempt.start_time.FromSeconds(1000)
    move(metrics, job, S.JOB_STATE_RUNNING)
    move(metrics, job, end)
    if code:
        job.error.code = code
    job.end_time.FromNanoseconds(int((1000 + seconds) * 1e9))
    metrics.ended(job)


def samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_queue_depth_and_running_follow_state_changes() -> None:
    metrics = GatewayMetrics()
    jobs = [new_job(f"j{i}") for i in range(3)]
    for job in jobs:
        metrics.submitted(job)
    assert metrics.snapshot().queued == {"echo": 3}
    move(metrics, jobs[0], S.JOB_STATE_ASSIGNED)
    move(metrics, jobs[0], S.JOB_STATE_RUNNING)
    move(metrics, jobs[0], S.JOB_STATE_RUNNING)  # progress: no change
    snap = metrics.snapshot()
    assert (snap.queued, snap.running) == ({"echo": 2}, {"echo": 1})
    move(metrics, jobs[0], S.JOB_STATE_QUEUED)  # a retry
    move(metrics, jobs[1], S.JOB_STATE_CANCELLED)
    snap = metrics.snapshot()
    assert (snap.queued, snap.running) == ({"echo": 2}, {})
    assert samples(metrics)[("jobmesh_gateway_queue_depth", ECHO)] == 2


def test_recovered_jobs_count_in_their_state() -> None:
    metrics = GatewayMetrics()
    running = new_job("a", "sleep")
    running.state = S.JOB_STATE_RUNNING
    metrics.recovered(running)
    metrics.recovered(new_job("b", "sleep"))
    snap = metrics.snapshot()
    assert (snap.queued, snap.running) == ({"sleep": 1}, {"sleep": 1})
    assert snap.totals.submitted == 0  # submitted by an earlier run


def test_ended_jobs_give_totals_success_rate_and_mean_processing_time() -> None:
    metrics = GatewayMetrics()
    for i, (end, seconds) in enumerate(
        [(S.JOB_STATE_SUCCEEDED, 1.0), (S.JOB_STATE_SUCCEEDED, 3.0), (S.JOB_STATE_FAILED, 2.0)]
    ):
        job = new_job(f"j{i}")
        metrics.submitted(job)
        run(metrics, job, end, seconds, code="BOOM" if end == S.JOB_STATE_FAILED else "")
    cancelled = new_job("c")
    metrics.submitted(cancelled)
    move(metrics, cancelled, S.JOB_STATE_CANCELLED)
    cancelled.end_time.FromSeconds(1000)
    metrics.ended(cancelled)

    snap = metrics.snapshot()
    assert snap.totals.submitted == 4
    assert (snap.totals.completed, snap.totals.failed, snap.totals.cancelled) == (2, 1, 1)
    assert snap.recent_jobs == 3  # cancelled jobs neither succeed nor fail
    assert snap.success_rate == 2 / 3
    assert snap.mean_processing_seconds == 2.0
    assert (snap.queued, snap.running) == ({}, {})

    found = samples(metrics)
    assert found[("jobmesh_gateway_jobs_completed_total", ECHO)] == 2
    assert found[("jobmesh_gateway_jobs_failed_total", ECHO | {("code", "BOOM")})] == 1
    assert found[("jobmesh_gateway_jobs_cancelled_total", ECHO)] == 1
    completed = frozenset({("kind", "echo"), ("state", "completed")})
    assert found[("jobmesh_gateway_job_duration_seconds_count", completed)] == 2
    assert found[("jobmesh_gateway_job_duration_seconds_sum", completed)] == 4.0
    assert found[("jobmesh_gateway_queue_wait_seconds_count", frozenset({("kind", "echo")}))] == 3


def test_a_job_that_never_ran_counts_in_the_success_rate_only() -> None:
    metrics = GatewayMetrics()
    job = new_job("j")
    metrics.submitted(job)
    move(metrics, job, S.JOB_STATE_FAILED)  # e.g. SCHEDULE_TO_START_TIMEOUT
    job.end_time.CopyFrom(now())
    metrics.ended(job)
    snap = metrics.snapshot()
    assert (snap.recent_jobs, snap.success_rate, snap.mean_processing_seconds) == (1, 0.0, 0.0)


def test_the_recent_window_keeps_the_latest_jobs() -> None:
    metrics = GatewayMetrics()
    for i in range(RECENT_JOBS + 10):
        job = new_job(f"j{i}")
        metrics.submitted(job)
        run(metrics, job, S.JOB_STATE_FAILED if i < 10 else S.JOB_STATE_SUCCEEDED, 1.0)
    snap = metrics.snapshot()
    assert (snap.recent_jobs, snap.success_rate) == (RECENT_JOBS, 1.0)


async def test_scrapes_list_the_attached_workers_from_the_event_loop() -> None:
    metrics = GatewayMetrics()
    w1 = WorkerSession(session_id="s1", worker_id="w1", kinds={"echo": 0}, slots=4)
    w1.hold(("j1", 1), "echo")
    w2 = WorkerSession(session_id="s2", worker_id="w2", kinds={"echo": 0}, slots=2)
    sessions = [w1, w2]
    metrics.watch_workers(lambda: sessions, asyncio.get_running_loop())
    # Scraped from another thread, as the /metrics server does.
    found = await asyncio.to_thread(samples, metrics)
    assert found[("jobmesh_gateway_sessions", frozenset())] == 2
    assert found[("jobmesh_gateway_worker_active_jobs", frozenset({("worker_id", "w1")}))] == 1
    assert found[("jobmesh_gateway_worker_slots", frozenset({("worker_id", "w2")}))] == 2
    sessions.pop()
    found = await asyncio.to_thread(samples, metrics)
    assert ("jobmesh_gateway_worker_slots", frozenset({("worker_id", "w2")})) not in found
    assert found[("jobmesh_gateway_sessions", frozenset())] == 1


def test_invented_kinds_and_codes_cannot_grow_the_metrics_forever() -> None:
    metrics = GatewayMetrics()
    for i in range(MAX_KINDS + 100):
        job = new_job(f"j{i}", kind=f"made.up.{i}")
        metrics.submitted(job)
        run(metrics, job, S.JOB_STATE_FAILED, 1.0, code=f"CODE_{i}")
    submitted = {
        dict(labels)["kind"]: value
        for (name, labels), value in samples(metrics).items()
        if name == "jobmesh_gateway_jobs_submitted_total"
    }
    assert len(submitted) == MAX_KINDS + 1
    assert submitted[OTHER] == 100  # nothing is lost from the totals
    codes = {
        dict(labels)["code"]
        for (name, labels), _ in samples(metrics).items()
        if name == "jobmesh_gateway_jobs_failed_total"
    }
    assert len(codes) == MAX_CODES + 1
    assert metrics.snapshot().queued == {}  # every job left the queue, OTHER ones too


def test_job_series_carry_the_tenant_and_invented_tenants_are_capped() -> None:
    metrics = GatewayMetrics()
    for i in range(MAX_TENANTS + 5):
        metrics.submitted(new_job(f"j{i}", tenant=f"team-{i}"))
    found = samples(metrics)
    team_0 = frozenset({("kind", "echo"), ("tenant", "team-0")})
    assert found[("jobmesh_gateway_jobs_submitted_total", team_0)] == 1
    assert found[("jobmesh_gateway_queue_depth", team_0)] == 1
    other = frozenset({("kind", "echo"), ("tenant", OTHER)})
    assert found[("jobmesh_gateway_queue_depth", other)] == 5
    assert metrics.snapshot().queued == {"echo": MAX_TENANTS + 5}  # WatchStats: by kind
