"""The queue in the store, as one gateway holds it: a window of each queue's head.

Queued jobs live in the store. For each queue (kind, tenant) that an attached worker serves,
the gateway holds a window of its head in memory: up to `queue_window` jobs, claimed from
the store (leased to this gateway) by priority, then age, and refilled by one claimer task
when it is down to half. A new job goes straight into its window when the window holds the
whole queue with room to spare, or when it ranks ahead of the window's last job, which then
goes back to the store (`trim`). Delayed jobs (`not_before`, a retry's backoff) and the
deadlines of jobs left in the store wake the gateway at the store's next times, with one
timer each.

`Windows` keeps what is in the windows and what the store may still hold; the scheduler
(`WindowHost`) holds the jobs themselves and decides what happens to them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from gateway.metrics import GatewayMetrics
from gateway.queues import KindQueues, QueueKey
from gateway.store import ANY_TENANT, JobStore, Placement, QueueDepth, Unfinished
from gateway.store.rows import placement_of
from jobmesh.v1 import job_pb2

log = logging.getLogger(__name__)

QUEUE_AGES_INTERVAL = 5.0
"""Seconds between reads of the queues' oldest jobs for /metrics."""
DUE_BATCH = 500
"""Jobs fallen due claimed at once."""
RETRY_AFTER = 1.0
"""Seconds before a claim or a read of the store that failed is tried again."""


class WindowHost(Protocol):
    """What the windows ask of the scheduler, which holds the jobs."""

    def take_in(self, item: Unfinished) -> job_pb2.Job:
        """Holds a job just claimed from the store; returns it."""
        ...

    def holds(self, job_id: str) -> bool: ...

    def give_back(self, job_id: str, attempt: int) -> bool:
        """Forgets the job if it is held QUEUED at this attempt (it goes back to the store);
        whether it was."""
        ...

    def entered(self, job: job_pb2.Job, ready_at: float) -> None:
        """The job went into its window: its timers and its queue-wait span start."""
        ...

    def fell_due(self, job: job_pb2.Job) -> None:
        """A job claimed from the store past its deadline or schedule-to-start limit: end it."""
        ...

    def dispatch(self) -> None: ...


