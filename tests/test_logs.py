"""jobmesh.logs: JSON lines with the job's id, attempt and trace id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from jobmesh import logs

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    logger = logging.getLogger("tests.logs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logs.handler("json", out)
    logger.addHandler(handler)
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_record_is_one_json_object_with_its_extras(
    log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = log
    logger.info("job %s failed", "j1", extra=logs.job_fields("j1", 2, {"traceparent": TRACEPARENT}))
    logger.warning("no job here")
    first, second = lines(out)
    assert first["message"] == "job j1 failed"
    assert (first["level"], first["logger"]) == ("INFO", "tests.logs")
    assert (first["job_id"], first["attempt"], first["trace_id"]) == ("j1", 2, TRACE_ID)
    assert str(first["time"]).endswith("+00:00")
    assert set(second) == {"time", "level", "logger", "message"}


def test_exceptions_are_kept_in_the_line(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("it broke")
    [line] = lines(out)
    assert "ValueError: bad" in str(line["exception"])


async def test_a_task_bound_to_a_job_tags_its_lines_and_no_others(
    log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = log

    async def attempt() -> None:
        logs.bind_job("j7", 1)
        logger.info("running")

    await asyncio.create_task(attempt())
    logger.info("outside")
    with logs.job_context("j8"):
        logger.info("inside")
    tagged, outside, inside = lines(out)
    assert (tagged["job_id"], tagged["attempt"]) == ("j7", 1)
    assert "job_id" not in outside
    assert inside["job_id"] == "j8"
    assert "attempt" not in inside


def test_the_current_span_gives_the_trace_id(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    span = NonRecordingSpan(
        SpanContext(
            trace_id=int(TRACE_ID, 16),
            span_id=1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )
    token = context.attach(trace.set_span_in_context(span))
    try:
        logger.info("traced")
    finally:
        context.detach(token)
    [line] = lines(out)
    assert line["trace_id"] == TRACE_ID


def test_text_is_the_default_and_other_formats_are_refused() -> None:
    out = io.StringIO()
    handler = logs.handler(stream=out)
    handler.handle(logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"}))
    assert out.getvalue().endswith("INFO x: hello\n")
    with pytest.raises(ValueError, match="text or json"):
        logs.handler("xml")
    assert logs.trace_id_of({"traceparent": "garbage"}) == ""
