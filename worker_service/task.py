"""One attempt of one job as the worker hands it to an executor.

Plain, picklable values only, so the same object crosses into a pool process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2

from jobmesh import params
from jobmesh.limits import DEFAULT_LIMITS, Limits
from jobmesh.params import Schema
from jobmesh.v1 import dispatcher_pb2
from worker_service.registry import JobContext

AttemptKey = tuple[str, int]


@dataclass(frozen=True)
class Task:
    job_id: str
    attempt: int
    kind: str
    tenant: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    params_json: str = ""
    """The params as the gateway sent them: one JSON object as text, '' for {}."""
    params: dict[str, Any] = field(default_factory=dict)
    """What the handler gets as `ctx.params`: `params_json` as `with_params` made it."""
    inputs: dict[str, bytes] = field(default_factory=dict)
    timeout: float | None = None
    """Seconds the attempt may run, from its assignment; None: no limit."""
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C context of the worker's span for the attempt; handler spans are its children."""

    @property
    def key(self) -> AttemptKey:
        return (self.job_id, self.attempt)

    @classmethod
    def from_assign(cls, assign: dispatcher_pb2.Assign) -> Task:
        return cls(
            job_id=assign.job_id,
            attempt=assign.attempt,
            kind=assign.kind,
            tenant=assign.tenant,
            labels=dict(assign.labels),
            params_json=assign.params_json,
            inputs=dict(assign.inputs),
            timeout=_seconds(assign.timeout) if assign.HasField("timeout") else None,
        )

    def with_params(self, schema: Schema | None, limits: Limits = DEFAULT_LIMITS) -> Task:
        """This task with `params_json` decoded into `params`, typed by the kind's `schema`
        when it declares one (`jobmesh.params.typed`); InvalidArgument naming the param
        that does not fit."""
        values = limits.json(self.params_json, "params")
        if schema is not None:
            values = params.typed(schema, values, "params", self.kind)
        return dataclasses.replace(self, params=values)

    def context(
        self, report: Callable[[float, str], None], is_cancelled: Callable[[], bool]
    ) -> JobContext:
        return JobContext(
            job_id=self.job_id,
            attempt=self.attempt,
            kind=self.kind,
            tenant=self.tenant,
            labels=self.labels,
            params=self.params,
            inputs=self.inputs,
            report=report,
            is_cancelled=is_cancelled,
            trace_context=self.trace_context,
        )


def _seconds(duration: duration_pb2.Duration) -> float | None:
    # A zero or negative Duration would fail every attempt at once; read it as "unset".
    seconds = duration.seconds + duration.nanos / 1e9
    return seconds if seconds > 0 else None
