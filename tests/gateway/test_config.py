"""Gateway settings (one declaration gives the default, the variable, the flag and the
README's row) and startup errors."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewaySettings, add_arguments, from_args, markdown_table
from tests.cluster import ROOT

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


def test_a_busy_port_is_one_line_and_exit_code_3(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        for command in (
            [sys.executable, "-m", "gateway"],
            [str(Path(sys.executable).parent / "jobmesh"), "serve", "--workers", "0"],
        ):
            done = subprocess.run(
                [*command, "--listen", listen, "--db", str(tmp_path / "jobs.db")],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert (done.returncode, done.stderr) == (
                3,
                f"jobmesh: cannot listen on {listen}: address already in use\n",
            )
