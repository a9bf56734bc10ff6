"""Params on the worker: declared with the handler, sent in Attach, decoded and typed once
before the handler runs, which then reads them as they are."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jobmesh import image_params
from jobmesh.params import MAX_SAFE_INTEGER, schema_proto
from jobmesh.v1 import dispatcher_pb2 as d
from jobmesh.v1 import job_pb2
from jobmesh.worker import JobContext, Param
from worker_service.executor import Executor
from worker_service.handlers.imaging import FORMAT_CHOICES, FORMATS
from worker_service.outcomes import Outcome
from worker_service.registry import Registry, load_handlers
from worker_service.task import Task

SCHEMA = (
    Param("size", "integer", required=True, minimum=1, maximum=100),
    Param("ratio", "number", minimum=0),
    Param("fit", "string", choices=("contain", "Cover")),
    Param("strip", "boolean"),
    Param("layers", "list"),
    Param("crop", "object"),
)


def plain(ctx: JobContext) -> None:
    return None


def seen(ctx: JobContext) -> dict[str, Any]:
    """What the handler got: each param's value and Python type."""
    return {k: [v, type(v).__name__] for k, v in ctx.params.items()}


@pytest.fixture
async def executor() -> AsyncIterator[Executor]:
    registry = Registry()
    registry.handler("typed", executor="thread", params=SCHEMA)(seen)
    registry.handler("untyped", executor="thread")(seen)
    ex = Executor(registry.specs(), None, threads=1)
    yield ex
    ex.close()


async def run(executor: Executor, kind: str, params_json: str) -> Outcome:
    task = Task(job_id="j", attempt=1, kind=kind, params_json=params_json)
    return await executor.run(task, lambda f, m: None)


async def handler_saw(executor: Executor, kind: str, params_json: str) -> dict[str, Any]:
    outcome = await run(executor, kind, params_json)
    assert isinstance(outcome, job_pb2.JobResult), outcome
    saw: dict[str, Any] = json.loads(outcome.metadata_json or "{}")
    return saw


async def test_the_handler_gets_typed_values(executor: Executor) -> None:
    text = '{"size": 5.0, "ratio": 2, "fit": "COVER", "strip": false, "layers": [], "crop": {}}'
    assert await handler_saw(executor, "typed", text) == {
        "size": [5, "int"],
        "ratio": [2.0, "float"],
        "fit": ["Cover", "str"],  # the declared spelling
        "strip": [False, "bool"],
        "layers": [[], "list"],
        "crop": [{}, "dict"],
    }


async def test_null_and_missing_params_are_absent(executor: Executor) -> None:
    assert await handler_saw(executor, "typed", '{"size": 100, "ratio": null}') == {
        "size": [100, "int"]
    }


async def test_without_a_schema_the_handler_gets_the_json_as_sent(executor: Executor) -> None:
    text = json.dumps({"n": MAX_SAFE_INTEGER, "x": 1.5, "s": "a"})
    assert await handler_saw(executor, "untyped", text) == {
        "n": [MAX_SAFE_INTEGER, "int"],  # exact, not a float
        "x": [1.5, "float"],
        "s": ["a", "str"],
    }
    assert await handler_saw(executor, "untyped", "") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "params.size: typed needs this param"),
        ('{"size": null}', "params.size: typed needs this param"),
        ('{"size": 5, "colour": "red"}', "params: typed takes no param 'colour'"),
        ('{"size": 2.5}', "params.size: must be an integer, got 2.5"),
        ('{"size": "5"}', "params.size: must be an integer"),
        ('{"size": true}', "params.size: must be an integer"),
        ('{"size": 0}', "params.size: must be at least 1"),
        ('{"size": 101}', "params.size: must be at most 100"),
        ('{"size": 5, "ratio": -1}', "params.ratio: must be at least 0"),
        ('{"size": 5, "fit": "stretch"}', "params.fit: must be one of: contain, Cover"),
        ('{"size": 5, "strip": "yes"}', "params.strip: must be true or false"),
        ('{"size": 5, "layers": {}}', "params.layers: must be a list"),
        ('{"size": 5, "crop": [1]}', "params.crop: must be an object"),
        ('{"size": 9007199254740992}', "params.size: the integer 9007199254740992 is beyond"),
        ('{"size": 5, "size": 6}', "params: the key 'size' appears twice"),
        ('{"size": NaN}', "params: NaN is not a JSON number"),
        ("[5]", "params: must be a JSON object"),
        ("{size: 5}", "params: not JSON"),
    ],
)
async def test_params_that_do_not_fit_fail_the_attempt_naming_the_param(
    executor: Executor, text: str, message: str
) -> None:
    outcome = await run(executor, "typed", text)
    assert isinstance(outcome, job_pb2.JobError), outcome
    assert (outcome.code, outcome.retryable) == ("INVALID_PARAMS", False)
    assert outcome.message.startswith(message), outcome.message


async def test_params_over_the_limits_fail_before_they_are_parsed(executor: Executor) -> None:
    deep = '{"a": ' * 20 + "1" + "}" * 20
    outcome = await run(executor, "untyped", deep)
    assert isinstance(outcome, job_pb2.JobError)
    assert outcome.code == "INVALID_PARAMS"
    assert "nested deeper than 16 levels" in outcome.message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "", "type": "string"},
        {"name": "x", "type": "float"},
        {"name": "x", "type": "integer", "choices": ("a",)},
        {"name": "x", "type": "string", "minimum": 1},
        {"name": "x", "type": "number", "minimum": 2, "maximum": 1},
        {"name": "x", "type": "number", "maximum": float("inf")},
        {"name": "x", "type": "string", "choices": ("a", "A")},
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
    assert (fit.type, list(fit.choices)) == (d.PARAM_TYPE_STRING, ["contain", "Cover"])


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


def test_the_image_kinds_declare_the_shared_params_with_the_formats_pillow_writes() -> None:
    specs = load_handlers()
    assert specs["image.info"].params == ()
    for kind, shared in image_params.KINDS.items():
        declared = specs[kind].params or ()
        assert [p.name for p in declared] == [p.name for p in shared]
        for mine, theirs in zip(declared, shared, strict=True):
            if mine.name == "format":
                assert mine.choices == FORMAT_CHOICES
                assert mine.required == theirs.required
            else:
                assert mine == theirs
    # Every format declared is one this Pillow writes, under its name or an alias.
    assert {"jpeg", "jpg", "png", "gif"} <= set(FORMAT_CHOICES)
    assert set(FORMAT_CHOICES) <= set(image_params.FORMAT_CHOICES)
    assert {c for c in FORMAT_CHOICES if c not in ("jpg", "tif")} <= set(FORMATS)
