"""Building job messages from Python values, and job states by name."""

from __future__ import annotations

import pytest

from jobmesh import InvalidArgument, job_spec
from jobmesh.convert import from_struct, parse_state, state_name
from jobmesh.v1 import job_pb2


def test_job_spec_carries_every_option() -> None:
    spec = job_spec(
        "image.thumbnail",
        params={"size": 128, "keep": True, "tags": ["a", "b"], "opts": {"q": 0.9}, "name": "cat"},
        inputs={"in.png": b"\x89PNG"},
        priority=5,
        idempotency_key="k1",
        labels={"team": "web"},
        max_attempts=4,
    )
    assert spec.kind == "image.thumbnail"
    assert from_struct(spec.params) == {
        "size": 128,
        "keep": True,
        "tags": ["a", "b"],
        "opts": {"q": 0.9},
        "name": "cat",
    }
    assert spec.inputs == {"in.png": b"\x89PNG"}
    assert (spec.priority, spec.idempotency_key) == (5, "k1")
    assert spec.labels == {"team": "web"}
    assert spec.retry_policy.max_attempts == 4


def test_an_unset_option_is_left_to_the_gateway() -> None:
    spec = job_spec("echo")
    assert not spec.HasField("params")
    assert not spec.HasField("retry_policy")


def test_params_that_are_not_json_like_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="params"):
        job_spec("echo", params={"when": object()})


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="max_attempts"):
        job_spec("echo", max_attempts=0)


@pytest.mark.parametrize("text", ["succeeded", "SUCCEEDED", " Succeeded ", "JOB_STATE_SUCCEEDED"])
def test_states_parse_by_short_or_full_name(text: str) -> None:
    assert parse_state(text) == job_pb2.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize("text", ["done", "unspecified", ""])
def test_unknown_states_are_refused_with_the_known_ones(text: str) -> None:
    with pytest.raises(InvalidArgument, match="QUEUED, ASSIGNED, RUNNING"):
        parse_state(text)


def test_state_names_are_short_and_survive_unknown_numbers() -> None:
    assert state_name(job_pb2.JOB_STATE_RUNNING) == "RUNNING"
    assert state_name(99) == "99"  # type: ignore[arg-type]
