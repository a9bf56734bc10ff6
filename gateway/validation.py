"""Checks on what clients and workers send, raising InvalidArgument that names the field."""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping

from gateway.jobs import duration_seconds, ts_seconds
from jobmesh.errors import InvalidArgument
from jobmesh.limits import Limits, payload_bytes, payload_names
from jobmesh.params import Schema, schema_from_proto, typed
from jobmesh.v1 import dispatcher_pb2, job_pb2

KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_ATTEMPTS = 100
MAX_BACKOFF_SECONDS = 86400.0
MAX_NOT_BEFORE_SECONDS = 366 * 24 * 3600.0
MAX_TIMEOUT_SECONDS = 30 * 86400.0
MAX_RETENTION_SECONDS = 3650 * 86400.0
MAX_JOB_ID = 64
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "v1:"


def kind(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument("must not be empty", field)
    if not KIND.fullmatch(value):
        raise InvalidArgument(
            f"{value[:140]!r} is not a kind (letters, digits, '.', '_', '-'; at most 128)", field
        )
    return value


def labels(values: Mapping[str, str], field: str) -> None:
    items = dict(values)
    if len(items) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels", field)
    for key, value in items.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"{key[:70]!r} is not a label key", field)
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidArgument(f"value of {key!r} is longer than {MAX_LABEL_VALUE}", field)


def spec(
    value: job_pb2.JobSpec, limits: Limits, field: str = "spec", schema: Schema | None = None
) -> None:
    """Refuses a spec past the limits, or whose params do not fit `schema` (the one its
    kind's workers declared, if any)."""
    kind(value.kind, f"{field}.kind")
    limits.items(len(value.inputs) + len(value.input_blobs), f"{field}.inputs")
    payload_names(value.inputs, "input", f"{field}.inputs")
    payload_names(value.input_blobs, "input", f"{field}.input_blobs")
    inline = payload_bytes(value.inputs)
    if inline > limits.max_inline_bytes:
        raise InvalidArgument(
            f"{inline} bytes inline; at most {limits.max_inline_bytes} (upload larger inputs "
            "with BlobService; the SDK does so by itself)",
            f"{field}.inputs",
        )
    params = limits.json(value.params_json, f"{field}.params_json")
    if schema is not None:
        typed(schema, params, f"{field}.params_json", value.kind)
    both = set(value.inputs) & set(value.input_blobs)
    if both:
        raise InvalidArgument(f"{sorted(both)[0]!r} is also in inputs", f"{field}.input_blobs")
    labels(value.labels, f"{field}.labels")
    limits.name(value.idempotency_key, f"{field}.idempotency_key")
    _retry_policy(value.retry_policy, f"{field}.retry_policy")
    timeouts = (
        ("start_to_close_timeout", value.HasField("start_to_close_timeout")),
        ("schedule_to_start_timeout", value.HasField("schedule_to_start_timeout")),
        ("schedule_to_close_timeout", value.HasField("schedule_to_close_timeout")),
    )
    for name, is_set in timeouts:
        seconds = duration_seconds(getattr(value, name))
        if is_set and not 0 < seconds <= MAX_TIMEOUT_SECONDS:
            raise InvalidArgument("must be positive and at most 30 days", f"{field}.{name}")
    if value.HasField("retention"):
        seconds = duration_seconds(value.retention)
        if not 0 < seconds <= MAX_RETENTION_SECONDS:
            raise InvalidArgument("must be positive and at most 3650 days", f"{field}.retention")
    if value.HasField("not_before"):
        ahead = ts_seconds(value.not_before) - time.time()
        if ahead > MAX_NOT_BEFORE_SECONDS:
            raise InvalidArgument("must be at most 366 days ahead", f"{field}.not_before")


def _retry_policy(policy: job_pb2.RetryPolicy, field: str) -> None:
    if policy.max_attempts > MAX_ATTEMPTS:
        raise InvalidArgument(f"at most {MAX_ATTEMPTS}", f"{field}.max_attempts")
    for name in ("initial_backoff", "max_backoff"):
        if policy.HasField(name):
            seconds = duration_seconds(getattr(policy, name))
            if not 0 <= seconds <= MAX_BACKOFF_SECONDS:
                raise InvalidArgument("must be between 0 and 1 day", f"{field}.{name}")
    if policy.backoff_multiplier and not 1 <= policy.backoff_multiplier <= 10:
        raise InvalidArgument("must be between 1 and 10", f"{field}.backoff_multiplier")
    if not 0 <= policy.jitter <= 1:
        raise InvalidArgument("must be between 0 and 1", f"{field}.jitter")


