"""What operators watch: Prometheus metrics, WatchStats, `jobmesh top` and JSON logs, from
real gateway and worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client.parser import text_string_to_metric_families

from jobmesh import AsyncClient, InvalidArgument, JobState
from tests.cluster import Cluster, Proc, until

JOBMESH = Path(sys.executable).parent / "jobmesh"


# Ports handed to a process to bind later are taken below the kernel's ephemeral range
# (32768 and up on Linux), where no outgoing connection of another test can take them first.
_PORTS = range(20000, 32768)


def free_port() -> int:
    for _ in range(100):
        port = random.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def metrics_flags(port: int) -> tuple[str, ...]:
    return ("--metrics-port", str(port), "--metrics-host", "127.0.0.1")


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample at http://127.0.0.1:port/metrics, by (name, labels)."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text: str = answer.read().decode()
            return text

    samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until_state(client: AsyncClient, job_id: str, state: int) -> None:
    async for event in client.watch(job_id):
        if event.state == state:
            return
    raise AssertionError(f"job {job_id} ended without reaching {state}")


async def test_gateway_and_worker_metrics_count_jobs(cluster: Cluster) -> None:
    gw_port, worker_port = free_port(), free_port()
    gw = cluster.gateway(*metrics_flags(gw_port))
    cluster.worker(gw, "w1", *metrics_flags(worker_port), slots=2)
    async with AsyncClient(gw.address) as client:
        for text in ("a", "b"):
            await client.wait((await client.submit("echo", params={"text": text})).job.id)
        failed = await client.submit("fail", params={"message": "boom"})
        await client.wait(failed.job.id)
        waiting = await client.submit("nobody-serves-this")
        sleeping = await client.submit("sleep", params={"seconds": 60})
        await until_state(client, sleeping.job.id, JobState.RUNNING)

        gateway = await scrape(gw_port)
        worker = await scrape(worker_port)
        await client.cancel(sleeping.job.id)
        await client.cancel(waiting.job.id)

    assert (
        value(gateway, "jobmesh_gateway_jobs_submitted_total", kind="echo", tenant="default") == 2
    )
    assert (
        value(gateway, "jobmesh_gateway_jobs_submitted_total", kind="fail", tenant="default") == 1
    )
    assert (
        value(gateway, "jobmesh_gateway_jobs_completed_total", kind="echo", tenant="default") == 2
    )
    assert (
        value(
            gateway,
            "jobmesh_gateway_jobs_failed_total",
            kind="fail",
            code="FAILED_ON_PURPOSE",
            tenant="default",
        )
        == 1
    )
    assert (
        value(gateway, "jobmesh_gateway_queue_depth", kind="nobody-serves-this", tenant="default")
        == 1
    )
    assert value(gateway, "jobmesh_gateway_queue_depth", kind="echo", tenant="default") == 0
    assert value(gateway, "jobmesh_gateway_jobs_running", kind="sleep", tenant="default") == 1
    ended = {"kind": "echo", "state": "completed"}
    assert value(gateway, "jobmesh_gateway_job_duration_seconds_count", **ended) == 2
    assert value(gateway, "jobmesh_gateway_queue_wait_seconds_count", kind="echo") == 2
    assert value(gateway, "jobmesh_gateway_sessions") == 1
    assert value(gateway, "jobmesh_gateway_worker_active_jobs", worker_id="w1") == 1
    assert value(gateway, "jobmesh_gateway_worker_slots", worker_id="w1") == 2

    assert value(worker, "jobmesh_worker_jobs_done_total", kind="echo") == 2
    assert (
        value(worker, "jobmesh_worker_jobs_failed_total", kind="fail", code="FAILED_ON_PURPOSE")
        == 1
    )
    assert value(worker, "jobmesh_worker_handler_duration_seconds_count", kind="echo") == 2
    assert value(worker, "jobmesh_worker_active_jobs") == 1
    assert value(worker, "jobmesh_worker_slots") == 2
    assert value(worker, "jobmesh_worker_pool_processes") == 2
    assert value(worker, "jobmesh_worker_connected") == 1

    # Cancelled jobs leave the queue and the running count.
    gateway = await scrape(gw_port)
    assert (
        value(gateway, "jobmesh_gateway_jobs_cancelled_total", kind="sleep", tenant="default") == 1
    )
    assert (
        value(gateway, "jobmesh_gateway_queue_depth", kind="nobody-serves-this", tenant="default")
        == 0
    )
    assert value(gateway, "jobmesh_gateway_jobs_running", kind="sleep", tenant="default") == 0


async def test_watch_stats_streams_workers_queues_and_rates(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    cluster.worker(gw, "w2")
    async with AsyncClient(gw.address) as client:
        await client.wait((await client.submit("echo")).job.id)
        for _ in range(3):
            await client.submit("nobody-serves-this")
        updates = client.watch_stats(0.1)
        first = await anext(updates)
        assert first.period.ToNanoseconds() == 0
        assert [w.worker_id for w in first.workers] == ["w1", "w2"]
        assert [(k.kind, k.queued, k.running) for k in first.kinds] == [
            ("nobody-serves-this", 3, 0)
        ]
        assert (first.totals.submitted, first.totals.completed) == (4, 1)
        assert (first.recent_jobs, first.success_rate) == (1, 1.0)

        await client.submit("nobody-serves-this")
        await client.submit("nobody-serves-this")
        submitted = 0.0
        async for stats in updates:
            assert stats.period.ToNanoseconds() > 0
            submitted += stats.rates.submitted_per_second * stats.period.ToNanoseconds() / 1e9
            if stats.totals.submitted == 6:
                break
        await updates.aclose()
    assert submitted == pytest.approx(2, rel=0.01)
    assert [(k.kind, k.queued) for k in stats.kinds] == [("nobody-serves-this", 5)]


@pytest.mark.parametrize("seconds", [0, 0.05, 61])
async def test_watch_stats_refuses_an_interval_out_of_bounds(
    cluster: Cluster, seconds: float
) -> None:
    gw = cluster.gateway()
    async with AsyncClient(gw.address) as client:
        with pytest.raises(InvalidArgument, match="interval"):
            await anext(client.watch_stats(seconds))


def jobmesh(gateway: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JOBMESH_GATEWAY": gateway}
    return subprocess.run(
        [str(JOBMESH), *argv], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_top_once_prints_the_stats(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=3)
    async with AsyncClient(gw.address) as client:
        await client.submit("nobody-serves-this")
        await client.submit("nobody-serves-this")
    await until(lambda: all(w.HasField("last_pong_time") for w in gw.workers()))

    done = await asyncio.to_thread(
        jobmesh, gw.address, "top", "--once", "--json", "--interval", "0.1"
    )
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    stats = json.loads(line)
    assert [(w["worker_id"], w["slots"], w["active_jobs"]) for w in stats["workers"]] == [
        ("w1", 3, 0)
    ]
    [kind] = stats["kinds"]
    assert (kind["kind"], kind["queued"], kind["running"]) == ("nobody-serves-this", 2, 0)
    # Both wait since they were submitted, before the worker's pongs came.
    assert float(kind["oldest_queued_age"].rstrip("s")) > 0
    assert stats["totals"]["submitted"] == 2
    assert set(stats["rates"]) == {
        "submitted_per_second",
        "completed_per_second",
        "failed_per_second",
        "cancelled_per_second",
    }

    done = await asyncio.to_thread(jobmesh, gw.address, "top", "--once", "--interval", "0.1")
    assert done.returncode == 0, done.stderr
    assert "w1" in done.stdout
    assert "0/3" in done.stdout  # active/slots
    assert "nobody-serves-this" in done.stdout

    done = await asyncio.to_thread(jobmesh, gw.address, "top", "--once", "--interval", "0.01")
    assert done.returncode == 2
    assert "INVALID_ARGUMENT: interval" in done.stderr


def json_lines(text: str) -> Iterable[dict[str, object]]:
    for line in text.splitlines():
        if line.startswith("{"):
            yield json.loads(line)


async def test_json_logs_carry_the_job_id_and_trace_id(cluster: Cluster) -> None:
    gw = cluster.gateway("--log-format", "json")
    worker = cluster.worker(gw, "w1", "--log-format", "json")
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    parent = SpanContext(
        trace_id=trace_id, span_id=0xB7AD6B7169203331, is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )  # fmt: skip
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        async with AsyncClient(gw.address) as client:
            submitted = await client.submit("fail", params={"message": "boom"})
            await client.wait(submitted.job.id)
    finally:
        context.detach(token)
    job_id = submitted.job.id

    def about_the_job(text: str) -> list[dict[str, object]]:
        return [line for line in json_lines(text) if line.get("job_id") == job_id]

    await until(lambda: bool(about_the_job(gw.output())) and bool(about_the_job(worker.output())))
    [gateway_line] = about_the_job(gw.output())
    assert gateway_line["level"] == "INFO"
    assert gateway_line["logger"] == "gateway.scheduler"
    assert "FAILED_ON_PURPOSE" in str(gateway_line["message"])
    assert gateway_line["attempt"] == 1
    assert gateway_line["trace_id"] == format(trace_id, "032x")
    assert {"time", "level", "logger", "message"} <= set(gateway_line)
    [worker_line] = about_the_job(worker.output())
    assert worker_line["attempt"] == 1
    assert worker_line["trace_id"] == format(trace_id, "032x")
    # Every line is JSON, not only the job's.
    assert all(line.startswith("{") for line in gw.output().splitlines() if line.strip())


def free_ports(n: int) -> int:
    """The first of `n` consecutive ports that are free now."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first + 1, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {n} consecutive free ports")


async def test_serve_passes_metrics_ports_and_the_log_format_to_its_replicas(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBMESH_METRICS_HOST", "127.0.0.1")
    port = free_ports(3)
    serve = Proc(
        args=[
            str(JOBMESH), "serve", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "serve.db"),
            "--port-file", str(tmp_path / "serve.port"), "--workers", "2", "--slots", "1",
            "--metrics-port", str(port), "--log-format", "json",
        ],
        log=tmp_path / "serve.log",
    )  # fmt: skip
    cluster.procs.append(serve)
    serve.start()
    await until(lambda: (tmp_path / "serve.port").exists() or not serve.alive())
    async with asyncio.timeout(30):
        # The replicas serve their metrics before they attach.
        while value(await scrape(port), "jobmesh_gateway_sessions") < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    for replica in (1, 2):
        assert value(await scrape(port + replica), "jobmesh_worker_slots") == 1
    assert serve.stop() == 0
    logged = serve.output().splitlines()
    assert logged
    assert all(line.startswith("{") for line in logged), logged
    loggers = {str(line["logger"]) for line in json_lines(serve.output())}
    assert {"gateway", "worker_service"} <= loggers
