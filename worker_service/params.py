"""Params schemas: what a kind's params look like, declared with `@handler(params=[...])`.

The worker sends each kind's schema in Attach so the gateway refuses a job with an unknown
or ill-typed param at Submit; the worker checks the same rules again before a handler runs.
A null value counts as absent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jobmesh.v1 import dispatcher_pb2

ParamType = Literal["string", "number", "integer", "boolean", "list", "object"]
PARAM_TYPES: tuple[ParamType, ...] = ("string", "number", "integer", "boolean", "list", "object")

_PROTO_TYPES: dict[ParamType, dispatcher_pb2.ParamType.ValueType] = {
    "string": dispatcher_pb2.PARAM_TYPE_STRING,
    "number": dispatcher_pb2.PARAM_TYPE_NUMBER,
    "integer": dispatcher_pb2.PARAM_TYPE_INTEGER,
    "boolean": dispatcher_pb2.PARAM_TYPE_BOOLEAN,
    "list": dispatcher_pb2.PARAM_TYPE_LIST,
    "object": dispatcher_pb2.PARAM_TYPE_OBJECT,
}


@dataclass(frozen=True)
class Param:
    """One param a kind takes."""

    name: str
    """The key in the job's params."""
    type: ParamType
    """string, number, integer (a number without a fraction), boolean, list or object."""
    required: bool = False
    """A job without it is refused."""
    choices: tuple[str, ...] = ()
    """For strings: the allowed values, if only some are."""
    minimum: float | None = None
    """For numbers and integers: the smallest allowed value."""
    maximum: float | None = None
    """For numbers and integers: the largest allowed value."""
    description: str = ""
    """One line for people (shown by tools that list kinds)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a param's name must be a non-empty string")
        if self.type not in PARAM_TYPES:
            raise ValueError(
                f"param {self.name!r}: type must be one of {', '.join(PARAM_TYPES)}, "
                f"got {self.type!r}"
            )
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.choices and (
            self.type != "string" or not all(isinstance(c, str) for c in self.choices)
        ):
            raise ValueError(f"param {self.name!r}: choices are for string params only")
        numeric = self.type in ("number", "integer")
        for bound in (self.minimum, self.maximum):
            if bound is not None and (not numeric or not math.isfinite(bound)):
                raise ValueError(
                    f"param {self.name!r}: minimum and maximum are finite bounds "
                    "of number and integer params"
                )
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"param {self.name!r}: minimum is above maximum")

    def problem(self, value: Any) -> str:
        """What is wrong with `value` for this param; empty if nothing."""
        if self.type == "string":
            if not isinstance(value, str):
                return "must be a string"
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}"
            return ""
        if self.type == "boolean":
            return "" if isinstance(value, bool) else "must be true or false"
        if self.type == "list":
            return "" if isinstance(value, list | tuple) else "must be a list"
        if self.type == "object":
            return "" if isinstance(value, Mapping) else "must be an object"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return "must be a number"
        if self.type == "integer" and value != int(value):
            return "must be a whole number"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum:g}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}"
        return ""

    def to_proto(self) -> dispatcher_pb2.ParamSpec:
        return dispatcher_pb2.ParamSpec(
            name=self.name,
            type=_PROTO_TYPES[self.type],
            required=self.required,
            choices=self.choices,
            minimum=self.minimum,
            maximum=self.maximum,
            description=self.description,
        )


def check_schema(params: Iterable[Param]) -> tuple[Param, ...]:
    """The params as a tuple; ValueError if one is not a Param or a name repeats."""
    schema = tuple(params)
    seen: set[str] = set()
    for param in schema:
        if not isinstance(param, Param):
            raise TypeError(f"params must be Param objects, got {type(param).__name__}")
        if param.name in seen:
            raise ValueError(f"param {param.name!r} is declared twice")
        seen.add(param.name)
    return schema


def params_problem(schema: Sequence[Param], params: Mapping[str, Any]) -> str:
    """The first thing wrong with `params` under `schema`, naming the param; empty if none."""
    by_name = {p.name: p for p in schema}
    for name in sorted(params):
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            return f"unknown param {name!r} (this kind takes: {known})"
    for param in schema:
        value = params.get(param.name)
        if value is None:
            if param.required:
                return f"param {param.name!r} is required"
            continue
        if problem := param.problem(value):
            return f"param {param.name!r} {problem}, got {_show(value)}"
    return ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_proto(schema: Sequence[Param]) -> dispatcher_pb2.ParamsSchema:
    return dispatcher_pb2.ParamsSchema(params=[p.to_proto() for p in schema])