def job_id(value: str, field: str = "job_id") -> str:
    if not value:
        raise InvalidArgument("must not be empty", field)
    if len(value) > MAX_JOB_ID:
        raise InvalidArgument(f"longer than {MAX_JOB_ID}", field)
    return value


def page_size(value: int) -> int:
    return DEFAULT_PAGE_SIZE if value == 0 else min(value, MAX_PAGE_SIZE)


def encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_id).encode()).decode() if last_id else ""


def decode_page_token(token: str) -> str:
    """The last job id of the previous page; '' for the first page."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidArgument("malformed page token", "page_token") from None
    if not text.startswith(_TOKEN_PREFIX) or not 0 < len(text) - len(_TOKEN_PREFIX) <= MAX_JOB_ID:
        raise InvalidArgument("malformed page token", "page_token")
    return text.removeprefix(_TOKEN_PREFIX)


def attach(value: dispatcher_pb2.Attach, limits: Limits, max_slots: int) -> dict[str, Schema]:
    """Refuses an Attach past the limits; returns the params schema of each kind that
    declares one, converted once here."""
    if not value.worker_id:
        raise InvalidArgument("must not be empty", "attach.worker_id")
    limits.name(value.worker_id, "attach.worker_id")
    if not value.worker_id.isprintable():
        raise InvalidArgument("must be printable", "attach.worker_id")
    limits.name(value.version, "attach.version")
    if not 1 <= value.slots <= max_slots:
        raise InvalidArgument(
            f"must be between 1 and {max_slots} (the gateway's --max-worker-slots)", "attach.slots"
        )
    if not value.kinds:
        raise InvalidArgument("a worker must serve at least one kind", "attach.kinds")
    limits.items(len(value.kinds), "attach.kinds")
    schemas: dict[str, Schema] = {}
    for i, capacity in enumerate(value.kinds):
        where = f"attach.kinds[{i}]"
        kind(capacity.kind, f"{where}.kind")
        if capacity.HasField("params_schema"):
            schemas[capacity.kind] = _params_schema(
                capacity.params_schema, limits, f"{where}.params_schema"
            )
    if len(value.running) > max_slots:
        raise InvalidArgument(f"more running attempts than {max_slots} slots", "attach.running")
    for ref in value.running:
        job_id(ref.job_id, "attach.running.job_id")
    labels(value.labels, "attach.labels")
    return schemas


def _params_schema(schema: dispatcher_pb2.ParamsSchema, limits: Limits, field: str) -> Schema:
    limits.items(len(schema.params), f"{field}.params")
    for spec in schema.params:
        limits.name(spec.name, f"{field}.params.name")
        limits.text(spec.description, f"{field}.params.description")
        limits.items(len(spec.choices), f"{field}.params.choices")
        for choice in spec.choices:
            limits.name(choice, f"{field}.params.choices")
    try:
        return schema_from_proto(schema)
    except (ValueError, TypeError) as e:  # e.g. minimum above maximum, an unknown type
        raise InvalidArgument(str(e), field) from None


def refused(value: dispatcher_pb2.Refused, limits: Limits) -> str:
    """The reason a worker gave for refusing an attempt, cut to `max_text`; InvalidArgument
    if the item names no attempt."""
    job_id(value.job_id, "refused.job_id")
    if value.attempt < 1:
        raise InvalidArgument("must be at least 1", "refused.attempt")
    return limits.cut(value.reason)


def result(value: job_pb2.JobResult, limits: Limits) -> None:
    """What a worker reports as a job's result: names, counts, sizes and nesting."""
    limits.result(value, "result.")
    inline = payload_bytes(value.outputs)
    if inline > limits.max_inline_bytes:
        raise InvalidArgument(
            f"{inline} bytes of inline outputs; at most {limits.max_inline_bytes}",
            "result.outputs",
        )