class Windows:
    def __init__(
        self,
        store: JobStore,
        owner: str,
        size: int,
        host: WindowHost,
        metrics: GatewayMetrics,
    ) -> None:
        """`owner`: this gateway's name on its leases; `size`: jobs per window."""
        self.queues = KindQueues()
        """The windows, which dispatch takes from."""
        self.owner = owner
        self._store = store
        self._size = size
        self._host = host
        self._metrics = metrics
        self._ready_at: dict[str, float] = {}
        """Job id -> when it was ready, of the jobs in a window."""
        self._pending: set[QueueKey] = set()
        """Queues whose ready jobs may not all be in their window: a refill may find more."""
        self._news = Counter[QueueKey]()
        """Bumped when a queue gains jobs in the store, so that a claim under way knows."""
        self._keys: set[QueueKey] = set()
        """Every queue known to hold jobs in the store (some perhaps not ready yet)."""
        self._wanted: set[QueueKey] = set()
        """Queues whose window the claimer task is to refill."""
        self._claimer: asyncio.Task[None] | None = None
        self._loading: set[QueueKey] = set()
        """The queues the claimer is claiming for now."""
        self._claiming = asyncio.Lock()
        """Held across each claim and the taking in of what it claimed: nothing else claims
        meanwhile, so no job is taken in twice."""
        self._wakes: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        """"ready" and "due" -> (time.time(), handle) of the next wake-up for the store."""
        self._serving = Counter[tuple[str, str]]()
        """(kind, tenant or ANY_TENANT) -> attached sessions serving it."""
        self._ages_read = -math.inf
        self._ages_reading: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # --- start and stop ----------------------------------------------------------

    async def recover(self) -> int:
        """Learns which queues hold jobs in the store, without reading them; how many."""
        depths = await self._store.queue_depths(time.time())
        for depth in depths:
            key = (depth.kind, depth.tenant)
            self._keys.add(key)
            self._pending.add(key)
            self._metrics.queued_in_store(depth.kind, depth.tenant, depth.queued)
        self._ages(depths)
        await self._rearm()
        return sum(depth.queued for depth in depths)

    def stop(self) -> None:
        """Stops claiming, and gives the windows back to the store for whichever gateway
        claims them next."""
        self._stopping = True
        for _, handle in self._wakes.values():
            handle.cancel()
        self._wakes.clear()
        windowed = [job_id for job_id in self._ready_at if self._host.holds(job_id)]
        if windowed:
            self._store.release(windowed)

    async def settled(self) -> None:
        """Returns once no claim or store read it started is under way (for tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- who serves which queue ----------------------------------------------------

    def serving(self, kinds: Iterable[str], tenant: str, delta: int) -> None:
        """A session serving these kinds for `tenant` attached (+1) or left (-1)."""
        for kind in kinds:
            self._serving[(kind, tenant)] += delta
        self._serving += Counter()  # drops what is down to 0

    def served(self, key: QueueKey) -> bool:
        """Whether some attached worker serves the queue: only such queues get a window."""
        kind, tenant = key
        return bool(self._serving[(kind, tenant)] or self._serving[(kind, ANY_TENANT)])

    # --- jobs in and out ---------------------------------------------------------

    def place(
        self, job: job_pb2.Job, at: float, room: Counter[QueueKey], delay: float = 0.0
    ) -> Placement:
        """Where a job (re)entering its queue at `at` goes: into the queue's window (leased
        to this gateway) when it is ready and the window holds the whole queue with room
        to spare, or when it ranks ahead of the window's last job (which `trim` then gives
        back); else into the store only. `room` counts what a batch already put in each
        window."""
        placement = placement_of(job, at, delay)
        key = (job.spec.kind, job.tenant)
        if placement.ready_at > at or not self.served(key):
            return placement
        if key not in self._pending and self.queues.size(key) + room[key] < self._size:
            room[key] += 1
            return Placement(placement.ready_at, placement.due_at, self.owner)
        worst = self.queues.worst(key)
        if worst is not None and -worst[0] < job.spec.priority:
            room[key] += 1
            return Placement(placement.ready_at, placement.due_at, self.owner)
        return placement

    def enter(self, job: job_pb2.Job, ready_at: float) -> None:
        """Puts a job the scheduler holds (QUEUED, leased to this gateway) in its window."""
        self._ready_at[job.id] = ready_at
        key = (job.spec.kind, job.tenant)
        self.queues.push(key, job.spec.priority, ready_at, job.id, job.attempt)
        self._host.entered(job, ready_at)

    def left_in_store(self, job: job_pb2.Job, placement: Placement) -> None:
        """Notes a job QUEUED in the store only: its queue has more for a refill to claim,
        or a wake-up is due when it becomes ready or falls due."""
        key = (job.spec.kind, job.tenant)
        self._keys.add(key)
        if placement.ready_at <= time.time():
            self._news[key] += 1
            self._pending.add(key)
        else:
            self._wake("ready", placement.ready_at)
        if placement.due_at is not None:
            self._wake("due", placement.due_at)

    def filled(self, key: QueueKey) -> None:
        """Another gateway put jobs in the queue: a refill may find them."""
        self._keys.add(key)
        self._news[key] += 1
        self._pending.add(key)

    def taken(self, job_id: str) -> float | None:
        """The job left its window (assigned, ended, back to the store): when it was ready."""
        return self._ready_at.pop(job_id, None)

    def trim(self, key: QueueKey) -> None:
        """Gives back to the store the last jobs of a window grown past its size."""
        released = []
        while self.queues.size(key) > self._size:
            worst = self.queues.worst(key)
            assert worst is not None
            self.queues.remove(key, worst)
            job_id, attempt = worst[3], worst[4]
            if self._host.give_back(job_id, attempt):
                self._ready_at.pop(job_id, None)
                released.append(job_id)
        if released:
            self._store.release(released)
            self._news[key] += 1
            self._pending.add(key)

    # --- refills ------------------------------------------------------------------

    def refill_low(self) -> None:
        """Has every served queue with more in the store refilled once its window is down to
        half."""
        for key in self._pending:
            self.refill_if_low(key)

    def refill_if_low(self, key: QueueKey) -> None:
        if key in self._pending and self.queues.size(key) <= self._size // 2 and self.served(key):
            self._refill(key)

    def _refill(self, key: QueueKey) -> None:
        """One claimer task claims for every queue that asked meanwhile, then dispatches."""
        if self._stopping:
            return
        self._wanted.add(key)
        if self._claimer is None or self._claimer.done():
            self._claimer = self._spawn(self._claim_wanted())

    async def _claim_wanted(self) -> None:
        while self._wanted and not self._stopping:
            keys = sorted(self._wanted)
            self._wanted.clear()
            self._loading = set(keys)
            try:
                async with self._claiming:
                    for key in keys:
                        await self._claim(key)
            finally:
                self._loading = set()
            self._host.dispatch()

    @property
    def heads_unknown(self) -> bool:
        """Whether a queue being claimed has nothing in its window yet: dispatch waits for
        it, since its head may come before every other (priority, the tenants' turns)."""
        return any(self.queues.size(key) == 0 for key in self._loading | self._wanted)

    async def _claim(self, key: QueueKey) -> None:
        want = self._size - self.queues.size(key)
        if want <= 0 or self._stopping:
            return
        news = self._news[key]
        try:
            claimed = await self._store.claim(self.owner, *key, want, time.time(), math.inf)
        except Exception:
            log.exception("could not claim queued %s jobs of tenant %s; trying again", *key)
            asyncio.get_running_loop().call_later(RETRY_AFTER, self._host.dispatch)
            return
        if self._stopping:
            self._store.release([item.job.id for item in claimed])
            return
        for item in claimed:
            if not self._host.holds(item.job.id):
                self.enter(self._host.take_in(item), item.ready_at)
        if len(claimed) < want and self._news[key] == news:
            self._pending.discard(key)

    async def claim_job(self, tenant: str, job_id: str) -> job_pb2.Job | None:
        """Claims one job QUEUED in the store (to cancel it), unless the scheduler holds it
        already; None if it is not queued there."""
        async with self._claiming:
            if self._host.holds(job_id):
                return None
            item = await self._store.claim_job(self.owner, tenant, job_id, math.inf)
            return None if item is None else self._host.take_in(item)

    # --- wake-ups for jobs in the store ---------------------------------------------

    def _wake(self, what: str, at: float) -> None:
        """Looks at the store again at `at` (time.time()) for jobs that become ready
        ("ready") or fall due ("due"), unless an earlier wake-up is set."""
        if self._stopping:
            return
        current = self._wakes.get(what)
        if current is not None:
            if current[0] <= at:
                return
            current[1].cancel()
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, at - time.time()), self._woken, what)
        self._wakes[what] = (at, handle)

    def _woken(self, what: str) -> None:
        self._wakes.pop(what, None)
        if what == "ready":
            for key in self._keys:
                self._news[key] += 1
                self._pending.add(key)
            self._spawn(self._rearm())
        else:
            self._spawn(self._fail_due())
        self._host.dispatch()

    async def _rearm(self) -> None:
        """Sets the wake-ups from the store's next times."""
        try:
            ready, due = await self._store.next_times(time.time())
        except Exception:
            log.exception("could not read when queued jobs fall due; trying again")
            self._wake("ready", time.time() + RETRY_AFTER)
            return
        if ready is not None:
            self._wake("ready", ready)
        if due is not None:
            self._wake("due", due)

    async def _fail_due(self) -> None:
        """Has the jobs of the store that outlived their deadline or schedule-to-start
        limit while queued ended."""
        try:
            while not self._stopping:
                async with self._claiming:
                    claimed = await self._store.claim_due(
                        self.owner, time.time(), DUE_BATCH, math.inf
                    )
                    for item in claimed:
                        self._host.fell_due(self._host.take_in(item))
                if len(claimed) < DUE_BATCH:
                    break
        except Exception:
            log.exception("could not fail queued jobs that fell due; trying again")
            self._wake("due", time.time() + RETRY_AFTER)
            return
        await self._rearm()

    # --- the queues' ages --------------------------------------------------------------

    async def refresh_ages(self, older_than: float = 0.0) -> None:
        """Reads each queue's oldest ready job from the store into the metrics, unless that
        was read less than `older_than` seconds ago; callers at once share one read."""
        if time.monotonic() - self._ages_read < older_than:
            return
        if self._ages_reading is None or self._ages_reading.done():
            self._ages_reading = asyncio.ensure_future(self._read_ages())
        await asyncio.shield(self._ages_reading)

    async def _read_ages(self) -> None:
        self._ages(await self._store.queue_depths(time.time()))

    def _ages(self, depths: list[QueueDepth]) -> None:
        self._metrics.queue_ages((d.kind, d.tenant, d.oldest_ready_at) for d in depths)
        self._ages_read = time.monotonic()

    async def watch_ages(self, interval: float = QUEUE_AGES_INTERVAL) -> None:
        """Keeps the queue-age metrics fresh, every `interval` seconds, until cancelled."""
        while True:
            try:
                await self.refresh_ages(interval / 2)
            except Exception:
                log.warning("could not read the queues' ages", exc_info=True)
            await asyncio.sleep(interval)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
