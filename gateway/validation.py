"""Checks on what clients and workers send, raising InvalidArgument that names the field."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping

from gateway.jobs import duration_seconds
from jobmesh.errors import InvalidArgument
from jobmesh.v1 import dispatcher_pb2, job_pb2

KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
# Names become file names on the client (`jobmesh submit --output DIR`).
PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._ -]{0,254}")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_IDEMPOTENCY_KEY = 256
MAX_ATTEMPTS = 100
MAX_BACKOFF_SECONDS = 86400.0
MAX_TIMEOUT_SECONDS = 30 * 86400.0
MAX_JOB_ID = 64
MAX_SLOTS = 10_000
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


def payload_names(names: Iterable[str], what: str, field: str) -> None:
    for name in names:
        if not PAYLOAD_NAME.fullmatch(name) or name in {".", ".."}:
            raise InvalidArgument(f"{name[:70]!r} is not an {what} name", field)


def spec(value: job_pb2.JobSpec, field: str = "spec") -> None:
    kind(value.kind, f"{field}.kind")
    payload_names(value.inputs, "input", f"{field}.inputs")
    payload_names(value.input_blobs, "input", f"{field}.input_blobs")
    both = set(value.inputs) & set(value.input_blobs)
    if both:
        raise InvalidArgument(f"{sorted(both)[0]!r} is also in inputs", f"{field}.input_blobs")
    labels(value.labels, f"{field}.labels")
    if len(value.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"longer than {MAX_IDEMPOTENCY_KEY}", f"{field}.idempotency_key")
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


def attach(value: dispatcher_pb2.Attach) -> None:
    if not value.worker_id:
        raise InvalidArgument("must not be empty", "attach.worker_id")
    if not 1 <= value.slots <= MAX_SLOTS:
        raise InvalidArgument(f"must be between 1 and {MAX_SLOTS}", "attach.slots")
    if not value.kinds:
        raise InvalidArgument("a worker must serve at least one kind", "attach.kinds")
    for capacity in value.kinds:
        kind(capacity.kind, "attach.kinds")
    labels(value.labels, "attach.labels")
