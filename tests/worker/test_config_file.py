"""The worker's TOML config file: what it sets, what overrides it, and what it refuses."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from worker_service.app import add_arguments, main, settings_from_args, with_kind_limits
from worker_service.config import WorkerSettings
from worker_service.registry import load_handlers

FULL = """
[worker]
gateway = "gw.example:7000"
slots = 3
handlers = ["tests.worker.handlers_for_tests"]
worker_id = "from-file"
labels = { zone = "b", disk = "ssd" }
drain_grace = 12
cancel_grace = 0.5
max_job_memory = "1G"
max_message_bytes = 2097152
log_level = "debug"

[products]
builtin = false
images = true

[kinds."image.thumbnail"]
concurrency = 2

[kinds.sleep]
concurrency = 0

[images]
max_image_pixels = 10_000_000
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return str(path)


def from_flags(*argv: str) -> WorkerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JOBMESH_WORKER_CONFIG", "JOBMESH_SLOTS", "JOBMESH_PRODUCTS"):
        monkeypatch.delenv(name, raising=False)


def test_without_a_file_every_product_is_on_with_a_64_mp_limit() -> None:
    settings = WorkerSettings.from_env({})
    assert settings.products == ("builtin", "images")
    assert (settings.max_image_pixels, settings.kind_concurrency) == (64_000_000, ())


def test_the_file_sets_products_kinds_limits_and_worker_settings(tmp_path: Path) -> None:
    settings = WorkerSettings.from_env({}, config_file=write(tmp_path, FULL))
    assert settings.products == ("images",)
    assert settings.kind_concurrency == (("image.thumbnail", 2), ("sleep", 0))
    assert settings.max_image_pixels == 10_000_000
    assert (settings.gateway, settings.slots, settings.worker_id) == (
        "gw.example:7000",
        3,
        "from-file",
    )
    assert settings.handlers == ("tests.worker.handlers_for_tests",)
    assert dict(settings.labels) == {"zone": "b", "disk": "ssd"}
    assert (settings.drain_grace, settings.cancel_grace) == (12.0, 0.5)
    assert (settings.max_job_memory_bytes, settings.max_message_bytes) == (1 << 30, 2 << 20)
    assert settings.log_level == "DEBUG"


def test_the_environment_names_the_file_and_overrides_it(tmp_path: Path) -> None:
    env = {
        "JOBMESH_WORKER_CONFIG": write(tmp_path, FULL),
        "JOBMESH_SLOTS": "5",
        "JOBMESH_PRODUCTS": "builtin,images",
        "JOBMESH_MAX_IMAGE_PIXELS": "2000000",
        "JOBMESH_KIND_CONCURRENCY": "image.resize=1,sleep=4",
    }
    settings = WorkerSettings.from_env(env)
    assert (settings.slots, settings.worker_id) == (5, "from-file")
    assert settings.products == ("builtin", "images")
    assert settings.max_image_pixels == 2_000_000
    # Kind by kind: the file's thumbnail limit stays.
    assert dict(settings.kind_concurrency) == {"image.thumbnail": 2, "sleep": 4, "image.resize": 1}


def test_flags_override_the_environment_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBMESH_WORKER_CONFIG", str(tmp_path / "not-this-one.toml"))
    monkeypatch.setenv("JOBMESH_SLOTS", "5")
    settings = from_flags(
        *("--config", write(tmp_path, FULL), "--slots", "7", "--products", "builtin"),
        *("--max-image-pixels", "1000", "--kind-concurrency", "image.thumbnail=9"),
        *("--kind-concurrency", "echo=1"),
    )
    assert (settings.slots, settings.gateway) == (7, "gw.example:7000")
    assert settings.products == ("builtin",)
    assert settings.max_image_pixels == 1000
    assert dict(settings.kind_concurrency) == {"image.thumbnail": 9, "sleep": 0, "echo": 1}


def test_an_empty_products_flag_turns_every_product_off() -> None:
    assert from_flags("--products", "").products == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slots = [", "not valid TOML"),
        ("[workers]\nslots = 2", "the file: unknown key 'workers'"),
        ("[worker]\nslot = 2", "[worker]: unknown key 'slot'"),
        ('[worker]\nslots = "two"', "[worker] slots: expected an integer, got 'two'"),
        ("[worker]\nslots = 0", "slots must be at least 1"),
        ('[worker]\nmax_job_memory = "lots"', "[worker] max_job_memory: expected a size"),
        ("[products]\nvideo = true", "[products]: unknown key 'video'"),
        ('[products]\nimages = "yes"', "[products] images: expected true or false"),
        ('[kinds."image.resize"]\nconcurrency = -1', "must be an integer >= 0"),
        ('[kinds."image.resize"]\nlimit = 1', "[kinds.'image.resize']: unknown key 'limit'"),
        ("[kinds]\nsleep = 2", "[kinds.sleep]: expected a table"),
        ("[images]\nmax_image_pixels = 0", "max_image_pixels must be a positive integer"),
        ("[images]\nmax_image_pixels = 1.5", "[images] max_image_pixels: expected an integer"),
        ("images = 3", "images must be a table"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="worker config ") as raised:
        WorkerSettings.from_env({}, config_file=path)
    assert str(raised.value).startswith(f"worker config {path}: ")
    assert message in str(raised.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read it"):
        WorkerSettings.from_env({"JOBMESH_WORKER_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBMESH_PRODUCTS": "builtin,video"}, "unknown products 'video'"),
        ({"JOBMESH_KIND_CONCURRENCY": "sleep"}, "JOBMESH_KIND_CONCURRENCY: expected"),
        ({"JOBMESH_MAX_IMAGE_PIXELS": "many"}, "JOBMESH_MAX_IMAGE_PIXELS: invalid literal"),
        ({"JOBMESH_SLOTS": "two"}, "JOBMESH_SLOTS: "),
    ],
)
def test_a_bad_environment_is_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSettings.from_env(env)


def test_bad_config_stops_the_worker_at_start_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[products]\nvideo = true")
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert f"worker config {path}: [products]: unknown key 'video'" in err
    assert err.count("\n") == 1  # one line, not argparse's usage


def test_products_choose_the_kinds_served() -> None:
    assert not any(k.startswith("image.") for k in load_handlers(products=["builtin"]))
    images_only = load_handlers(products=["images"])
    assert "image.thumbnail" in images_only
    assert not {"echo", "sleep", "fail"} & set(images_only)


def test_kind_limits_override_the_handlers_own_and_unserved_kinds_are_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    specs = load_handlers(["tests.worker.handlers_for_tests"])
    with caplog.at_level(logging.WARNING, logger="worker_service"):
        limited = with_kind_limits(
            specs, (("image.thumbnail", 2), ("test.one_at_a_time", 0), ("nope", 1))
        )
    assert limited["image.thumbnail"].concurrency == 2
    assert limited["test.one_at_a_time"].concurrency == 0
    assert limited["echo"].concurrency == 0
    assert "['nope']" in caplog.text
