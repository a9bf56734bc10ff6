"""Worker settings: limits, flags and variables from the declarations, and startup errors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from jobmesh.cli.services import _replica_flags, serve_parser
from jobmesh.settings_fields import env_name, flag_name, settings_of
from worker_service.app import add_arguments, settings_from_args
from worker_service.config import WorkerSettings, markdown_table, parse_size


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


def test_every_declared_setting_is_a_flag_a_variable_and_a_file_key(tmp_path: Path) -> None:
    table = markdown_table()
    for f, how in settings_of(WorkerSettings):
        assert f"`{flag_name(f)}`" in table
        if how.env:
            assert f"`{env_name(f)}`" in table
    path = tmp_path / "worker.toml"
    path.write_text('[worker]\nmax_message_bytes = "2M"\nlabels = { zone = "a" }\n')
    settings = from_flags("--config", str(path), "--label", "zone=b,disk=ssd", "--label", "x=1")
    assert settings.max_message_bytes == 2 << 20
    assert dict(settings.labels) == {"zone": "b", "disk": "ssd", "x": "1"}
    assert from_flags("--max-message-bytes", "1M").max_message_bytes == 1 << 20


def test_serve_passes_its_replica_settings_on_as_the_workers_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("JOBMESH_WORKER_CONFIG", "JOBMESH_KIND_CONCURRENCY", "JOBMESH_LABELS"):
        monkeypatch.delenv(name, raising=False)
    given = serve_parser().parse_args(
        [
            *("--handlers", "tests.worker.handlers_for_tests,json", "--handlers", "math"),
            *("--kind-concurrency", "sleep=1", "--kind-concurrency", "image.resize=0"),
            *("--label", "zone=a", "--max-job-memory", "1G", "--products", "builtin"),
            *("--drain-grace", "2.5", "--max-queued", "7"),
        ]
    )
    replica = from_flags(*_replica_flags(given))
    assert replica.handlers == ("tests.worker.handlers_for_tests", "json", "math")
    assert replica.kind_concurrency == (("sleep", 1), ("image.resize", 0))
    assert (replica.labels, replica.max_job_memory_bytes) == ((("zone", "a"),), 1 << 30)
    assert (replica.products, replica.drain_grace) == (("builtin",), 2.5)
    assert "--max-queued" not in _replica_flags(given)  # a gateway setting


def from_flags(*argv: str) -> WorkerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))
