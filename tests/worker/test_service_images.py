"""A real worker process serving the images product: schemas in Attach, the config file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from jobmesh.v1 import dispatcher_pb2 as d
from tests.worker.fake_gateway import FakeGateway, StartWorker
from tests.worker.pictures import decoded, picture
from worker_service.handlers.imaging import FORMAT_CHOICES


async def test_attach_carries_the_schemas_and_image_jobs_run(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    await start_worker()
    session = await gateway.session()
    kinds = {k.kind: k for k in session.attach.kinds}
    assert {
        "image.thumbnail",
        "image.resize",
        "image.convert",
        "image.transform",
        "image.composite",
        "image.info",
    } <= set(kinds)
    assert not kinds["echo"].HasField("params_schema")  # echo takes anything
    assert kinds["image.info"].HasField("params_schema")  # ... and info takes nothing
    assert not kinds["image.info"].params_schema.params
    [seconds] = kinds["sleep"].params_schema.params
    assert (seconds.name, seconds.type, seconds.maximum) == ("seconds", d.PARAM_TYPE_NUMBER, 3600)
    thumbnail = {p.name: p for p in kinds["image.thumbnail"].params_schema.params}
    assert set(thumbnail) == {"size", "format", "quality", "auto_orient"}
    size = thumbnail["size"]
    assert (size.type, size.required, size.minimum, size.maximum) == (
        d.PARAM_TYPE_INTEGER,
        False,
        1,
        10_000,
    )
    # The formats this worker's Pillow writes, so the gateway refuses others at Submit.
    assert thumbnail["format"].choices == list(FORMAT_CHOICES)
    assert kinds["image.convert"].params_schema.params[0].required  # format

    session.assign("t1", "image.thumbnail", inputs={"image": picture(size=(640, 480))}, size=64)
    done = await session.result_of("t1")
    assert isinstance(done, d.Completed), done
    assert decoded(done.result.outputs["image"]).size == (64, 48)
    assert json.loads(done.result.metadata_json)["extension"] == "jpg"

    session.assign("t2", "image.thumbnail", inputs={"image": picture()}, size="big")
    failed = await session.result_of("t2")
    assert isinstance(failed, d.Failed)
    assert (failed.error.code, failed.error.retryable) == ("INVALID_PARAMS", False)
    assert failed.error.message.startswith("params.size: must be an integer")

    # Choices in any case reach the handler in their declared spelling.
    session.assign(
        "r1",
        "image.resize",
        inputs={"image": picture(size=(64, 48))},
        width=32,
        resample="LANCZOS",
        format="PNG",
    )
    done = await session.result_of("r1")
    assert isinstance(done, d.Completed), done
    assert json.loads(done.result.metadata_json)["format"] == "png"
    assert decoded(done.result.outputs["image"]).size == (32, 24)


async def test_the_config_file_chooses_products_limits_and_the_pixel_cap(
    gateway: FakeGateway, start_worker: StartWorker, tmp_path: Path
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        "[products]\nbuiltin = false\n\n"
        '[kinds."image.thumbnail"]\nconcurrency = 2\n\n'
        "[images]\nmax_image_pixels = 1000\n"
    )
    await start_worker(
        "--kind-concurrency", "image.resize=1", env={"JOBMESH_WORKER_CONFIG": str(config)}
    )
    session = await gateway.session()
    kinds = {k.kind: k.max_concurrency for k in session.attach.kinds}
    assert not {"echo", "sleep", "fail"} & set(kinds)
    assert (kinds["image.thumbnail"], kinds["image.resize"], kinds["image.info"]) == (2, 1, 0)

    session.assign("big", "image.thumbnail", inputs={"image": picture(size=(64, 48))})
    session.assign("small", "image.thumbnail", inputs={"image": picture(size=(20, 20))})
    big, small = await session.result_of("big"), await session.result_of("small")
    assert isinstance(big, d.Failed)
    assert big.error.code == "IMAGE_TOO_LARGE"
    assert "limit of 1000" in big.error.message
    assert isinstance(small, d.Completed)


async def test_a_bad_config_file_stops_the_worker_with_exit_code_2(
    start_worker: StartWorker, tmp_path: Path
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[kinds.sleep]\nconcurrency = -2\n")
    proc = await start_worker("--config", str(config))
    assert await asyncio.wait_for(proc.wait(), 30) == 2
    log = (tmp_path / "worker0.log").read_text()
    assert f"worker config {config}:" in log
    assert "must be an integer >= 0" in log
