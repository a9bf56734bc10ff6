"""One gateway per SQLite file: a second one fails at once, or waits with --wait-for-db."""

from __future__ import annotations

import signal
import socket

from jobmesh import AsyncClient, JobState
from tests.cluster import Cluster, until

EXIT_ERROR = 3


def test_a_second_gateway_on_the_same_db_fails_at_once_naming_the_first(
    cluster: Cluster,
) -> None:
    first = cluster.gateway()
    second = cluster.gateway(wait=False)
    assert second.wait() == EXIT_ERROR
    [line] = second.output().splitlines()
    assert (
        f"{cluster.db} is in use by the gateway pid {first.pid} on {socket.gethostname()}" in line
    )
    assert "--wait-for-db" in line
    assert first.alive()


def test_the_lock_of_a_killed_gateway_is_not_left_behind(cluster: Cluster) -> None:
    first = cluster.gateway()
    first.signal(signal.SIGKILL)
    first.wait()
    cluster.gateway()  # starts serving: the kernel released the lock with the process


async def test_with_wait_for_db_a_gateway_takes_over_once_the_first_has_stopped(
    cluster: Cluster,
) -> None:
    first = cluster.gateway()
    async with AsyncClient(first.address) as client:
        ids = [(await client.submit("echo", params={"i": i})).job.id for i in range(5)]
    second = cluster.gateway("--wait-for-db", "30", wait=False)
    await until(lambda: f"waiting for the gateway pid {first.pid}" in second.output())
    assert second.alive()
    first.signal(signal.SIGTERM)
    second.wait_serving()
    assert first.wait() == 0
    async with AsyncClient(second.address) as client:
        jobs = [await client.get(i) for i in ids]
    assert [j.state for j in jobs] == [JobState.QUEUED] * 5


def test_an_idle_gateway_exits_cleanly_on_sigterm(cluster: Cluster) -> None:
    gw = cluster.gateway()
    worker = cluster.worker(gw, "w1")  # attached and running nothing: told to go at once
    assert gw.stop() == 0
    assert "gateway stopped" in gw.output()
    assert worker.alive()  # it re-dials with backoff, for the next gateway
