"""Real faults mid-batch: nothing accepted is lost, and only jobs in flight run twice.

The scenarios live in `scenarios.py`, shared with bench/faults.py; here the batches are
small enough for the suite to stay quick.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.faults import scenarios
from tests.faults.scenarios import FaultRecord, Scale, describe
from tests.postgres import PostgresCluster

SCALE = Scale(jobs=200, seconds=0.05, slots=4)

pytestmark = pytest.mark.timeout(120)


def assert_every_job_succeeded(record: FaultRecord) -> None:
    assert record.accepted >= SCALE.jobs
    assert record.lost == 0, describe(record)
    assert record.failed == 0, describe(record)
    assert record.succeeded == record.accepted, describe(record)
    assert record.never_ran == set(), describe(record)


async def test_a_killed_workers_jobs_run_again_on_the_other(cluster: Cluster) -> None:
    record = await scenarios.worker_sigkill(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.detect_seconds is not None  # the gateway dropped the worker
    assert record.unexpected_duplicates == set(), describe(record)
    assert record.facts["moved_to"] == ["w2"], describe(record)


async def test_a_stopped_worker_is_declared_dead_and_its_jobs_run_elsewhere(
    cluster: Cluster,
) -> None:
    record = await scenarios.worker_sigstop(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.detect_seconds is not None  # gone from ListWorkers
    assert record.unexpected_duplicates == set(), describe(record)
    assert record.facts["moved_to"] == ["w2"], describe(record)
    # Continued, it re-attaches, and what it reports late changes nothing.
    assert record.facts["rejoined"]
    assert record.facts["changed_after_rejoin"] == []


async def test_a_draining_worker_finishes_its_jobs_and_exits_cleanly(cluster: Cluster) -> None:
    record = await scenarios.worker_sigterm(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.detect_seconds is not None  # draining, then gone
    assert record.duplicated == 0, describe(record)
    assert record.facts["exit_code"] == 0


async def test_a_worker_whose_connection_is_cut_reattaches_and_its_jobs_carry_on(
    cluster: Cluster,
) -> None:
    record = await scenarios.connection_cut(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.detect_seconds is not None  # attached again, on a new session
    assert record.facts["connections"] >= 2
    # The job held running on w1 across the cut ended by its first attempt.
    assert record.facts["held_carried_on"] == record.facts["held"] == 1, describe(record)
    # Results written just before the cut are sent again until acknowledged: nothing reruns.
    assert record.duplicated == 0, describe(record)


async def test_a_worker_reconnecting_after_a_network_blip_runs_nothing_twice(
    cluster: Cluster,
) -> None:
    record = await scenarios.connection_blip(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.detect_seconds is not None  # attached again, on a new session
    assert record.facts["held_carried_on"] == record.facts["held"] == 1, describe(record)
    assert record.duplicated == 0, describe(record)


async def test_a_blackholed_worker_is_declared_dead_and_its_jobs_run_elsewhere(
    cluster: Cluster,
) -> None:
    record = await scenarios.connection_blackhole(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.detect_seconds is not None  # gone from ListWorkers
    assert record.unexpected_duplicates == set(), describe(record)
    assert record.facts["moved_to"] == ["w2"], describe(record)
    assert record.facts["rejoined"]
    assert record.facts["changed_after_rejoin"] == []


async def test_a_killed_gateway_restarted_on_its_database_loses_nothing(
    cluster: Cluster,
) -> None:
    record = await scenarios.gateway_sigkill(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.detect_seconds is not None  # both workers attached to the new gateway
    assert record.unexpected_duplicates == set(), describe(record)
    # Jobs held running throughout the outage were taken back, not run again.
    assert record.facts["held_carried_on"] == record.facts["held"] == 2, describe(record)


async def test_a_gateway_stopped_gracefully_and_restarted_runs_nothing_twice(
    cluster: Cluster,
) -> None:
    record = await scenarios.gateway_sigterm(cluster, SCALE)
    assert_every_job_succeeded(record)
    assert record.facts["gateway_exit_code"] == 0
    assert record.detect_seconds is not None
    assert record.duplicated == 0, describe(record)
    assert record.facts["held_carried_on"] == record.facts["held"] == 2, describe(record)


@pytest.mark.one_store  # it is about PostgreSQL
async def test_a_postgresql_outage_refuses_calls_and_the_mesh_resumes_losing_nothing(
    tmp_path: Path, postgres: PostgresCluster, pg_dsn: str
) -> None:
    cluster = Cluster(tmp_path, pg_dsn)
    try:
        record = await scenarios.postgres_outage(cluster, SCALE, postgres)
    finally:
        cluster.close()
    assert record.facts["calls_during_outage"] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert_every_job_succeeded(record)
    assert record.unexpected_duplicates == set(), describe(record)
