"""The one JSON shape of every `--json`: one object per line, on stdout.

A message is shown as protobuf's JSON mapping with its field names as in the proto
(snake_case), and with these rules on top:

- every field is there: zeros, '', false, [] and {} included; an unset message field (a
  running job's `result`, `error`, `end_time`) or optional number is null;
- 64-bit integers are JSON numbers, not strings;
- enum values are their short names, as the tables show them: `SUCCEEDED`, not
  `JOB_STATE_SUCCEEDED` (`UNSPECIFIED` for 0; a number this CLI does not know stays a number);
- a JSON-text field `X_json` (`params_json`, `metadata_json`) is shown as `X`, the object the
  text holds (`{}` for '');
- Timestamps are RFC 3339 strings in UTC, Durations strings of seconds ("1.5s"), bytes
  (inline inputs and outputs) base64, as protobuf's JSON mapping has them.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from jobmesh.errors import JobmeshError

_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
# A string field named so holds JSON text; it is shown as the value the text holds.
_JSON_SUFFIX = "_json"
_WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def print_json(value: Message | dict[str, Any]) -> None:
    """One JSON object on one line of stdout, flushed, so a stream of them reads as it comes."""
    data = to_json(value) if isinstance(value, Message) else value
    print(json.dumps(data, separators=(",", ":")), flush=True)


def to_json(message: Message) -> dict[str, Any]:
    """The message as the JSON object the CLI prints (see the module's docstring)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _message(cast(Descriptor, message.DESCRIPTOR), data)


def decode_object(text: str, field: str) -> dict[str, Any]:
    """The object JSON text from the gateway holds ('' is {}).

    Not checked against this client's limits: the gateway checked it against its own, which
    may be larger.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise JobmeshError(f"{field}: the gateway sent text that is not a JSON object")
    return value


def _message(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for field in descriptor.fields:
        # Only fields with presence are left out when unset: those are null.
        value = data.get(field.name)
        if value is None:
            shown[field.name] = None
        elif field.type == FieldDescriptor.TYPE_STRING and field.name.endswith(_JSON_SUFFIX):
            shown[field.name.removesuffix(_JSON_SUFFIX)] = decode_object(value, field.name)
        elif (entry := _map_entry(field)) is not None:
            value_field = entry.fields_by_name["value"]
            shown[field.name] = {k: _single(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            shown[field.name] = [_single(field, v) for v in value]
        else:
            shown[field.name] = _single(field, value)
    return shown


def _single(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        if field.message_type.full_name.startswith("google.protobuf."):
            return value  # Timestamp, Duration...: protobuf's own JSON form
        return _message(field.message_type, value)
    if field.enum_type is not None:
        return short_name(field.enum_type, value)
    if field.type in _INT64:
        return int(value)
    return value


def _map_entry(field: FieldDescriptor) -> Descriptor | None:
    """The entry type of a map field; None for any other field."""
    entry = field.message_type
    if entry is None or not field.is_repeated or not entry.GetOptions().map_entry:
        return None
    return entry


def short_name(enum: EnumDescriptor, name: str | int) -> str | int:
    """'SUCCEEDED' for 'JOB_STATE_SUCCEEDED': the value's name without its type's prefix
    (buf lint makes every value start with it); a number this client does not know as is."""
    if not isinstance(name, str):
        return name
    return name.removeprefix(_prefix(enum.name))


@functools.cache
def _prefix(enum_name: str) -> str:
    # JobEventType → JOB_EVENT_TYPE_
    return _WORD_START.sub("_", enum_name).upper() + "_"
