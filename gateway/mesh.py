"""Several gateways on one PostgreSQL database, all active.

Each gateway joins the database's table of gateways under a name of its own and beats every
`lease / 3` seconds; the jobs it claimed are its own while it beats. A gateway that has not
beaten for `lease` seconds is marked dead by any other (`take_over`): its queued jobs go back
to the queue at once; its running attempts go to the gateway their worker re-attaches to
(`Scheduler.attach` claims them), or, if no worker brings them back within the re-attach
grace, any gateway claims and retries them. A gateway marked dead can commit nothing more
(its store fences every write by its membership): it stops, and is restarted as a new
member.

Gateways tell each other over LISTEN/NOTIFY what a poll would otherwise find late: a queue
with jobs to claim (the gateway with a worker for it claims at once), a job with new events
(a Watch on another gateway replays them), a cancel (the gateway running the job stops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from gateway.store import Unfinished
from gateway.store.pg_writer import CANCEL_CHANNEL, EVENTS_CHANNEL, QUEUED_CHANNEL, Fenced
from gateway.watchers import EventHub
from jobmesh.v1 import admin_service_pb2

log = logging.getLogger(__name__)

ORPHANS_PER_SWEEP = 500


class SharedStore(Protocol):
    """What a store several gateways share offers them (`PostgresStore`)."""

    async def join(self, owner: str, on_fenced: Callable[[Fenced], None]) -> None: ...

    async def heartbeat(self, workers: bytes) -> bool: ...

    async def take_over(self, silent_for: float) -> tuple[list[str], list[tuple[str, str]]]: ...

    async def leave(self) -> None: ...

    async def claim_running(self, job_id: str, attempt: int) -> Unfinished | None: ...

    async def claim_orphaned(self, dead_before: float, limit: int) -> list[Unfinished]: ...

    async def mesh_workers(self) -> list[tuple[str, bytes]]: ...

    async def total_queued(self) -> int: ...

    async def ask_cancel(self, job_id: str, reason: str, by: str) -> None: ...

    async def listen(self, on_notice: Callable[[str, str, str], None]) -> None: ...


class MeshHost(Protocol):
    """What the mesh asks of the scheduler."""

    def queues_filled(self, queues: list[tuple[str, str]]) -> None:
        """Another gateway put jobs in these queues (kind, tenant)."""
        ...

    def cancel_asked(self, job_id: str, reason: str, by: str) -> None:
        """Another gateway asked to cancel a job, which this one may be running."""
        ...

    def orphaned(self, items: list[Unfinished]) -> None:
        """Running attempts of dead gateways that no worker brought back: to retry."""
        ...

    def workers(self) -> admin_service_pb2.ListWorkersResponse: ...

    def dispatch(self) -> None: ...

    async def learn(self, elsewhere: list[admin_service_pb2.Worker]) -> None:
        """What the other gateways' workers serve, and the params schemas they declared."""
        ...


class Mesh:
    def __init__(
        self,
        store: SharedStore,
        name: str,
        host: MeshHost,
        hub: EventHub,
        *,
        lease: float,
        reattach_grace: float,
    ) -> None:
        self.name = name
        self.store = store
        """The store, as the gateways sharing it use it."""
        self._host = host
        self._hub = hub
        self._lease = lease
        self._grace = reattach_grace
        self._beat: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
        """Set once this gateway is no longer a member: its work is the others' now."""
        self.reason = ""
        self._last_beat = time.monotonic()

    async def start(self) -> None:
        await self.store.join(self.name, self._fenced)
        await self.store.listen(self._notice)
        self._beat = asyncio.create_task(self._beating(), name="jobmesh-mesh")
        log.info("gateway %s joined the gateways sharing the database", self.name)

    async def stop(self) -> None:
        """Stops beating and leaves: what this gateway ran is free at once for the gateways
        its workers re-attach to."""
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
            if not self.lost.is_set():
                try:
                    await self.store.leave()
                except Exception:
                    log.warning("gateway %s could not leave the database's gateways", self.name)

    @property
    def current(self) -> bool:
        """Whether the last heartbeat is recent enough that this gateway's leases hold:
        one cut off from the database stops dispatching before others take its work."""
        return not self.lost.is_set() and time.monotonic() - self._last_beat < self._lease * 2 / 3

    async def workers(self) -> list[admin_service_pb2.Worker]:
        """The workers of every other live gateway, each with its gateway's name."""
        found = []
        for gateway, data in await self.store.mesh_workers():
            for worker in admin_service_pb2.ListWorkersResponse.FromString(data).workers:
                worker.gateway = gateway
                found.append(worker)
        return found

    async def take_over_now(self) -> None:
        """Marks dead the gateways silent for longer than the lease, at once, after a pause
        of a fraction of the lease (a worker re-attaching waits for its old gateway)."""
        await asyncio.sleep(self._lease / 6)
        await self._take_over()

    async def _take_over(self) -> None:
        dead, queues = await self.store.take_over(self._lease)
        if dead:
            log.warning("took over from gateways %s (silent %gs)", dead, self._lease)
        if queues:
            self._host.queues_filled(queues)

    def _fenced(self, error: Fenced) -> None:
        self._lose(str(error))

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            log.error("%s; this gateway stops", reason)
            self.reason = reason
            self.lost.set()

    async def _beating(self) -> None:
        interval = self._lease / 3
        while True:
            try:
                workers = self._host.workers()
                for worker in workers.workers:
                    worker.gateway = self.name
                if not await self.store.heartbeat(workers.SerializeToString()):
                    self._lose(f"gateway {self.name} was taken over by the others")
                    return
                was_current = self.current
                self._last_beat = time.monotonic()
                if not was_current:
                    self._host.dispatch()  # it held back while its leases were in doubt
                await self._take_over()
                await self._host.learn(await self.workers())
                orphans = await self.store.claim_orphaned(
                    time.time() - self._grace, ORPHANS_PER_SWEEP
                )
                if orphans:
                    self._host.orphaned(orphans)
            except Fenced as e:
                self._lose(str(e))
                return
            except Exception:
                log.warning("gateway %s could not beat", self.name, exc_info=True)
            await asyncio.sleep(interval)

    def _notice(self, channel: str, sender: str, body: str) -> None:
        if channel == QUEUED_CHANNEL:
            queues = [tuple(line.split("\t", 1)) for line in body.splitlines() if "\t" in line]
            self._host.queues_filled([(q[0], q[1]) for q in queues])
        elif channel == EVENTS_CHANNEL:
            for job_id in body.split(","):
                self._hub.poke(job_id)
        elif channel == CANCEL_CHANNEL:
            job_id, _, rest = body.partition("\t")
            reason, _, by = rest.partition("\t")
            self._host.cancel_asked(job_id, reason, by)
