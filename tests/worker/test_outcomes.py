"""What a handler's return or exception turns into, and the built-in kinds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from jobmesh.params import MAX_SAFE_INTEGER
from jobmesh.v1 import job_pb2
from jobmesh.worker import HandlerError, JobContext, Result
from worker_service.executor import Executor
from worker_service.handlers import builtin
from worker_service.outcomes import Outcome, run_async, run_sync
from worker_service.registry import load_handlers
from worker_service.task import Task


def ctx(params: dict[str, Any] | None = None, **kw: Any) -> JobContext:
    return JobContext(job_id="j", attempt=1, kind="k", params=params, **kw)


def result(outcome: Outcome) -> job_pb2.JobResult:
    assert isinstance(outcome, job_pb2.JobResult), outcome
    return outcome


def error(outcome: Outcome) -> job_pb2.JobError:
    assert isinstance(outcome, job_pb2.JobError), outcome
    return outcome


def metadata(outcome: Outcome) -> Any:
    return json.loads(result(outcome).metadata_json)


def test_result_dict_and_none_are_results() -> None:
    r = result(run_sync(lambda c: Result({"a": b"1"}, {"n": 2, "s": ["x"]}), ctx()))
    assert dict(r.outputs) == {"a": b"1"}
    assert r.metadata_json == '{"n":2,"s":["x"]}'  # JSON text, the integer exact
    assert metadata(run_sync(lambda c: {"k": True}, ctx())) == {"k": True}
    assert result(run_sync(lambda c: None, ctx())) == job_pb2.JobResult()


def test_metadata_keeps_the_largest_exact_integers_and_text_as_it_is() -> None:
    value = {"max": MAX_SAFE_INTEGER, "min": -MAX_SAFE_INTEGER, "text": "naïve ☃", "x": 0.1}
    assert metadata(run_sync(lambda c: value, ctx())) == value


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
    ("value", "message"),
    [
        (42, "handler returned int"),
        (Result(outputs={"a": "text"}), "output 'a' is str"),  # type: ignore[dict-item]
        (Result(metadata={"b": b"bytes"}), "metadata: not JSON"),
        ({"n": float("nan")}, "metadata: not JSON"),
        ({"s": {1, 2}}, "metadata: not JSON"),
        ({"big": MAX_SAFE_INTEGER + 1}, "metadata.big: the integer 9007199254740992 is beyond"),
        ({"deep": [[-(2**64)]]}, "metadata.deep[0][0]: the integer"),
        (Result(metadata=[1, 2]), "metadata: must be a mapping"),  # type: ignore[arg-type]
        ({"bad": "\ud800"}, "the result cannot be encoded"),
    ],
)
def test_malformed_results_fail_without_retry(value: object, message: str) -> None:
    e = error(run_sync(lambda c: value, ctx()))
    assert (e.code, e.retryable) == ("INVALID_RESULT", False)
    assert e.message.startswith(message), e.message


def test_echo_returns_inputs_and_params() -> None:
    c = JobContext(job_id="j", attempt=1, kind="echo", params={"p": 1}, inputs={"in": b"x"})
    r = result(asyncio.run(run_async(builtin.echo, c)))
    assert dict(r.outputs) == {"in": b"x"}
    assert r.metadata_json == '{"p":1}'


def test_sleep_reports_every_tenth_and_returns_what_it_slept() -> None:
    reports: list[tuple[float, str]] = []
    r = result(
        run_sync(builtin.sleep, ctx({"seconds": 0.05}, report=lambda f, m: reports.append((f, m))))
    )
    assert [f for f, _ in reports] == pytest.approx([i / 10 for i in range(1, 11)])
    assert reports[-1][1] == "slept 0.05 of 0.05 s"
    assert metadata(r) == {"slept": 0.05}


@pytest.mark.parametrize("seconds", [-1, 3601, "1", True])
async def test_the_worker_refuses_bad_seconds_before_sleep_runs(seconds: object) -> None:
    executor = Executor(load_handlers(), None, threads=1)  # sleep runs in no process here
    task = Task(job_id="j", attempt=1, kind="sleep", params_json=json.dumps({"seconds": seconds}))
    try:
        e = error(await executor.run(task, lambda f, m: None))
    finally:
        executor.close()
    assert (e.code, e.retryable) == ("INVALID_PARAMS", False)
    assert e.message.startswith("params.seconds: must be")


def test_sleep_stops_when_cancelled() -> None:
    e = error(run_sync(builtin.sleep, ctx({"seconds": 30}, is_cancelled=lambda: True)))
    assert (e.code, e.retryable) == ("CANCELLED", False)


def test_fail_fails_as_asked() -> None:
    assert error(run_sync(builtin.fail, ctx())) == job_pb2.JobError(
        code="FAILED_ON_PURPOSE", message="failed on purpose", retryable=False
    )
    e = error(run_sync(builtin.fail, ctx({"message": "again", "retryable": True})))
    assert (e.message, e.retryable) == ("again", True)
