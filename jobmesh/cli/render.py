"""How jobs, events and workers read in a terminal (their JSON: `jobmesh.cli.jsonout`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from rich.console import Console
from rich.table import Table

from jobmesh.cli.jsonout import short_name
from jobmesh.convert import state_name
from jobmesh.v1 import admin_service_pb2, job_pb2

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# The width of a console that is not a terminal: wider than any line it prints.
UNWRAPPED = 100_000


def stdout_console() -> Console:
    return console(stderr=False)


def console(*, stderr: bool) -> Console:
    """A console on stdout or stderr; piped into a file or `grep`, it keeps lines and table
    rows whole instead of folding them at 80 columns."""
    if (sys.stderr if stderr else sys.stdout).isatty():
        return _Console(stderr=stderr, highlight=False)
    return _Console(stderr=stderr, highlight=False, width=UNWRAPPED, soft_wrap=True)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 here; `jobmesh list | head -1` is no failure: the command ends it.
        self.quiet = True
        raise BrokenPipeError


def size(n: int) -> str:
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def when(ts: timestamp_pb2.Timestamp) -> str:
    """Local time of a set timestamp, '-' for an unset one."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ago(ts: timestamp_pb2.Timestamp, now: float | None = None) -> str:
    if not ts.seconds and not ts.nanos:
        return "never"
    elapsed = (time.time() if now is None else now) - ts.ToNanoseconds() / 1e9
    return f"{duration(max(elapsed, 0.0))} ago"


def between(start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp) -> str:
    if not start.seconds or not end.seconds:
        return ""
    return duration((end.ToNanoseconds() - start.ToNanoseconds()) / 1e9)


def error(err: job_pb2.JobError) -> str:
    return f"[{err.code}] {err.message}" + (" (retryable)" if err.retryable else "")


def blobs(named: Mapping[str, bytes]) -> str:
    """'a.png (1.2 KiB), b.txt (3 B)': bytes as names and sizes, never as content."""
    return ", ".join(f"{name} ({size(len(data))})" for name, data in sorted(named.items())) or "-"


def labels(pairs: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(pairs.items()))


def event_line(event: job_pb2.JobEvent) -> str:
    """One event as a line of text: time, seq, what happened."""
    stamp = "--:--:--"
    if event.HasField("time"):
        stamp = datetime.fromtimestamp(event.time.ToNanoseconds() / 1e9).strftime("%H:%M:%S")
    if event.type == job_pb2.JOB_EVENT_TYPE_PROGRESS:
        what = f"progress {event.progress:.0%}"
    else:
        what = f"{state_name(event.state)} attempt {event.attempt}"
        if event.worker_id:
            what += f" on {event.worker_id}"
        if event.HasField("error"):
            what += f" {error(event.error)}"
        if event.result.outputs:
            what += f" outputs: {blobs(event.result.outputs)}"
    return f"{stamp} #{event.seq} {what}" + (f": {event.message}" if event.message else "")


def job_details(job: job_pb2.Job) -> Table:
    """Everything `jobmesh get` shows about a job, as label/value rows."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    progress = f"{job.progress:.0%}" + (f" {job.progress_message}" if job.progress_message else "")
    rows: list[tuple[str, str]] = [
        ("job", job.id),
        ("kind", job.spec.kind),
        ("state", f"{state_name(job.state)} (attempt {job.attempt})"),
        ("progress", progress),
        ("priority", str(job.spec.priority)),
        ("labels", labels(job.spec.labels) or "-"),
        ("worker", job.worker_id or "-"),
        ("tenant", job.tenant or "-"),
        ("submitted by", job.submitted_by or "-"),
        ("created", when(job.create_time)),
        ("updated", when(job.update_time)),
        ("ended", when(job.end_time)),
        ("took", between(job.create_time, job.end_time) or "-"),
        ("inputs", blobs(job.spec.inputs)),
        ("params", job.spec.params_json or "-"),
    ]
    if job.cancelled_by:
        rows.append(("cancelled by", job.cancelled_by))
    if job.params_schema:
        rows.append(("params schema", job.params_schema))
    if job.HasField("error"):
        rows.append(("error", error(job.error)))
    if job.HasField("result"):
        rows.append(("outputs", blobs(job.result.outputs)))
        if job.result.metadata_json:
            rows.append(("metadata", job.result.metadata_json))
    for name, value in rows:
        grid.add_row(name, value)
    if job.attempts:
        grid.add_row("attempts", attempts_table(job.attempts))
    return grid


def attempts_table(attempts: Iterable[job_pb2.Attempt]) -> Table:
    table = Table("#", "worker", "started", "took", "error", box=None, pad_edge=False)
    for a in attempts:
        table.add_row(
            str(a.number),
            a.worker_id or "-",
            when(a.start_time),
            between(a.start_time, a.end_time) or "-",
            error(a.error) if a.HasField("error") else "",
        )
    return table


def jobs_table(jobs: Iterable[job_pb2.Job]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "KIND", "STATE", "ATTEMPT", "PROGRESS", "PRIORITY", "CREATED", "LABELS"):
        table.add_column(column, no_wrap=column in ("ID", "CREATED"))
    for job in jobs:
        table.add_row(
            job.id,
            job.spec.kind,
            state_name(job.state),
            str(job.attempt),
            f"{job.progress:.0%}",
            str(job.spec.priority),
            when(job.create_time),
            labels(job.spec.labels),
        )
    return table


def workers_table(workers: Iterable[admin_service_pb2.Worker]) -> Table:
    """The workers; with a GATEWAY column when gateways share a database."""
    workers = list(workers)
    shared = any(w.gateway for w in workers)
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ("ID", "STATE", "KINDS", "SLOTS", "ACTIVE", "CPU %", "RSS", "LAST PONG")
    for column in (*columns, *(("GATEWAY",) if shared else ())):
        table.add_column(column, no_wrap=column in ("ID", "GATEWAY"))
    now = time.time()
    for w in workers:
        # Stats come with pongs; before the first one there are none.
        ponged = w.HasField("last_pong_time")
        kinds = ", ".join(
            f"{k.kind}({k.max_concurrency})" if k.max_concurrency else k.kind for k in w.kinds
        )
        table.add_row(
            w.worker_id,
            worker_state(w.state),
            kinds,
            str(w.slots),
            str(w.active_jobs),
            f"{w.stats.cpu_percent:.0f}" if ponged else "-",
            size(w.stats.rss_bytes) if ponged else "-",
            ago(w.last_pong_time, now),
            *((w.gateway,) if shared else ()),
        )
    return table


def worker_state(state: admin_service_pb2.WorkerState.ValueType) -> str:
    """'ACTIVE' for WORKER_STATE_ACTIVE, as `--json` says it; the number if unknown."""
    enum = admin_service_pb2.WorkerState
    return str(short_name(enum.DESCRIPTOR, enum.Name(state) if state in enum.values() else state))
