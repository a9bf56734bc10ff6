"""Gateway settings: one declaration gives the default, the variable, the flag and the
README's row."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.config import GatewaySettings, add_arguments, from_args, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_every_setting_as_declared() -> None:
    assert markdown_table() in README.read_text(), (
        "README's gateway table is stale: paste `python -m gateway.config`"
    )


def test_environment_and_flags_set_settings_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBMESH_RETENTION", "60")
    monkeypatch.setenv("JOBMESH_MAX_PARAMS_DEPTH", "8")
    monkeypatch.setenv("JOBMESH_MAX_QUEUED", "5")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_args(parser.parse_args(["--max-queued", "7", "--max-text", "100"]))
    assert settings.retention == 60.0
    assert settings.max_queued == 7  # the flag wins over the environment
    assert settings.limits.max_params_depth == 8
    assert settings.limits.max_text == 100


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBMESH_RETENTION": "nan"}, "retention must be positive"),
        ({"JOBMESH_MAX_WORKER_SLOTS": "0"}, "max_worker_slots must be at least 1"),
        ({"JOBMESH_MAX_PARAMS_DEPTH": "50"}, "max_params_depth must be at most 32"),
        ({"JOBMESH_MAX_QUEUED": "many"}, "JOBMESH_MAX_QUEUED: expected int"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewaySettings.from_env(env)
