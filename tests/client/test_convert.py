"""Building the job a caller asks for from Python values, and job states by name."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from jobmesh import BlobRef, InvalidArgument, JobRequest, JobState, job_spec
from jobmesh.convert import parse_state, state_name
from jobmesh.v1 import job_pb2


def test_job_spec_carries_every_option() -> None:
    request = job_spec(
        "image.thumbnail",
        params={"size": 128, "keep": True, "tags": ["a", "b"], "opts": {"q": 0.9}, "name": "cat"},
        inputs={"in.png": b"\x89PNG"},
        priority=5,
        idempotency_key="k1",
        labels={"team": "web"},
        max_attempts=4,
        initial_backoff=0.5,
        max_backoff=timedelta(seconds=30),
        backoff_multiplier=3.0,
        retry_jitter=0.1,
        start_to_close_timeout=300,
        schedule_to_close_timeout=timedelta(hours=1),
        retention=60,
    )
    assert isinstance(request, JobRequest)
    spec = request.spec
    assert spec.kind == "image.thumbnail"
    # JSON text keeps integers integers.
    assert spec.params_json == (
        '{"size":128,"keep":true,"tags":["a","b"],"opts":{"q":0.9},"name":"cat"}'
    )
    assert spec.inputs == {"in.png": b"\x89PNG"}
    assert (spec.priority, spec.idempotency_key) == (5, "k1")
    assert spec.labels == {"team": "web"}
    policy = spec.retry_policy
    assert policy.max_attempts == 4
    assert policy.initial_backoff.ToTimedelta() == timedelta(seconds=0.5)
    assert policy.max_backoff.ToTimedelta() == timedelta(seconds=30)
    assert (policy.backoff_multiplier, policy.jitter) == (3.0, pytest.approx(0.1))
    assert spec.start_to_close_timeout.ToTimedelta() == timedelta(minutes=5)
    assert spec.schedule_to_close_timeout.ToTimedelta() == timedelta(hours=1)
    assert not spec.HasField("schedule_to_start_timeout")
    assert spec.retention.ToTimedelta() == timedelta(minutes=1)
    assert request.files == {}


def test_an_unset_option_is_left_to_the_gateway() -> None:
    spec = job_spec("echo").spec
    assert spec.params_json == ""
    assert not spec.HasField("retry_policy")
    assert not spec.HasField("retention")


def test_inputs_may_be_bytes_paths_or_uploaded_blobs(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg")
    ref = BlobRef("ab" * 32, 3 << 20)
    request = job_spec(
        "echo", inputs={"a": b"1", "b": str(photo), "c": photo, "d": ref, "e": bytearray(b"2")}
    )
    # Files are read (or uploaded) by the client when it submits, not now.
    assert request.files == {"b": photo, "c": photo}
    assert request.spec.inputs == {"a": b"1", "e": b"2"}
    assert request.spec.input_blobs == {"d": ref.proto}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("no-such-file.bin", "No such file or directory"),
        (".", "is not a file"),
        (42, "must be bytes, a file's path or a BlobRef, got int"),
    ],
)
def test_an_input_that_cannot_be_sent_is_refused_naming_it(
    value: object, problem: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match=problem) as caught:
        job_spec("echo", inputs={"big": value})  # type: ignore[dict-item]
    assert caught.value.field == "inputs.big"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_input_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0)
    with pytest.raises(InvalidArgument, match="cannot be read") as caught:
        job_spec("echo", inputs={"s": secret})
    assert caught.value.field == "inputs.s"


def test_params_that_are_not_json_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="params"):
        job_spec("echo", params={"when": object()})
    with pytest.raises(InvalidArgument, match=r"params\.n: the integer .* is beyond"):
        job_spec("echo", params={"n": 2**60})


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2**40}, "max_attempts"),
        ({"priority": 2**40}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"start_to_close_timeout": -1}, "start_to_close_timeout"),
        ({"retention": float("nan")}, "retention"),
        ({"schedule_to_close_timeout": 1e30}, "schedule_to_close_timeout"),
        ({"labels": {"team": 7}}, "labels"),
    ],
)
def test_a_bad_option_is_an_invalid_argument_naming_it(
    options: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        job_spec("echo", **options)  # type: ignore[arg-type]
    assert caught.value.field == field


@pytest.mark.parametrize("text", ["succeeded", "SUCCEEDED", " Succeeded ", "JOB_STATE_SUCCEEDED"])
def test_states_parse_by_short_or_full_name(text: str) -> None:
    state = parse_state(text)
    assert state is JobState.SUCCEEDED
    assert state == job_pb2.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize("text", ["done", "unspecified", ""])
def test_unknown_states_are_refused_with_the_known_ones(text: str) -> None:
    with pytest.raises(InvalidArgument, match="QUEUED, ASSIGNED, RUNNING"):
        parse_state(text)


def test_state_names_are_short_and_survive_unknown_numbers() -> None:
    assert state_name(job_pb2.JOB_STATE_RUNNING) == "RUNNING"
    assert state_name(99) == "UNKNOWN_99"
