"""Limits on what a request or a worker may send, and the checks gateway, worker and CLI share.

Every limit sits well below what protobuf itself parses (100 nested messages, 2 GiB), so
any message the gateway later builds from stored data (Get, List, Watch, Assign) still
parses and fits the message limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from jobmesh import params
from jobmesh.errors import InvalidArgument
from jobmesh.settings_fields import setting
from jobmesh.v1 import job_pb2

# Names become file names on the client (`jobmesh submit --output DIR`): no separators,
# no control characters, no leading dot.
PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._ -]{0,127}")


def is_payload_name(name: str) -> bool:
    """Whether `name` may name an input or output (and so a file the CLI writes)."""
    return bool(PAYLOAD_NAME.fullmatch(name)) and ".." not in name


def payload_names(names: Iterable[str], what: str, field: str) -> None:
    for name in names:
        if not is_payload_name(name):
            raise InvalidArgument(
                f"{name[:70]!r} is not an {what} name (letters, digits, '._ -', at most 128, "
                "no '..')",
                field,
            )


def payload_bytes(payloads: Mapping[str, bytes]) -> int:
    """Bytes of inline payloads (inputs or outputs) together."""
    return sum(len(data) for data in payloads.values())


@dataclass(frozen=True)
class Limits:
    """What one message may carry. The gateway checks requests and worker messages
    against these; the worker checks its results before it sends them. Each is a gateway
    setting, with its flag and variable."""

    max_params_bytes: int = setting(
        1 << 20, help="largest params (or result metadata) of a job, bytes", size=True
    )
    max_params_depth: int = setting(
        16, help="deepest nesting of objects and lists in params or metadata"
    )
    max_text: int = setting(
        4096, help="longest progress, cancel or error message (longer errors are cut)"
    )
    max_name: int = setting(128, help="longest worker id, version or idempotency key")
    max_items: int = setting(
        256, help="most entries in a repeated field or map (inputs, outputs, kinds...)"
    )
    max_inline_bytes: int = setting(
        16 << 20,
        help="largest inline inputs of one job together; larger go through blobs",
        size=True,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1")
        if self.max_params_depth > 32:
            raise ValueError("max_params_depth must be at most 32 (protobuf nests 100 deep)")

    def json(self, text: str, field: str) -> dict[str, Any]:
        """The object JSON params or metadata text holds; InvalidArgument if it is not one
        within `max_params_bytes` and `max_params_depth` (see `jobmesh.params.decode`)."""
        return params.decode(
            text, field, max_bytes=self.max_params_bytes, max_depth=self.max_params_depth
        )

    def result(self, value: job_pb2.JobResult, prefix: str = "") -> None:
        """Raises InvalidArgument for a result with too many outputs, an output name no
        client could write, or metadata that is not a JSON object within the params limits;
        fields named after `prefix`."""
        self.items(len(value.outputs) + len(value.output_blobs), f"{prefix}outputs")
        payload_names([*value.outputs, *value.output_blobs], "output", f"{prefix}outputs")
        self.json(value.metadata_json, f"{prefix}metadata_json")

    def text(self, value: str, field: str, limit: int | None = None) -> None:
        limit = self.max_text if limit is None else limit
        if len(value) > limit:
            raise InvalidArgument(f"{len(value)} characters; at most {limit}", field)

    def name(self, value: str, field: str) -> None:
        self.text(value, field, self.max_name)

    def items(self, count: int, field: str) -> None:
        if count > self.max_items:
            raise InvalidArgument(f"{count} entries; at most {self.max_items} (max_items)", field)

    def cut(self, text: str) -> str:
        """`text` cut to `max_text` characters, saying so."""
        if len(text) <= self.max_text:
            return text
        return text[: self.max_text - 20] + " [... cut]"


DEFAULT_LIMITS = Limits()
