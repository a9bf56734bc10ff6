"""One fault scenario's batch of jobs, and the record of what came of it.

A `Batch` submits `count` jobs (tests/integration/handlers.py), which append
"job_id attempt" to a side-channel file each time they start, so the file shows how often
each job really ran. A job is *in flight at the fault* when it had started by then (per
the side channel, read just after the fault) or the gateway had handed it to a worker
(ASSIGNED or RUNNING, asked just before the fault and, if the gateway is still up, just
after), and the gateway did not yet have it SUCCEEDED. Only those may run twice: a job
handed to a worker that froze may also run when it thaws, from the Assign still waiting
in its socket.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from jobmesh import AsyncClient, Job, job_spec
from jobmesh.errors import JobmeshError
from jobmesh.v1 import admin_service_pb2, job_pb2
from tests.cluster import Cluster, Gateway, Proc

S = job_pb2.JobState
HANDLERS = "tests.integration.handlers"
FAULT_HANDLERS = "tests.faults.handlers"
UNFINISHED = (S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING)
POLL = 0.05
# After a fault, how long jobs already handed to a worker may take to show up in the side
# channel (an Assign in transit, a pool process picking up its task).
SETTLE = 0.3
MAX_SUBMIT_BATCH = 1000
RETRY_FOR = 30.0


@dataclass(frozen=True)
class Scale:
    """How big a scenario is and how the gateway is tuned for it."""

    jobs: int = 300
    """Jobs in the batch."""
    seconds: float = 0.1
    """How long each job sleeps."""
    slots: int = 4
    """Slots of each of the two workers."""
    fault_at: float = 0.3
    """Fraction of the jobs started when the fault is injected."""
    ping_interval: float = 0.3
    """Gateway pings; a silent worker is declared dead after `ping_misses` of them."""
    ping_misses: int = 5
    reattach_grace: float = 2.0
    """Seconds a broken stream's attempts wait for their worker (the gateway's flag)."""
    timeout: float = 60.0
    """Longest wait for the batch to end after the fault; what is left unfinished is lost."""


@dataclass
class FaultRecord:
    """What one scenario saw: every count, plus the job ids behind the interesting ones."""

    scenario: str
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    """Accepted jobs missing from the gateway, or not ended within `Scale.timeout`."""
    duplicated: int = 0
    """Jobs that ran more than once, per the side channel."""
    in_flight_at_fault: int = 0
    detect_seconds: float | None = None
    """Fault → the gateway shows it (the worker gone, re-attached or draining; the gateway
    back with both workers); None if it never did."""
    recover_seconds: float | None = None
    """Fault → every accepted job ended; None if they did not within `Scale.timeout`."""
    states: dict[str, int] = field(default_factory=dict, repr=False)
    """Job id → its state at the end."""
    jobs: dict[str, Job] = field(default_factory=dict, repr=False)
    runs: Counter[str] = field(default_factory=Counter, repr=False)
    """Job id → executions, per the side channel."""
    in_flight: set[str] = field(default_factory=set, repr=False)
    facts: dict[str, Any] = field(default_factory=dict)
    """Scenario-specific observations, e.g. the exit code of a drained worker."""

    @property
    def duplicated_ids(self) -> set[str]:
        return {job_id for job_id, n in self.runs.items() if n > 1}

    @property
    def unexpected_duplicates(self) -> set[str]:
        """Jobs that ran twice although they were not in flight at the fault."""
        return self.duplicated_ids - self.in_flight

    @property
    def never_ran(self) -> set[str]:
        """SUCCEEDED jobs with no execution in the side channel (should be none)."""
        return {j for j, s in self.states.items() if s == S.JOB_STATE_SUCCEEDED} - set(self.runs)

    def summary(self) -> dict[str, Any]:
        """The counts and timings, as bench/faults.py prints them."""
        return {
            "scenario": self.scenario,
            "accepted": self.accepted,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "in_flight_at_fault": self.in_flight_at_fault,
            "detect_seconds": _round(self.detect_seconds),
            "recover_seconds": _round(self.recover_seconds),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


Check = Callable[[AsyncClient], Awaitable[bool]]


class Batch:
    """One scenario's batch: submits it, watches the side channel, tallies the outcome."""

    def __init__(self, cluster: Cluster, scale: Scale, name: str) -> None:
        self.cluster = cluster
        self.scale = scale
        self.record = FaultRecord(name)
        self.side_channel = cluster.tmp / f"{name}-runs.log"
        self.ids: list[str] = []
        self.held_ids: list[str] = []
        self.release_file = cluster.tmp / f"{name}-release"

    def gateway(self, *extra: str, port: int = 0, reattach_grace: float | None = None) -> Gateway:
        grace = self.scale.reattach_grace if reattach_grace is None else reattach_grace
        return self.cluster.gateway(
            "--ping-misses",
            str(self.scale.ping_misses),
            "--reattach-grace",
            str(grace),
            *extra,
            port=port,
            ping_interval=self.scale.ping_interval,
        )

    def workers(self, gw: Gateway, **extra: tuple[str, ...]) -> dict[str, Proc]:
        """Workers w1 and w2, started side by side; `extra` holds more flags by worker id."""
        procs = {
            worker_id: self.cluster.worker(
                gw,
                worker_id,
                "--handlers",
                HANDLERS,
                *extra.get(worker_id, ()),
                slots=self.scale.slots,
                wait=False,
            )
            for worker_id in ("w1", "w2")
        }
        gw.wait_for_workers(set(procs))
        return procs

    def runs(self) -> Counter[str]:
        if not self.side_channel.exists():
            return Counter()
        lines = self.side_channel.read_text().splitlines()
        return Counter(line.split()[0] for line in lines if line.strip())

    async def submit(self, client: AsyncClient) -> None:
        """Submits the batch and waits until `fault_at` of it has started."""
        params = {"log": str(self.side_channel), "seconds": self.scale.seconds}
        specs = [job_spec("count", params=params)] * self.scale.jobs
        for start in range(0, len(specs), MAX_SUBMIT_BATCH):
            submitted = await client.submit_batch(specs[start : start + MAX_SUBMIT_BATCH])
            self.ids.extend(s.job.id for s in submitted)
        self.record.accepted = len(self.ids)
        target = max(1, int(self.scale.jobs * self.scale.fault_at))
        async with asyncio.timeout(self.scale.timeout):
            while sum(self.runs().values()) < target:  # noqa: ASYNC110  # workers write it
                await asyncio.sleep(0.02)

    async def start_held(self, client: AsyncClient, n: int) -> None:
        """Submits `n` `hold` jobs and waits until they run; they run until the fault is
        detected, so they are surely running across it (see tests/faults/handlers.py)."""
        params = {"log": str(self.side_channel), "release": str(self.release_file)}
        specs = [job_spec("hold", params=params)] * n
        ids = [s.job.id for s in await client.submit_batch(specs)]
        self.ids.extend(ids)
        self.held_ids.extend(ids)
        self.record.accepted = len(self.ids)
        async with asyncio.timeout(self.scale.timeout):
            while not set(ids) <= set(self.runs()):  # noqa: ASYNC110  # workers write it
                await asyncio.sleep(0.02)

    async def succeeded(self, client: AsyncClient) -> set[str]:
        return {
            job.id async for job in client.list_all(states=[S.JOB_STATE_SUCCEEDED], page_size=1000)
        }

    async def handed_out(self, client: AsyncClient) -> set[str]:
        """Jobs assigned to or running on a worker."""
        states = [S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING]
        return {job.id async for job in client.list_all(states=states, page_size=1000)}

    async def unfinished(self, client: AsyncClient) -> bool:
        jobs, _ = await client.list(states=UNFINISHED, page_size=1)
        return bool(jobs)

    async def inject(
        self,
        client: AsyncClient,
        fault: Callable[[], Awaitable[None]],
        *,
        detected: Check,
        gateway_survives: bool = True,
        then: Callable[[], Awaitable[AsyncClient]] | None = None,
    ) -> FaultRecord:
        """Injects `fault`, measures detection and recovery, and tallies the batch.

        Held jobs are let go once the fault is detected.

        `then` runs once the side channel is read, e.g. to restart a killed gateway; the
        client it returns (on a fresh channel, not one backing off) is used from then on.
        """
        done = await self.succeeded(client)
        handed_out = await self.handed_out(client)
        t0 = time.monotonic()
        await fault()

        def watch_detection(c: AsyncClient) -> asyncio.Task[float | None]:
            return asyncio.create_task(elapsed(t0, c, detected, self.scale.timeout))

        detect = None if then else watch_detection(client)
        await asyncio.sleep(SETTLE)
        started = set(self.runs())
        if gateway_survives:
            done |= await retrying(lambda: self.succeeded(client))
            handed_out |= await retrying(lambda: self.handed_out(client))
        self.record.in_flight = (started | handed_out) - done
        if then is not None:
            client = await then()
            detect = watch_detection(client)

        async def ended(c: AsyncClient) -> bool:
            return not await self.unfinished(c)

        assert detect is not None
        self.record.detect_seconds = await detect
        self.release_file.touch()  # held jobs end once the fault is over
        self.record.recover_seconds = await elapsed(t0, client, ended, self.scale.timeout)
        await self.tally(client)
        return self.record

    async def tally(self, client: AsyncClient) -> None:
        listed = await retrying(lambda: _collect(client.list_all(page_size=1000)))
        jobs = {job.id: job for job in listed}
        r = self.record
        r.jobs = {i: jobs[i] for i in self.ids if i in jobs}
        r.states = {i: job.state for i, job in r.jobs.items()}
        r.succeeded = sum(s == S.JOB_STATE_SUCCEEDED for s in r.states.values())
        r.failed = sum(s == S.JOB_STATE_FAILED for s in r.states.values())
        r.lost = sum(1 for i in self.ids if r.states.get(i, S.JOB_STATE_QUEUED) in UNFINISHED)
        r.runs = self.runs()
        r.duplicated = len(r.duplicated_ids)
        r.in_flight_at_fault = len(r.in_flight)


