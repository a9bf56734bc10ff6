"""What a handler's return or exception turns into, and the built-in kinds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.protobuf import json_format

from jobmesh.v1 import job_pb2
from worker_service import HandlerError, JobContext, Result
from worker_service.handlers import builtin
from worker_service.outcomes import Outcome, run_async, run_sync


def ctx(params: dict[str, Any] | None = None, **kw: Any) -> JobContext:
    return JobContext(job_id="j", attempt=1, kind="k", params=params, **kw)


def result(outcome: Outcome) -> job_pb2.JobResult:
    assert isinstance(outcome, job_pb2.JobResult), outcome
    return outcome


def error(outcome: Outcome) -> job_pb2.JobError:
    assert isinstance(outcome, job_pb2.JobError), outcome
    return outcome


def test_result_dict_and_none_are_results() -> None:
    r = result(run_sync(lambda c: Result({"a": b"1"}, {"n": 2, "s": ["x"]}), ctx()))
    assert dict(r.outputs) == {"a": b"1"}
    assert json_format.MessageToDict(r.metadata) == {"n": 2.0, "s": ["x"]}
    assert json_format.MessageToDict(result(run_sync(lambda c: {"k": True}, ctx())).metadata) == {
        "k": True
    }
    assert result(run_sync(lambda c: None, ctx())) == job_pb2.JobResult()


def test_handler_error_keeps_its_code_and_is_not_retried_by_default() -> None:
    def fn(c: JobContext) -> None:
        raise HandlerError("no such image", code="NOT_AN_IMAGE")

    assert error(run_sync(fn, ctx())) == job_pb2.JobError(
        code="NOT_AN_IMAGE", message="no such image", retryable=False
    )


def test_any_other_exception_is_a_retryable_handler_error() -> None:
    def fn(c: JobContext) -> None:
        raise KeyError("width")

    assert error(run_sync(fn, ctx())) == job_pb2.JobError(
        code="HANDLER_ERROR", message="KeyError: 'width'", retryable=True
    )


def test_async_handlers_map_the_same_way() -> None:
    async def fn(c: JobContext) -> None:
        raise HandlerError("later", code="LATER", retryable=True)

    assert error(asyncio.run(run_async(fn, ctx()))).code == "LATER"


@pytest.mark.parametrize(
    "value",
    [42, Result(outputs={"a": "text"}), Result(metadata={"b": b"bytes"})],  # type: ignore[dict-item]
)
def test_malformed_results_fail_without_retry(value: object) -> None:
    e = error(run_sync(lambda c: value, ctx()))
    assert (e.code, e.retryable) == ("INVALID_RESULT", False)


def test_echo_returns_inputs_and_params() -> None:
    c = JobContext(job_id="j", attempt=1, kind="echo", params={"p": 1.0}, inputs={"in": b"x"})
    r = result(asyncio.run(run_async(builtin.echo, c)))
    assert dict(r.outputs) == {"in": b"x"}
    assert json_format.MessageToDict(r.metadata) == {"p": 1.0}


def test_sleep_reports_every_tenth_and_returns_what_it_slept() -> None:
    reports: list[tuple[float, str]] = []
    r = result(
        run_sync(builtin.sleep, ctx({"seconds": 0.05}, report=lambda f, m: reports.append((f, m))))
    )
    assert [f for f, _ in reports] == pytest.approx([i / 10 for i in range(1, 11)])
    assert reports[-1][1] == "slept 0.05 of 0.05 s"
    assert json_format.MessageToDict(r.metadata) == {"slept": 0.05}


@pytest.mark.parametrize("seconds", [-1, 3601, "1", True])
def test_sleep_refuses_bad_seconds(seconds: object) -> None:
    e = error(run_sync(builtin.sleep, ctx({"seconds": seconds})))
    assert (e.code, e.retryable) == ("INVALID_PARAMS", False)


def test_sleep_stops_when_cancelled() -> None:
    e = error(run_sync(builtin.sleep, ctx({"seconds": 30}, is_cancelled=lambda: True)))
    assert (e.code, e.retryable) == ("CANCELLED", False)


def test_fail_fails_as_asked() -> None:
    assert error(run_sync(builtin.fail, ctx())) == job_pb2.JobError(
        code="FAILED_ON_PURPOSE", message="failed on purpose", retryable=False
    )
    e = error(run_sync(builtin.fail, ctx({"message": "again", "retryable": True})))
    assert (e.message, e.retryable) == ("again", True)
