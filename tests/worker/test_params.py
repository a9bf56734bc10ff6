"""Params schemas: declaring them, checking params against them, sending them in Attach."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from jobmesh.v1 import dispatcher_pb2 as d
from jobmesh.v1 import job_pb2
from worker_service import JobContext, Param
from worker_service.executor import Executor
from worker_service.params import params_problem, schema_proto
from worker_service.registry import Registry, load_handlers
from worker_service.task import Task

HANDLERS = "tests.worker.handlers_for_tests"

SCHEMA = (
    Param("size", "integer", required=True, minimum=1, maximum=100),
    Param("ratio", "number", minimum=0),
    Param("fit", "string", choices=("contain", "cover")),
    Param("strip", "boolean"),
    Param("layers", "list"),
    Param("crop", "object"),
)


def plain(ctx: JobContext) -> None:
    return None


@pytest.mark.parametrize(
    "params",
    [
        {"size": 5},
        {"size": 5.0, "ratio": 0.5, "fit": "cover", "strip": False, "layers": [], "crop": {}},
        {"size": 100, "ratio": None},  # null counts as absent
    ],
)
def test_good_params_pass(params: dict[str, Any]) -> None:
    assert params_problem(SCHEMA, params) == ""


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "param 'size' is required"),
        ({"size": None}, "param 'size' is required"),
        ({"size": 5, "colour": "red"}, "unknown param 'colour'"),
        ({"size": 2.5}, "param 'size' must be a whole number"),
        ({"size": "5"}, "param 'size' must be a number"),
        ({"size": True}, "param 'size' must be a number"),
        ({"size": float("nan")}, "param 'size' must be a number"),
        ({"size": 0}, "param 'size' must be at least 1"),
        ({"size": 101}, "param 'size' must be at most 100"),
        ({"size": 5, "ratio": -1}, "param 'ratio' must be at least 0"),
        ({"size": 5, "fit": "stretch"}, "param 'fit' must be one of contain, cover"),
        ({"size": 5, "fit": 3}, "param 'fit' must be a string"),
        ({"size": 5, "strip": "yes"}, "param 'strip' must be true or false"),
        ({"size": 5, "layers": {}}, "param 'layers' must be a list"),
        ({"size": 5, "crop": [1]}, "param 'crop' must be an object"),
    ],
)
def test_bad_params_are_named(params: dict[str, Any], problem: str) -> None:
    assert params_problem(SCHEMA, params).startswith(problem)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "", "type": "string"},
        {"name": "x", "type": "float"},
        {"name": "x", "type": "integer", "choices": ("a",)},
        {"name": "x", "type": "string", "minimum": 1},
        {"name": "x", "type": "number", "minimum": 2, "maximum": 1},
        {"name": "x", "type": "number", "maximum": float("inf")},
    ],
)
def test_impossible_params_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        Param(**kwargs)


def test_a_schema_becomes_the_contract_message() -> None:
    [size, ratio, fit, *_] = schema_proto(SCHEMA).params
    assert (size.name, size.type, size.required) == ("size", d.PARAM_TYPE_INTEGER, True)
    assert (size.minimum, size.maximum) == (1, 100)
    assert ratio.HasField("minimum")
    assert not ratio.HasField("maximum")
    assert (fit.type, list(fit.choices)) == (d.PARAM_TYPE_STRING, ["contain", "cover"])


def test_the_registry_keeps_a_schema_and_tells_none_from_empty() -> None:
    registry = Registry()
    registry.handler("typed", params=SCHEMA)(plain)
    registry.handler("nothing", params=[])(plain)
    registry.handler("anything")(plain)
    specs = registry.specs()
    assert specs["typed"].params == SCHEMA
    assert specs["nothing"].params == ()
    assert specs["anything"].params is None


@pytest.mark.parametrize(
    "params",
    [[Param("a", "string"), Param("a", "number")], ["size"], "size"],
    ids=["twice", "not-a-param", "a-string"],
)
def test_a_bad_schema_fails_at_import(params: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=r"@handler\('k'\)"):
        Registry().handler("k", params=params)(plain)


def test_the_builtin_kinds_declare_their_params() -> None:
    specs = load_handlers()
    assert specs["echo"].params is None  # takes anything
    [seconds] = specs["sleep"].params or ()
    assert (seconds.name, seconds.type, seconds.minimum, seconds.maximum) == (
        "seconds",
        "number",
        0,
        3600,
    )
    assert [(p.name, p.type) for p in specs["fail"].params or ()] == [
        ("message", "string"),
        ("retryable", "boolean"),
    ]


def test_the_image_kinds_declare_every_param_they_read() -> None:
    specs = load_handlers()
    names = {kind: {p.name for p in spec.params or ()} for kind, spec in specs.items()}
    output = {"format", "quality"}
    assert names["image.thumbnail"] == {"size", "auto_orient"} | output
    assert names["image.resize"] == {"width", "height", "fit", "resample", "auto_orient"} | output
    assert names["image.convert"] == {"strip_metadata"} | output
    assert names["image.transform"] == {"rotate", "flip", "crop", "auto_orient"} | output
    assert (
        names["image.composite"]
        == {
            "width",
            "height",
            "background",
            "layers",
            "auto_orient",
        }
        | output
    )
    assert names["image.info"] == set()
    assert specs["image.info"].params == ()
    formats = next(p for p in specs["image.convert"].params or () if p.name == "format")
    assert formats.required
    assert {"jpeg", "jpg", "png", "webp", "gif"} <= set(formats.choices)


@pytest.fixture
async def executor() -> AsyncIterator[Executor]:
    specs = load_handlers([HANDLERS])
    ex = Executor({"test.typed": specs["test.typed"]}, None, threads=1)
    yield ex
    ex.close()


async def test_the_worker_refuses_ill_typed_params_before_the_handler_runs(
    executor: Executor,
) -> None:
    def outcome_of(params: dict[str, Any]) -> Any:
        task = Task(job_id="j", attempt=1, kind="test.typed", params=params)
        return executor.run(task, lambda f, m: None)

    bad = await outcome_of({"n": -1.0})
    assert bad == job_pb2.JobError(
        code="INVALID_PARAMS",
        message="param 'n' must be at least 0, got -1.0",
        retryable=False,
    )
    unknown = await outcome_of({"n": 1.0, "colour": "red"})
    assert isinstance(unknown, job_pb2.JobError)
    assert unknown.message.startswith("unknown param 'colour' (this kind takes: n, tag)")
    assert isinstance(await outcome_of({"n": 3.0, "tag": "x"}), job_pb2.JobResult)