async def elapsed(t0: float, client: AsyncClient, check: Check, within: float) -> float | None:
    """Seconds from `t0` until `check` holds (polled; errors count as not yet); None if it
    does not within `within` seconds of `t0`."""
    deadline = t0 + within
    while time.monotonic() < deadline:
        try:
            if await check(client):
                return time.monotonic() - t0
        except JobmeshError:
            pass  # the gateway is down or restarting
        await asyncio.sleep(POLL)
    return None


async def retrying(call: Callable[[], Awaitable[Any]]) -> Any:
    """The call's result, retried while the gateway is unreachable."""
    async with asyncio.timeout(RETRY_FOR):
        while True:
            try:
                return await call()
            except JobmeshError:
                await asyncio.sleep(POLL)


async def _collect(jobs: AsyncIterator[Job]) -> list[Job]:
    return [job async for job in jobs]


async def workers_by_id(client: AsyncClient) -> dict[str, admin_service_pb2.Worker]:
    return {w.worker_id: w for w in await client.list_workers()}


def gone(worker_id: str) -> Check:
    async def check(client: AsyncClient) -> bool:
        return worker_id not in await workers_by_id(client)

    return check


def attached(*worker_ids: str) -> Check:
    async def check(client: AsyncClient) -> bool:
        return set(worker_ids) <= set(await workers_by_id(client))

    return check


def describe(record: FaultRecord) -> str:
    """A failure message: the summary, the facts, and what each odd job went through."""
    lines = [str(record.summary()), f"facts: {record.facts}"]
    odd = record.duplicated_ids | {
        i for i, s in record.states.items() if s != S.JOB_STATE_SUCCEEDED
    }
    for job_id in sorted(odd)[:10]:
        job = record.jobs.get(job_id)
        attempts = (
            [(a.number, a.worker_id, a.error and a.error.code) for a in job.attempts]
            if job
            else "missing"
        )
        in_flight = "in flight at the fault" if job_id in record.in_flight else "NOT in flight"
        lines.append(f"{job_id}: runs={record.runs[job_id]} attempts={attempts} ({in_flight})")
    return "\n".join(lines)
