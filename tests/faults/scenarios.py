"""Fault scenarios: a batch of `count` jobs, one fault mid-batch, and what came of it.

Each scenario starts its own gateway and two workers through a `Cluster`, submits
`Scale.jobs` jobs, injects its fault once `Scale.fault_at` of them have started, and
returns a `FaultRecord` (see batch.py for what counts as in flight at the fault). The
tests assert on the record; `bench/faults.py` prints it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable

from jobmesh import AsyncClient
from jobmesh.errors import JobmeshError
from jobmesh.v1 import admin_service_pb2
from tests.cluster import Cluster
from tests.faults.batch import (
    FAULT_HANDLERS,
    SETTLE,
    Batch,
    FaultRecord,
    Scale,
    attached,
    describe,
    elapsed,
    gone,
    workers_by_id,
)
from tests.faults.proxy import TcpProxy
from tests.postgres import PostgresCluster

__all__ = ["SCENARIOS", "FaultRecord", "Scale", "describe"]

# A network blip this long stays well within the scenarios' ping limit (0.3 s x 5).
BLIP_SECONDS = 0.5


def _snapshot(record: FaultRecord) -> dict[str, tuple[int, int, int]]:
    return {i: (j.state, j.attempt, len(j.attempts)) for i, j in record.jobs.items()}


def _note_moves(record: FaultRecord, victim: str) -> None:
    """Records where the jobs whose attempt on `victim` was lost ran in the end."""
    moved = [
        job
        for job in record.jobs.values()
        if any(
            a.worker_id == victim and a.error is not None and a.error.code == "WORKER_LOST"
            for a in job.attempts
        )
    ]
    record.facts["moved"] = len(moved)
    record.facts["moved_to"] = sorted({job.worker_id for job in moved})


def _note_held(batch: Batch) -> None:
    """Records how many held jobs (running across the fault) ended by their first
    attempt, having run once: carried on, not run again."""
    record = batch.record
    record.facts["held"] = len(batch.held_ids)
    record.facts["held_carried_on"] = sum(
        1
        for i in batch.held_ids
        if len(record.jobs[i].attempts) == 1 and record.runs[i] == 1 and i in record.in_flight
    )


async def _rejoin(batch: Batch, client: AsyncClient, worker_id: str) -> None:
    """After the fault is undone: the worker re-attaches, and what it reports late (results
    of superseded attempts) changes no job."""
    record = batch.record
    before = _snapshot(record)
    record.facts["rejoined"] = (
        await elapsed(time.monotonic(), client, attached(worker_id), batch.scale.timeout)
        is not None
    )
    await asyncio.sleep(SETTLE)  # for anything stale it sends to arrive
    await batch.tally(client)
    record.facts["changed_after_rejoin"] = sorted(
        i for i, state in _snapshot(record).items() if before.get(i) != state
    )


# --- worker faults ------------------------------------------------------------------------


async def worker_sigkill(cluster: Cluster, scale: Scale) -> FaultRecord:
    """SIGKILL one of two workers: its running jobs run again on the other."""
    batch = Batch(cluster, scale, "worker_sigkill")
    gw = batch.gateway()
    victim = batch.workers(gw)["w1"]
    async with AsyncClient(gw.address) as client:
        await batch.submit(client)

        async def fault() -> None:
            victim.kill()

        record = await batch.inject(client, fault, detected=gone("w1"))
        _note_moves(record, "w1")
        return record


async def worker_sigstop(cluster: Cluster, scale: Scale) -> FaultRecord:
    """SIGSTOP one of two workers: it misses its pings, is declared dead, its jobs run on
    the other; once the batch is over it is continued and re-attaches, changing nothing."""
    batch = Batch(cluster, scale, "worker_sigstop")
    gw = batch.gateway()
    victim = batch.workers(gw)["w1"]
    async with AsyncClient(gw.address) as client:
        await batch.submit(client)

        async def fault() -> None:
            victim.signal(signal.SIGSTOP)

        record = await batch.inject(client, fault, detected=gone("w1"))
        _note_moves(record, "w1")
        victim.signal(signal.SIGCONT)
        await _rejoin(batch, client, "w1")
        return record


async def worker_sigterm(cluster: Cluster, scale: Scale) -> FaultRecord:
    """SIGTERM (drain) one of two workers: it finishes what it runs and exits 0."""
    batch = Batch(cluster, scale, "worker_sigterm")
    gw = batch.gateway()
    victim = batch.workers(gw)["w1"]
    async with AsyncClient(gw.address) as client:
        await batch.submit(client)

        async def fault() -> None:
            victim.signal(signal.SIGTERM)

        async def draining_or_gone(c: AsyncClient) -> bool:
            w = (await workers_by_id(c)).get("w1")
            return w is None or w.state == admin_service_pb2.WORKER_STATE_DRAINING

        record = await batch.inject(client, fault, detected=draining_or_gone)
        record.facts["exit_code"] = await asyncio.to_thread(victim.wait, scale.timeout)
        return record


# --- network faults -----------------------------------------------------------------------


async def connection_cut(cluster: Cluster, scale: Scale) -> FaultRecord:
    """Reset the TCP connection of a worker that dials through a proxy: it reconnects,
    re-attaches with its running attempts, and they carry on without running twice."""
    return await _reconnect(cluster, scale, "connection_cut", blip=0.0)


async def connection_blip(cluster: Cluster, scale: Scale) -> FaultRecord:
    """A short network blip: a worker's bytes are dropped for a moment (well within the
    gateway's ping limit), then its connection is reset. It reconnects and re-attaches;
    what it sent during the blip, results included, must not be lost."""
    return await _reconnect(cluster, scale, "connection_blip", blip=BLIP_SECONDS)


async def _reconnect(cluster: Cluster, scale: Scale, name: str, *, blip: float) -> FaultRecord:
    batch = Batch(cluster, scale, name)
    gw = batch.gateway()
    with TcpProxy(gw.address) as proxy:
        # Only w1 serves `hold`: its held job is surely running across the fault.
        batch.workers(gw, w1=("--gateway", proxy.address, "--handlers", FAULT_HANDLERS))
        async with AsyncClient(gw.address) as client:
            await batch.start_held(client, 1)
            await batch.submit(client)
            session = (await workers_by_id(client))["w1"].session_id

            async def fault() -> None:
                if blip:
                    proxy.blackhole()
                    await asyncio.sleep(blip)
                    proxy.restore()
                else:
                    proxy.cut()

            async def reattached(c: AsyncClient) -> bool:
                w = (await workers_by_id(c)).get("w1")
                return w is not None and w.session_id != session

            record = await batch.inject(client, fault, detected=reattached)
            record.facts["connections"] = proxy.connections
            _note_held(batch)
            return record


async def connection_blackhole(cluster: Cluster, scale: Scale) -> FaultRecord:
    """Drop every byte between a worker and the gateway, keeping the connection open: the
    gateway declares the worker dead by its missed pings and retries its jobs elsewhere;
    once the batch is over the network heals and the worker re-attaches, changing nothing."""
    batch = Batch(cluster, scale, "connection_blackhole")
    gw = batch.gateway()
    with TcpProxy(gw.address) as proxy:
        batch.workers(gw, w1=("--gateway", proxy.address))
        async with AsyncClient(gw.address) as client:
            await batch.submit(client)

            async def fault() -> None:
                proxy.blackhole()

            record = await batch.inject(client, fault, detected=gone("w1"))
            _note_moves(record, "w1")
            proxy.restore()
            await _rejoin(batch, client, "w1")
            return record


# --- gateway faults -----------------------------------------------------------------------


async def _gateway_restart(
    cluster: Cluster, scale: Scale, name: str, sig: int, *, grace: float
) -> FaultRecord:
    batch = Batch(cluster, scale, name)
    gw = batch.gateway(reattach_grace=grace)
    flags = ("--handlers", FAULT_HANDLERS)
    batch.workers(gw, w1=flags, w2=flags)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(AsyncClient(gw.address))
        # Held jobs, running throughout the outage, show the re-attach at work.
        await batch.start_held(client, 2)
        await batch.submit(client)

        async def fault() -> None:
            gw.signal(sig)

        async def restart() -> AsyncClient:
            batch.record.facts["gateway_exit_code"] = await asyncio.to_thread(gw.wait, 30.0)
            new = await asyncio.to_thread(batch.gateway, port=gw.port, reattach_grace=grace)
            return await stack.enter_async_context(AsyncClient(new.address))

        record = await batch.inject(
            client, fault, detected=attached("w1", "w2"), gateway_survives=False, then=restart
        )
        _note_held(batch)
        return record


async def gateway_sigkill(cluster: Cluster, scale: Scale) -> FaultRecord:
    """SIGKILL the gateway mid-batch and restart it on the same database and port: the
    workers re-attach; a job whose result died with the gateway runs again."""
    return await _gateway_restart(cluster, scale, "gateway_sigkill", signal.SIGKILL, grace=8.0)


async def gateway_sigterm(cluster: Cluster, scale: Scale) -> FaultRecord:
    """SIGTERM the gateway mid-batch (graceful) and restart it on the same database and
    port: the workers re-attach with their attempts and nothing runs twice."""
    return await _gateway_restart(cluster, scale, "gateway_sigterm", signal.SIGTERM, grace=10.0)


# --- the database --------------------------------------------------------------------------


async def postgres_outage(
    cluster: Cluster, scale: Scale, server: PostgresCluster, outage: float = 10.0
) -> FaultRecord:
    """Stop the gateway's PostgreSQL mid-batch for `outage` seconds, then start it again:
    calls that need it fail UNAVAILABLE meanwhile, the workers run on, and the gateway
    writes what happened once the server is back."""
    batch = Batch(cluster, scale, "postgres_outage")
    gw = batch.gateway()
    batch.workers(gw)
    async with AsyncClient(gw.address) as client:
        await batch.submit(client)
        answers: list[str] = []

        async def fault() -> None:
            stopped = time.monotonic()
            await asyncio.to_thread(server.stop)
            calls = (
                lambda: client.submit("count", params={"log": str(batch.side_channel)}),
                lambda: client.get(batch.ids[-1]),
            )
            for call in calls:
                try:
                    await call()
                    answers.append("OK")
                except JobmeshError as e:
                    answers.append(e.code.name)
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - stopped)))
            await asyncio.to_thread(server.start)

        record = await batch.inject(client, fault, detected=attached("w1", "w2"))
        record.facts["calls_during_outage"] = answers
        return record


SCENARIOS: dict[str, Callable[[Cluster, Scale], Awaitable[FaultRecord]]] = {
    "worker_sigkill": worker_sigkill,
    "worker_sigstop": worker_sigstop,
    "worker_sigterm": worker_sigterm,
    "connection_cut": connection_cut,
    "connection_blip": connection_blip,
    "connection_blackhole": connection_blackhole,
    "gateway_sigkill": gateway_sigkill,
    "gateway_sigterm": gateway_sigterm,
}
