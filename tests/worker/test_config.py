"""Worker settings: the new limits from the environment and from flags."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from worker_service.app import add_arguments, settings_from_args
from worker_service.config import WorkerSettings, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1048576", 1 << 20),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("512mb", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("64K", 64 << 10),
    ],
)
def test_sizes_take_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1", "5Q", "M"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="512M"):
        parse_size(text)


def test_defaults_are_a_5_s_grace_and_no_memory_limit() -> None:
    settings = WorkerSettings.from_env({})
    assert (settings.cancel_grace, settings.max_job_memory_bytes) == (5.0, 0)


def test_the_environment_sets_the_limits() -> None:
    env = {"JOBMESH_CANCEL_GRACE": "1.5", "JOBMESH_MAX_JOB_MEMORY": "2G"}
    settings = WorkerSettings.from_env(env)
    assert (settings.cancel_grace, settings.max_job_memory_bytes) == (1.5, 2 << 30)


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBMESH_CANCEL_GRACE", "9")
    monkeypatch.setenv("JOBMESH_MAX_JOB_MEMORY", "1G")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--cancel-grace", "0.5", "--max-job-memory", "512M"])
    settings = settings_from_args(args)
    assert (settings.cancel_grace, settings.max_job_memory_bytes) == (0.5, 512 << 20)


def test_a_bad_memory_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--max-job-memory", "lots"])
    assert exit_info.value.code == 2
    assert "--max-job-memory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field", [{"cancel_grace": -1.0}, {"max_job_memory_bytes": -1}], ids=lambda f: next(iter(f))
)
def test_negative_limits_are_refused(field: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="negative"):
        WorkerSettings(**field)
