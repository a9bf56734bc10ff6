"""Checking a job's params against the schema its kind declared in Attach."""

from __future__ import annotations

from google.protobuf import struct_pb2

from jobmesh.errors import InvalidArgument
from jobmesh.v1 import dispatcher_pb2

T = dispatcher_pb2.ParamType

_TYPE_NAMES = {
    T.PARAM_TYPE_STRING: "a string",
    T.PARAM_TYPE_NUMBER: "a number",
    T.PARAM_TYPE_INTEGER: "an integer",
    T.PARAM_TYPE_BOOLEAN: "true or false",
    T.PARAM_TYPE_LIST: "a list",
    T.PARAM_TYPE_OBJECT: "an object",
}
_KIND_OF_VALUE = {
    T.PARAM_TYPE_STRING: "string_value",
    T.PARAM_TYPE_NUMBER: "number_value",
    T.PARAM_TYPE_INTEGER: "number_value",
    T.PARAM_TYPE_BOOLEAN: "bool_value",
    T.PARAM_TYPE_LIST: "list_value",
    T.PARAM_TYPE_OBJECT: "struct_value",
}


def check(
    kind: str, params: struct_pb2.Struct, schema: dispatcher_pb2.ParamsSchema, field: str
) -> None:
    """Raises InvalidArgument naming the first param that is unknown, missing or ill-typed."""
    specs = {p.name: p for p in schema.params}
    given = {n for n, v in params.fields.items() if v.WhichOneof("kind") != "null_value"}
    for name, value in params.fields.items():
        if name not in given:
            continue  # null means "not given", as the worker reads it
        spec = specs.get(name)
        where = f"{field}.{name}"
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            raise InvalidArgument(f"{kind} takes no param {name!r} (it takes: {known})", where)
        _check_value(spec, value, where)
    for spec in schema.params:
        if spec.required and spec.name not in given:
            raise InvalidArgument(f"{kind} needs this param", f"{field}.{spec.name}")


def _check_value(spec: dispatcher_pb2.ParamSpec, value: struct_pb2.Value, where: str) -> None:
    expected = _KIND_OF_VALUE.get(spec.type)
    if expected is None:
        return  # a type this gateway does not know: the worker checks it
    if value.WhichOneof("kind") != expected:
        raise InvalidArgument(f"must be {_TYPE_NAMES[spec.type]}", where)
    if spec.type == T.PARAM_TYPE_INTEGER and not value.number_value.is_integer():
        raise InvalidArgument("must be an integer", where)
    if spec.type in (T.PARAM_TYPE_NUMBER, T.PARAM_TYPE_INTEGER):
        number = value.number_value
        if spec.HasField("minimum") and number < spec.minimum:
            raise InvalidArgument(f"must be at least {spec.minimum:g}", where)
        if spec.HasField("maximum") and number > spec.maximum:
            raise InvalidArgument(f"must be at most {spec.maximum:g}", where)
    if spec.type == T.PARAM_TYPE_STRING and spec.choices:
        allowed = {c.lower() for c in spec.choices}
        if value.string_value.lower() not in allowed:
            raise InvalidArgument(f"must be one of: {', '.join(spec.choices)}", where)
