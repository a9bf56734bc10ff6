"""Params, once: how a job's params (and a result's metadata) travel, and what a kind takes.

On the wire params are one JSON object as text (`JobSpec.params_json`), which keeps
integers exact. Integers beyond ±(2^53 - 1), NaN and Infinity are refused, so that every
JSON client, JavaScript's included, reads back exactly what was sent; so are duplicate keys.

A kind declares its params with `Param`s (`@handler(params=[...])`). The worker sends the
schema in Attach; the gateway refuses, at Submit, a job whose params do not fit it, and the
worker applies the same `typed()` once more and hands the handler typed values: an
`integer` param arrives as `int`, a `number` as `float`, a string with `choices` in the
declared spelling. The gateway, the worker, the handlers and the CLI all use this module.
A null value counts as not given.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jobmesh.errors import InvalidArgument
from jobmesh.v1 import dispatcher_pb2

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest integer a JSON client is sure to read exactly (JavaScript's Number)."""

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
_TYPES_OF_PROTO = {v: k for k, v in _PROTO_TYPES.items()}


# --- the JSON text -------------------------------------------------------------------------


def encode(values: Mapping[str, Any] | None, field: str = "params") -> str:
    """Compact JSON text of a params (or metadata) mapping; '' for none.

    InvalidArgument names the field when a value is not JSON (sets, bytes, NaN...) or an
    integer is beyond ±(2^53 - 1).
    """
    if not values:
        return ""
    if not isinstance(values, Mapping):
        raise InvalidArgument(f"must be a mapping, got {type(values).__name__}", field)
    try:
        text = json.dumps(values, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"not JSON: {e}", field) from None
    except RecursionError:
        raise InvalidArgument("nested too deeply", field) from None
    for where, value in _leaves(values, field):
        if isinstance(value, int) and not isinstance(value, bool):
            _check_integer(value, where)
    return text


def decode(text: str, field: str = "params", *, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """The mapping JSON text holds ('' is {}); InvalidArgument if it is not one JSON object
    within the limits, has a duplicate key, NaN, Infinity or an integer beyond ±(2^53 - 1)."""
    if not text:
        return {}
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(f"{size} bytes; at most {max_bytes} (max_params_bytes)", field)
    # Before parsing: the parser recurses, and a deep document would cost the stack.
    opened = text.count("[") + text.count("{")
    if opened > max_depth and _depth(text, max_depth + 1) > max_depth:
        raise InvalidArgument(f"nested deeper than {max_depth} levels (max_params_depth)", field)
    try:
        value = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except _Refused as e:
        raise InvalidArgument(str(e), field) from None
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"not JSON: {e}", field) from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"must be a JSON object, got {type(value).__name__}", field)
    for where, leaf in _leaves(value, field):
        if isinstance(leaf, int) and not isinstance(leaf, bool):
            _check_integer(leaf, where)
        elif isinstance(leaf, float) and not math.isfinite(leaf):
            raise InvalidArgument("a number too large for JSON", where)
    return value


class _Refused(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"the key {key[:60]!r} appears twice")
            seen.add(key)
    return value


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _check_integer(value: int, where: str) -> None:
    if abs(value) > MAX_SAFE_INTEGER:
        raise InvalidArgument(
            f"the integer {value if abs(value) < 10**30 else '...'} is beyond +-(2^53 - 1), "
            "which JSON clients cannot read exactly; send it as a string",
            where,
        )


