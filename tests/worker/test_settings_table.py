"""Worker settings: one declaration gives the variable, the file's key, the flag and the
README's row."""

from __future__ import annotations

from pathlib import Path

from worker_service.config import markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_every_worker_setting_as_declared() -> None:
    assert markdown_table() in README.read_text(), (
        "README's worker table is stale: paste `python -m worker_service.config`"
    )
