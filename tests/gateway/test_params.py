"""A kind's params schema decides which Submits the gateway refuses, and says why."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2

from gateway import params
from jobmesh.errors import InvalidArgument
from jobmesh.v1 import dispatcher_pb2

T = dispatcher_pb2.ParamType
SCHEMA = dispatcher_pb2.ParamsSchema(
    params=[
        dispatcher_pb2.ParamSpec(name="size", type=T.PARAM_TYPE_INTEGER, minimum=1, maximum=10000),
        dispatcher_pb2.ParamSpec(name="format", type=T.PARAM_TYPE_STRING, choices=["JPEG", "PNG"]),
        dispatcher_pb2.ParamSpec(name="scale", type=T.PARAM_TYPE_NUMBER, required=True),
        dispatcher_pb2.ParamSpec(name="strip", type=T.PARAM_TYPE_BOOLEAN),
        dispatcher_pb2.ParamSpec(name="layers", type=T.PARAM_TYPE_LIST),
        dispatcher_pb2.ParamSpec(name="crop", type=T.PARAM_TYPE_OBJECT),
    ]
)


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def test_params_that_fit_the_schema_pass() -> None:
    params.check(
        "image.x",
        struct(size=256, format="png", scale=0.5, strip=True, layers=[], crop={"left": 1}),
        SCHEMA,
        "spec.params",
    )


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"scale": 1, "colour": "red"}, "spec.params.colour", "takes no param 'colour'"),
        ({}, "spec.params.scale", "needs this param"),
        ({"scale": "big"}, "spec.params.scale", "must be a number"),
        ({"scale": 1, "size": 2.5}, "spec.params.size", "must be an integer"),
        ({"scale": 1, "size": "256"}, "spec.params.size", "must be an integer"),
        ({"scale": 1, "size": 0}, "spec.params.size", "must be at least 1"),
        ({"scale": 1, "size": 10001}, "spec.params.size", "must be at most 10000"),
        ({"scale": 1, "format": "tiff"}, "spec.params.format", "must be one of: JPEG, PNG"),
        ({"scale": 1, "strip": "yes"}, "spec.params.strip", "must be true or false"),
        ({"scale": 1, "layers": {"a": 1}}, "spec.params.layers", "must be a list"),
        ({"scale": 1, "crop": [1, 2]}, "spec.params.crop", "must be an object"),
    ],
)
def test_a_param_that_does_not_fit_is_named(
    values: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        params.check("image.x", struct(**values), SCHEMA, "spec.params")
    assert raised.value.field == field
    assert message in raised.value.message


def test_null_is_not_given() -> None:
    params.check("image.x", struct(scale=1, size=None), SCHEMA, "spec.params")
    with pytest.raises(InvalidArgument, match="needs this param"):
        params.check("image.x", struct(scale=None), SCHEMA, "spec.params")
