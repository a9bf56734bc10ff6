"""Log set-up shared by the gateway and the worker: text lines, or one JSON object per line.

A record names its job with `extra=job_fields(...)`, or inherits the job of the code it
runs in (`job_context`, kept in a contextvar, so every line an attempt's task logs carries
it). JSON lines then hold `job_id`, `attempt` and `trace_id`; a record logged inside an
OpenTelemetry span gets that span's trace id when it names none.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOB_FIELDS = ("job_id", "attempt", "trace_id")

_job: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "jobmesh_job", default=None
)
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def check_format(fmt: str) -> None:
    """ValueError unless `fmt` is a log format this module writes."""
    if fmt not in FORMATS:
        raise ValueError(f"log_format must be {' or '.join(FORMATS)}, got {fmt!r}")


def trace_id_of(trace_context: Mapping[str, str]) -> str:
    """The trace id in a W3C `traceparent` (version-traceid-spanid-flags), or ''."""
    parts = trace_context.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def job_fields(
    job_id: str, attempt: int = 0, trace_context: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`extra=` for a log record about one job (attempt 0: not about one attempt)."""
    fields: dict[str, Any] = {"job_id": job_id}
    if attempt:
        fields["attempt"] = attempt
    if trace_id := trace_id_of(trace_context or {}):
        fields["trace_id"] = trace_id
    return fields


@contextmanager
def job_context(
    job_id: str, attempt: int = 0, trace_context: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Records logged in the block (and in tasks it starts) are about this job."""
    token = _job.set(job_fields(job_id, attempt, trace_context))
    try:
        yield
    finally:
        _job.reset(token)


def bind_job(job_id: str, attempt: int = 0, trace_context: Mapping[str, str] | None = None) -> None:
    """Records logged from now on in the current asyncio task (and the tasks it starts) are
    about this job; the task's own copy of the context keeps it from leaking out."""
    _job.set(job_fields(job_id, attempt, trace_context))


class JobFilter(logging.Filter):
    """Adds the job of the current context, and the current span's trace id, to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_job.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if not hasattr(record, "trace_id"):
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                record.trace_id = format(span.trace_id, "032x")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the record's extras
    (job_id, attempt, trace_id...) and the exception, if any."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def handler(fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing `fmt` lines, with job fields added."""
    check_format(fmt)
    out = logging.StreamHandler(sys.stderr if stream is None else stream)
    out.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    out.addFilter(JobFilter())
    return out


def configure(level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Sends the process's log records at `level` and above to stderr as `fmt` lines,
    replacing the root logger's handlers."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler(fmt, stream))
    root.setLevel(level.upper())
