"""What operators see of the worker replicas."""

from __future__ import annotations

from tests.cluster import Cluster, until


async def test_workers_report_their_health_in_pongs(cluster: Cluster) -> None:
    gw = cluster.gateway(ping_interval=5.0)
    cluster.worker(gw, "w1", slots=3)
    await until(lambda: all(w.HasField("last_pong_time") for w in gw.workers()))
    [worker] = gw.workers()
    assert worker.slots == 3
    assert worker.stats.free_slots == 3
    assert worker.stats.active_jobs == 0
    assert worker.stats.rss_bytes > 10_000_000  # a Python process and its pool
    assert {k.kind for k in worker.kinds} >= {"echo", "sleep", "fail"}
