"""A job's params are one JSON object as text: the gateway refuses text that is not one, or
params that do not fit the schema the kind's workers declared, and says why."""

from __future__ import annotations

import pytest

from gateway import validation
from jobmesh.errors import InvalidArgument
from jobmesh.limits import DEFAULT_LIMITS
from jobmesh.params import Param, schema_proto
from jobmesh.v1 import dispatcher_pb2, job_pb2

SCHEMA = (
    Param("size", "integer", minimum=1, maximum=10000),
    Param("format", "string", choices=("JPEG", "PNG")),
    Param("scale", "number", required=True),
    Param("strip", "boolean"),
    Param("layers", "list"),
    Param("crop", "object"),
)


def check(params_json: str, schema: tuple[Param, ...] | None = SCHEMA) -> None:
    spec = job_pb2.JobSpec(kind="image.x", params_json=params_json)
    validation.spec(spec, DEFAULT_LIMITS, "spec", schema)


def test_params_that_fit_the_schema_pass() -> None:
    check(
        '{"size": 256, "format": "png", "scale": 0.5, "strip": true, "layers": [],'
        ' "crop": {"left": 1}}'
    )


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('{"scale": 1, "colour": "red"}', "spec.params_json", "takes no param 'colour'"),
        ("{}", "spec.params_json.scale", "needs this param"),
        ('{"scale": "big"}', "spec.params_json.scale", "must be a number"),
        ('{"scale": 1, "size": 2.5}', "spec.params_json.size", "must be an integer"),
        ('{"scale": 1, "size": "256"}', "spec.params_json.size", "must be an integer"),
        ('{"scale": 1, "size": 0}', "spec.params_json.size", "must be at least 1"),
        ('{"scale": 1, "size": 10001}', "spec.params_json.size", "must be at most 10000"),
        ('{"scale": 1, "format": "tiff"}', "spec.params_json.format", "must be one of: JPEG, PNG"),
        ('{"scale": 1, "strip": "yes"}', "spec.params_json.strip", "must be true or false"),
        ('{"scale": 1, "layers": {"a": 1}}', "spec.params_json.layers", "must be a list"),
        ('{"scale": 1, "crop": [1, 2]}', "spec.params_json.crop", "must be an object"),
    ],
)
def test_a_param_that_does_not_fit_is_named(text: str, field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check(text)
    assert raised.value.field == field
    assert message in raised.value.message


def test_choices_match_ignoring_case_and_integral_numbers_are_integers() -> None:
    check('{"scale": 1, "format": "png", "size": 3.0}')
    check('{"scale": 1, "format": "Jpeg"}')


def test_null_is_not_given() -> None:
    check('{"scale": 1, "size": null}')
    with pytest.raises(InvalidArgument, match="needs this param"):
        check('{"scale": null}')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"n": 9007199254740993}', r"beyond \+-\(2\^53 - 1\)"),
        ('{"n": -9007199254740993}', r"beyond \+-\(2\^53 - 1\)"),
        ('{"a": 1, "a": 2}', "the key 'a' appears twice"),
        ("[1]", "must be a JSON object, got list"),
        ('"text"', "must be a JSON object, got str"),
        ("{'a': 1}", "not JSON"),
        ('{"a": 1', "not JSON"),
        ("not json at all", "not JSON"),
        ('{"x": NaN}', "NaN is not a JSON number"),
        ('{"x": Infinity}', "Infinity is not a JSON number"),
        ('{"x": 1e999}', "too large for JSON"),
    ],
)
def test_text_that_is_not_one_exact_json_object_is_refused_whatever_the_kind(
    text: str, message: str
) -> None:
    for schema in (None, (Param("n", "integer"),)):
        with pytest.raises(InvalidArgument, match=message) as raised:
            check(text, schema)
        assert raised.value.field.startswith("spec.params_json")


def test_the_largest_exact_integers_pass() -> None:
    check('{"n": 9007199254740991, "m": -9007199254740991}', None)


def test_empty_text_is_no_params() -> None:
    check("", None)
    with pytest.raises(InvalidArgument, match="needs this param"):
        check("")


def test_params_past_the_limits_are_refused_before_they_are_parsed() -> None:
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000  # deeper than the JSON parser recurses
    with pytest.raises(InvalidArgument, match="nested deeper than 16 levels") as raised:
        check(deep, None)
    assert raised.value.field == "spec.params_json"
    large = '{"a": "' + "x" * DEFAULT_LIMITS.max_params_bytes + '"}'
    with pytest.raises(InvalidArgument, match=r"bytes; at most \d+ \(max_params_bytes\)"):
        check(large, None)


def attach_with(*params: dispatcher_pb2.ParamSpec) -> dispatcher_pb2.Attach:
    return dispatcher_pb2.Attach(
        worker_id="w",
        slots=1,
        kinds=[
            dispatcher_pb2.KindCapacity(kind="plain"),
            dispatcher_pb2.KindCapacity(
                kind="image.x", params_schema=dispatcher_pb2.ParamsSchema(params=params)
            ),
        ],
    )


def test_an_attach_gives_each_declared_schema_as_params() -> None:
    schemas = validation.attach(
        attach_with(*schema_proto(SCHEMA).params), DEFAULT_LIMITS, max_slots=4
    )
    assert schemas == {"image.x": SCHEMA}


T = dispatcher_pb2.ParamType


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            dispatcher_pb2.ParamSpec(name="n", type=T.PARAM_TYPE_INTEGER, minimum=5, maximum=1),
            "minimum is above maximum",
        ),
        (dispatcher_pb2.ParamSpec(name="n", type=T.PARAM_TYPE_UNSPECIFIED), "unknown type"),
        (
            dispatcher_pb2.ParamSpec(name="n", type=T.PARAM_TYPE_NUMBER, choices=["a"]),
            "choices are for string",
        ),
        (dispatcher_pb2.ParamSpec(name="", type=T.PARAM_TYPE_STRING), "non-empty"),
    ],
)
def test_an_attach_with_a_schema_that_makes_no_sense_is_refused(
    spec: dispatcher_pb2.ParamSpec, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        validation.attach(attach_with(spec), DEFAULT_LIMITS, max_slots=4)
    assert raised.value.field == "attach.kinds[1].params_schema"


def test_a_schema_declaring_a_param_twice_is_refused() -> None:
    twice = dispatcher_pb2.ParamSpec(name="n", type=T.PARAM_TYPE_STRING)
    with pytest.raises(InvalidArgument, match="declared twice"):
        validation.attach(attach_with(twice, twice), DEFAULT_LIMITS, max_slots=4)
