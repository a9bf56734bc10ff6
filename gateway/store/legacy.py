"""Rows written before params and metadata were JSON text (schema version 5), rewritten.

Until then `JobSpec.params` (field 3) and `JobResult.metadata` (field 2) were
`google.protobuf.Struct`s. Today's messages reserve those numbers, so an old row still
parses but its params and metadata sit among the unknown fields, where no one reads them.
The rewrite works on the wire format: it walks a message's top-level fields, keeps every
other field's bytes as they are, and puts the Struct's JSON text in the field that now
carries it (`params_json` = 13, `metadata_json` = 4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

from google.protobuf import json_format, struct_pb2

from jobmesh.params import MAX_SAFE_INTEGER

Rewrite = Callable[[bytes], bytes]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Field numbers of the old layout, and of the fields that hold the messages concerned.
SPEC_PARAMS, SPEC_PARAMS_JSON = 3, 13
RESULT_METADATA, RESULT_METADATA_JSON = 2, 4
JOB_SPEC, JOB_RESULT = 3, 8
EVENT_RESULT = 10


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def fields(data: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(number, wire type, the field's bytes whole, its payload if length-delimited) of
    each top-level field, in order. ValueError if `data` is not a message."""
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        payload = b""
        if wire == _VARINT:
            _, pos = _varint(data, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            payload = data[pos : pos + size]
            pos += size
        else:  # groups: none of jobmesh's messages has one
            raise ValueError(f"wire type {wire} of field {number}")
        if pos > len(data):
            raise ValueError(f"field {number} runs past the message")
        yield number, wire, data[start:pos], payload


def _rewrite(data: bytes, changes: dict[int, Rewrite], old: int = 0, new: int = 0) -> bytes:
    """`data` with the fields numbered in `changes` rewritten by them and, if `old` is
    given, the Struct in field `old` moved to field `new` as JSON text; `data` itself when
    nothing changes."""
    kept: list[bytes] = []
    struct: list[bytes] = []
    changed = False
    for number, wire, whole, payload in fields(data):
        if number == old and wire == _LEN:
            # A message field repeated on the wire is merged: so are the Struct's pieces.
            struct.append(payload)
            changed = True
        elif number in changes and wire == _LEN:
            rewritten = changes[number](payload)
            if rewritten == payload:
                kept.append(whole)
            else:
                kept.append(_delimited(number, rewritten))
                changed = True
        else:
            kept.append(whole)
    if not changed:
        return data
    if struct:
        text = struct_json(b"".join(struct))
        if text:
            kept.append(_delimited(new, text.encode()))
    return b"".join(kept)


def struct_json(data: bytes) -> str:
    """Compact JSON text of a serialized Struct; '' for an empty one."""
    struct = struct_pb2.Struct.FromString(data)
    if not struct.fields:
        return ""
    try:
        values = json_format.MessageToDict(struct)
    except ValueError:
        # NaN or Infinity, which JSON has no number for: written as strings, the way
        # protobuf's JSON writes such doubles, rather than dropped.
        _spell_non_finite(struct)
        values = json_format.MessageToDict(struct)
    return json.dumps(_exact(values), separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _spell_non_finite(struct: struct_pb2.Struct) -> None:
    pending: list[struct_pb2.Value] = list(struct.fields.values())
    while pending:
        value = pending.pop()
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            number = value.number_value
            value.string_value = "NaN" if math.isnan(number) else json.dumps(number)
        elif kind == "struct_value":
            pending.extend(value.struct_value.fields.values())
        elif kind == "list_value":
            pending.extend(value.list_value.values)


def _exact(value: object) -> object:
    """`value` with each integral float within +-(2^53 - 1) made an int. A Struct holds every
    number as a double, so the integers clients submitted came back as 3.0; they were
    integers when submitted, and JSON text can say so now. (A 3.0 sent as such reads 3.)"""
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact(v) for v in value]
    return value


def spec(data: bytes) -> bytes:
    """A stored JobSpec with its params as `params_json`."""
    return _rewrite(data, {}, SPEC_PARAMS, SPEC_PARAMS_JSON)


def result(data: bytes) -> bytes:
    """A JobResult with its metadata as `metadata_json`."""
    return _rewrite(data, {}, RESULT_METADATA, RESULT_METADATA_JSON)


def status(data: bytes) -> bytes:
    """A stored Job (its status: the spec is stored apart, but rewritten if present)."""
    return _rewrite(data, {JOB_SPEC: spec, JOB_RESULT: result})


def event(data: bytes) -> bytes:
    """A stored JobEvent, whose result (if it kept one) gets its metadata as JSON text."""
    return _rewrite(data, {EVENT_RESULT: result})
