"""Per-tenant quotas: what the auth file allows each tenant, and the checks that refuse more.

A `Quota` comes from the auth file (`quota = {...}` on a principal, applied to its tenant).
Queued jobs and stored bytes are counted store-wide (`gateway.store.Usage`), so they hold
however many gateways share the store; submits per second is a token bucket of each
gateway (`SubmitRate`); `max_running` and `weight` are the scheduler's, on each gateway.
Over a quota is ResourceExhausted naming the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from gateway.store import Usage
from jobmesh.errors import ResourceExhausted
from jobmesh.settings_fields import parse_size


@dataclass(frozen=True)
class Quota:
    """What one tenant may use; None is unlimited."""

    max_queued: int | None = None
    """Its jobs QUEUED at once (waiting for a worker or a retry), store-wide."""
    max_stored_bytes: int | None = None
    """Bytes the store keeps for it: inline inputs of its jobs, and the blobs it owns."""
    submits_per_second: float | None = None
    """Jobs it may submit per second to one gateway (a batch counts each job)."""
    max_running: int | None = None
    """Its jobs ASSIGNED or RUNNING at once on one gateway."""
    weight: float = 1.0
    """Its share of dispatch turns against other tenants' jobs of the same priority."""


UNLIMITED = Quota()

QuotaOf = Callable[[str], Quota]
"""Tenant -> its quota (`gateway.auth.Authenticator.quota`)."""


def unlimited(tenant: str) -> Quota:
    """The quota of every tenant without an auth file."""
    return UNLIMITED


# --- the auth file's `quota = {...}` -----------------------------------------------

_WHOLE = ("max_queued", "max_running")
_RATES = ("submits_per_second", "weight")
KEYS = tuple(f.name for f in fields(Quota))


def parse(value: object) -> Quota:
    """The quota an auth file's inline table declares; ValueError saying what is wrong."""
    if not isinstance(value, dict):
        raise ValueError("must be an inline table, e.g. { max_queued = 10000, weight = 2 }")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    found: dict[str, int | float] = {}
    for key in _WHOLE:
        if key in value:
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"{key} must be a whole number of at least 1")
            found[key] = number
    for key in _RATES:
        if key in value:
            number = value[key]
            if (
                isinstance(number, bool)
                or not isinstance(number, int | float)
                or not math.isfinite(number)
                or number <= 0
            ):
                raise ValueError(f"{key} must be a number above 0")
            found[key] = float(number)
    if "max_stored_bytes" in value:
        size = value["max_stored_bytes"]
        try:
            if isinstance(size, bool) or not isinstance(size, int | str):
                raise ValueError("expected a size")
            found["max_stored_bytes"] = size if isinstance(size, int) else parse_size(size)
        except ValueError:
            raise ValueError(
                'max_stored_bytes must be a size such as "10GiB", "512M" or a byte count'
            ) from None
        if found["max_stored_bytes"] < 1:
            raise ValueError("max_stored_bytes must be at least 1 byte")
    return Quota(**found)  # type: ignore[arg-type]


def size_text(size: int) -> str:
    """A byte count as the auth file would say it: 10GiB, 512MiB, or bytes."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def _rate_text(rate: float) -> str:
    return f"{rate:g}"


# --- the checks ------------------------------------------------------------------------


def check_usage(tenant: str, quota: Quota, usage: Usage, adding: Usage) -> None:
    """ResourceExhausted if `tenant`, holding `usage`, may not add `adding` (new jobs)."""
    limit = quota.max_queued
    if limit is not None and adding.queued and usage.queued + adding.queued > limit:
        more = f" and this adds {adding.queued}" if usage.queued < limit else ""
        raise ResourceExhausted(
            f"tenant {tenant} has {usage.queued} queued jobs{more}; its quota is "
            f"max_queued = {limit}: retry once some have started"
        )
    check_bytes(tenant, quota, usage, adding.stored_bytes, "of inline inputs")


def check_bytes(tenant: str, quota: Quota, usage: Usage, adding: int, what: str) -> None:
    """ResourceExhausted if `tenant` may not store `adding` more bytes (`what` they are)."""
    limit = quota.max_stored_bytes
    if limit is None or not adding or usage.stored_bytes + adding <= limit:
        return
    raise ResourceExhausted(
        f"tenant {tenant} stores {usage.stored_bytes} bytes and this adds {adding} bytes {what}; "
        f"its quota is max_stored_bytes = {size_text(limit)}: wait for its jobs to expire, "
        "or upload less"
    )


class SubmitRate:
    """Submits per second of each tenant, on this gateway: a token bucket per tenant holding
    one second's worth (at least one job), each job of a Submit or batch taking one.

    Each gateway keeps its own buckets: N gateways behind a balancer let a tenant submit up
    to N times its rate.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """Tenant -> (tokens, when they were counted)."""

    def take(self, tenant: str, jobs: int, rate: float | None) -> None:
        """Takes `jobs` tokens of the tenant's bucket, or raises ResourceExhausted."""
        if rate is None:
            self._buckets.pop(tenant, None)
            return
        burst = max(rate, 1.0)
        now = self._clock()
        tokens, then = self._buckets.get(tenant, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if jobs > burst:
            raise ResourceExhausted(
                f"a batch of {jobs} jobs is more than tenant {tenant} may submit at once: its "
                f"quota is submits_per_second = {_rate_text(rate)}; send smaller batches"
            )
        if jobs > tokens:
            self._buckets[tenant] = (tokens, now)
            wait = (jobs - tokens) / rate
            raise ResourceExhausted(
                f"tenant {tenant} submits faster than its quota, submits_per_second = "
                f"{_rate_text(rate)}; retry in {wait:.2g} s"
            )
        self._buckets[tenant] = (tokens - jobs, now)


def quotas_of(by_tenant: Mapping[str, Quota]) -> QuotaOf:
    """A QuotaOf from a fixed table (for tests and tools); tenants not in it are unlimited."""
    return lambda tenant: by_tenant.get(tenant, UNLIMITED)