def _depth(text: str, stop: int) -> int:
    """How deeply objects and arrays nest in JSON text, counting no further than `stop`."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest >= stop:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def _leaves(value: Any, field: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every scalar in a JSON value; iterative, so depth cannot hurt."""
    pending: list[tuple[str, Any]] = [(field, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, Mapping):
            pending.extend((f"{where}.{k}", v) for k, v in item.items())
        elif isinstance(item, list | tuple):
            pending.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
        else:
            yield where, item


# --- what a kind takes ---------------------------------------------------------------------


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
    """For strings: the allowed values, if only some are (matched ignoring case)."""
    minimum: float | None = None
    """For numbers and integers: the smallest allowed value."""
    maximum: float | None = None
    """For numbers and integers: the largest allowed value."""
    description: str = ""
    """One line for people (shown by tools that list kinds, and by the CLI's --help)."""

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
        if len({c.lower() for c in self.choices}) != len(self.choices):
            raise ValueError(f"param {self.name!r}: two choices differ only in case")
        numeric = self.type in ("number", "integer")
        for bound in (self.minimum, self.maximum):
            if bound is not None and (not numeric or not math.isfinite(bound)):
                raise ValueError(
                    f"param {self.name!r}: minimum and maximum are finite bounds "
                    "of number and integer params"
                )
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"param {self.name!r}: minimum is above maximum")

    def typed(self, value: Any) -> Any:
        """`value` as the handler gets it; ValueError saying what is wrong if it does not fit."""
        if self.type == "string":
            if not isinstance(value, str):
                raise ValueError("must be a string")
            if not self.choices:
                return value
            for choice in self.choices:
                if choice.lower() == value.lower():
                    return choice
            raise ValueError(f"must be one of: {', '.join(self.choices)}")
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
            return value
        if self.type == "list":
            if not isinstance(value, list | tuple):
                raise ValueError("must be a list")
            return list(value)
        if self.type == "object":
            if not isinstance(value, Mapping):
                raise ValueError("must be an object")
            return dict(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be {'an integer' if self.type == 'integer' else 'a number'}")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if self.type == "integer":
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError("must be an integer")
                value = int(value)
        else:
            value = float(value)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum:g}")
        return value

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

    @classmethod
    def from_proto(cls, spec: dispatcher_pb2.ParamSpec) -> Param:
        """The Param a worker declared; ValueError if the declaration makes no sense."""
        kind = _TYPES_OF_PROTO.get(spec.type)
        if kind is None:
            raise ValueError(f"param {spec.name!r}: unknown type {spec.type}")
        return cls(
            name=spec.name,
            type=kind,
            required=spec.required,
            choices=tuple(spec.choices),
            minimum=spec.minimum if spec.HasField("minimum") else None,
            maximum=spec.maximum if spec.HasField("maximum") else None,
            description=spec.description,
        )


Schema = tuple[Param, ...]


def check_schema(params: Iterable[Param]) -> Schema:
    """The params as a tuple; TypeError or ValueError if one is not a Param or a name repeats."""
    schema = tuple(params)
    seen: set[str] = set()
    for param in schema:
        if not isinstance(param, Param):
            raise TypeError(f"params must be Param objects, got {type(param).__name__}")
        if param.name in seen:
            raise ValueError(f"param {param.name!r} is declared twice")
        seen.add(param.name)
    return schema


def typed(
    schema: Sequence[Param], params: Mapping[str, Any], field: str = "params", kind: str = ""
) -> dict[str, Any]:
    """The params as the kind's handler gets them (nulls left out, values typed);
    InvalidArgument naming the first param that is unknown, missing or ill-typed."""
    by_name = {p.name: p for p in schema}
    for name in sorted(params):
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            takes = f"{kind} takes" if kind else "takes"
            raise InvalidArgument(f"{takes} no param {name!r} (it takes: {known})", field)
    values: dict[str, Any] = {}
    for param in schema:
        value = params.get(param.name)
        where = f"{field}.{param.name}"
        if value is None:
            if param.required:
                raise InvalidArgument(f"{kind or 'this kind'} needs this param", where)
            continue
        try:
            values[param.name] = param.typed(value)
        except ValueError as e:
            raise InvalidArgument(f"{e}, got {_show(value)}", where) from None
    return values


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_proto(schema: Sequence[Param]) -> dispatcher_pb2.ParamsSchema:
    return dispatcher_pb2.ParamsSchema(params=[p.to_proto() for p in schema])


def schema_from_proto(proto: dispatcher_pb2.ParamsSchema) -> Schema:
    """The schema a worker declared in Attach; ValueError if it makes no sense."""
    return check_schema(Param.from_proto(spec) for spec in proto.params)


def schema_bytes(schema: Sequence[Param]) -> bytes:
    """The schema's ParamsSchema, deterministically encoded: equal schemas, equal bytes."""
    return schema_proto(schema).SerializeToString(deterministic=True)


def schema_digest(schema: Sequence[Param]) -> str:
    """The schema's version: 16 hex digits of the SHA-256 of `schema_bytes`."""
    return hashlib.sha256(schema_bytes(schema)).hexdigest()[:16]
