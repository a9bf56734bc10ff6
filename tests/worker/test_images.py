"""The images product through real pool processes: sizes, formats, metadata, failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from jobmesh.v1 import job_pb2
from jobmesh.worker import JobContext
from tests.worker.pictures import decoded, encoded, gradient, picture, quadrants, with_exif
from worker_service.executor import Executor
from worker_service.handlers.images import configure
from worker_service.handlers.imaging import FORMATS
from worker_service.outcomes import Outcome
from worker_service.pool import ProcessPool
from worker_service.registry import default_registry, load_handlers
from worker_service.task import Task

LIMIT = 1_000_000  # pixels: low, so the bombs below stay small and quick


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPool]:
    p = ProcessPool(2, ["worker_service.handlers.images"], initializer=configure, initargs=(LIMIT,))
    p.start()
    try:
        yield p
    finally:
        p.close()


class Run:
    def __init__(self, outcome: Outcome, progress: list[tuple[float, str]]) -> None:
        self.outcome = outcome
        self.progress = progress

    @property
    def metadata(self) -> dict[str, Any]:
        assert isinstance(self.outcome, job_pb2.JobResult), self.outcome
        meta: dict[str, Any] = json.loads(self.outcome.metadata_json)
        return meta

    @property
    def image(self) -> Image.Image:
        assert isinstance(self.outcome, job_pb2.JobResult), self.outcome
        return decoded(self.outcome.outputs["image"])

    @property
    def error(self) -> job_pb2.JobError:
        assert isinstance(self.outcome, job_pb2.JobError), self.outcome
        return self.outcome


async def run(
    pool: ProcessPool, kind: str, params: dict[str, Any], inputs: dict[str, bytes]
) -> Run:
    """Runs a job as the worker does: its params as JSON text, decoded and typed once."""
    progress: list[tuple[float, str]] = []
    executor = Executor(load_handlers(products=("images",)), pool, threads=1)
    task = Task(job_id="j", attempt=1, kind=kind, params_json=json.dumps(params), inputs=inputs)
    try:
        outcome = await executor.run(task, lambda f, m: progress.append((f, m)))
    finally:
        executor.close()
    return Run(outcome, progress)


async def test_a_thumbnail_fits_the_box_and_reports_each_stage(pool: ProcessPool) -> None:
    done = await run(pool, "image.thumbnail", {"size": 100}, {"image": picture(size=(640, 480))})
    assert done.metadata == {
        "format": "jpeg",
        "width": 100,
        "height": 75,
        "extension": "jpg",
        "content_type": "image/jpeg",
    }
    assert (done.image.format, done.image.size) == ("JPEG", (100, 75))
    # The pool passes on the newest report of a burst; the last one always arrives.
    stages = [(0.2, "decode"), (0.6, "process"), (1.0, "encode")]
    assert done.progress[-1] == stages[-1]
    assert all(report in stages for report in done.progress)


@pytest.mark.parametrize("kind", ["image.thumbnail", "image.resize", "image.transform"])
def test_each_stage_is_reported_in_turn(kind: str) -> None:
    seen: list[tuple[float, str]] = []
    ctx = JobContext(
        job_id="j",
        attempt=1,
        kind=kind,
        params={"width": 10} if kind == "image.resize" else {},
        inputs={"image": picture()},
        report=lambda f, m: seen.append((f, m)),
    )
    default_registry().specs()[kind].fn(ctx)
    assert seen == [(0.2, "decode"), (0.6, "process"), (1.0, "encode")]


@pytest.mark.parametrize(
    ("source", "expected"),
    [("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tiff"), ("TGA", "jpeg")],
)
async def test_a_thumbnail_keeps_the_input_format_when_it_can(
    pool: ProcessPool, source: str, expected: str
) -> None:
    done = await run(pool, "image.thumbnail", {}, {"image": picture(source, size=(48, 32))})
    assert done.metadata["format"] == expected
    assert (done.image.format, done.image.size) == (FORMATS[expected].pillow, (48, 32))


async def test_a_thumbnail_never_enlarges_and_takes_the_only_input(pool: ProcessPool) -> None:
    done = await run(pool, "image.thumbnail", {"size": 256}, {"photo.png": picture("PNG")})
    assert (done.metadata["width"], done.metadata["height"]) == (64, 48)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_convert_writes_every_format_pillow_can(pool: ProcessPool, fmt: str) -> None:
    done = await run(pool, "image.convert", {"format": fmt, "quality": 70}, {"image": picture()})
    meta = done.metadata
    assert (meta["format"], meta["extension"]) == (fmt, FORMATS[fmt].extension)
    assert (done.image.format, done.image.size) == (FORMATS[fmt].pillow, (64, 48))


async def test_jpeg_output_of_a_transparent_image_is_flattened_onto_white(
    pool: ProcessPool,
) -> None:
    clear = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    clear.paste((255, 0, 0, 255), (0, 0, 10, 10))
    done = await run(pool, "image.convert", {"format": "jpg"}, {"image": encoded(clear, "PNG")})
    image = done.image.convert("RGB")
    assert done.metadata["format"] == "jpeg"
    assert _near(image.getpixel((3, 5)), (255, 0, 0))
    assert _near(image.getpixel((16, 5)), (255, 255, 255))


async def test_convert_strips_exif_unless_told_not_to(pool: ProcessPool) -> None:
    photo = with_exif()
    stripped = await run(pool, "image.convert", {"format": "jpeg"}, {"image": photo})
    kept = await run(
        pool, "image.convert", {"format": "webp", "strip_metadata": False}, {"image": photo}
    )
    assert 0x010F not in stripped.image.getexif()
    assert kept.image.getexif()[0x010F] == "Acme"


async def test_orientation_from_exif_is_applied_unless_turned_off(pool: ProcessPool) -> None:
    sideways = with_exif(size=(60, 40), orientation=6)  # "rotate 90 degrees to view"
    upright = await run(pool, "image.thumbnail", {"size": 30}, {"image": sideways})
    raw = await run(
        pool, "image.thumbnail", {"size": 30, "auto_orient": False}, {"image": sideways}
    )
    assert (upright.metadata["width"], upright.metadata["height"]) == (20, 30)
    assert (raw.metadata["width"], raw.metadata["height"]) == (30, 20)


@pytest.mark.parametrize(
    ("params", "size"),
    [
        ({"width": 32}, (32, 24)),
        ({"height": 96}, (128, 96)),
        ({"width": 30, "height": 30}, (30, 22)),
        ({"width": 30, "height": 30, "fit": "cover"}, (30, 30)),
        ({"width": 30, "height": 10, "fit": "fill", "resample": "nearest"}, (30, 10)),
        ({"width": 30, "height": 30, "resample": "bilinear", "format": "png"}, (30, 22)),
        ({"width": 30.0, "resample": "LANCZOS", "fit": "Cover"}, (30, 22)),  # any case
    ],
)
async def test_resize_fits_as_asked(
    pool: ProcessPool, params: dict[str, Any], size: tuple[int, int]
) -> None:
    done = await run(pool, "image.resize", params, {"image": picture(size=(64, 48))})
    assert done.image.size == size
    assert (done.metadata["width"], done.metadata["height"]) == size


async def test_choices_are_taken_in_any_case(pool: ProcessPool) -> None:
    done = await run(
        pool,
        "image.resize",
        {"width": 16, "resample": "Bicubic", "format": "PNG"},
        {"image": picture()},
    )
    assert (done.metadata["format"], done.image.format, done.image.size) == ("png", "PNG", (16, 12))
    done = await run(pool, "image.convert", {"format": "JPG"}, {"image": picture("PNG")})
    assert (done.metadata["format"], done.metadata["extension"]) == ("jpeg", "jpg")


async def test_resize_cover_crops_the_middle(pool: ProcessPool) -> None:
    striped = Image.new("RGB", (30, 10), "red")
    striped.paste((0, 0, 255), (10, 0, 20, 10))  # blue middle third
    done = await run(
        pool,
        "image.resize",
        {"width": 10, "height": 10, "fit": "cover", "format": "png"},
        {"image": encoded(striped, "PNG")},
    )
    assert done.image.convert("RGB").getpixel((5, 5)) == (0, 0, 255)


async def test_transform_crops_rotates_and_flips_in_that_order(pool: ProcessPool) -> None:
    source = encoded(quadrants((40, 20)), "PNG")  # red | green over blue | white
    done = await run(
        pool,
        "image.transform",
        {
            "crop": {"left": 0, "top": 0, "width": 40, "height": 10},
            "rotate": 90,
            "flip": "vertical",
        },
        {"image": source},
    )
    image = done.image.convert("RGB")
    # The top strip (red | green), turned clockwise (red on top), then flipped upside down.
    assert image.size == (10, 40)
    assert image.getpixel((5, 35)) == (255, 0, 0)
    assert image.getpixel((5, 5)) == (0, 255, 0)
    assert done.metadata["format"] == "png"


async def test_rotating_by_an_odd_angle_grows_the_canvas_with_clear_corners(
    pool: ProcessPool,
) -> None:
    done = await run(
        pool, "image.transform", {"rotate": 45, "format": "png"}, {"image": picture(size=(40, 40))}
    )
    image = done.image
    assert image.size[0] > 40
    assert image.mode == "RGBA"
    assert image.getpixel((0, 0))[3] == 0


async def test_composite_draws_layers_by_z_with_position_and_opacity(pool: ProcessPool) -> None:
    red = encoded(Image.new("RGB", (20, 20), "red"), "PNG")
    blue = encoded(Image.new("RGB", (20, 20), "blue"), "JPEG")
    done = await run(
        pool,
        "image.composite",
        {
            "width": 50,
            "height": 30,
            "background": "#ffffff",
            "layers": [
                {"input": "red", "x": 10, "y": 5},
                {"input": "blue", "x": 20, "y": 10, "z": -1},  # under red despite coming later
                {"input": "red", "x": -15, "y": -15, "opacity": 0.5},
            ],
        },
        {"red": red, "blue": blue},
    )
    image = done.image.convert("RGBA")
    assert done.metadata == {
        "format": "png",
        "width": 50,
        "height": 30,
        "extension": "png",
        "content_type": "image/png",
    }
    assert image.getpixel((25, 15)) == (255, 0, 0, 255)  # red over blue
    assert _near(image.getpixel((35, 25))[:3], (0, 0, 255))  # blue alone
    assert _near(image.getpixel((2, 2))[:3], (255, 128, 128))  # half red over white
    assert image.getpixel((45, 2)) == (255, 255, 255, 255)  # background


async def test_composite_defaults_to_clear_and_to_white_in_jpeg(pool: ProcessPool) -> None:
    clear = await run(pool, "image.composite", {"width": 8, "height": 4}, {})
    white = await run(pool, "image.composite", {"width": 8, "height": 4, "format": "jpeg"}, {})
    assert clear.image.convert("RGBA").getpixel((1, 1))[3] == 0
    assert _near(white.image.convert("RGB").getpixel((1, 1)), (255, 255, 255))


async def test_info_describes_without_an_output(pool: ProcessPool) -> None:
    done = await run(pool, "image.info", {}, {"image": with_exif(orientation=3)})
    assert isinstance(done.outcome, job_pb2.JobResult)
    assert not done.outcome.outputs
    assert done.metadata == {
        "format": "jpeg",
        "width": 60,
        "height": 40,
        "mode": "RGB",
        "frames": 1,
        "exif": {"Make": "Acme", "Model": "Cam 3", "Orientation": 3},
    }


async def test_info_counts_frames(pool: ProcessPool) -> None:
    frames = [gradient((16, 16)).rotate(90 * i) for i in range(3)]
    animated = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    meta = (await run(pool, "image.info", {}, {"image": animated})).metadata
    assert (meta["format"], meta["frames"], meta["exif"]) == ("gif", 3, {})


def _bomb(size: tuple[int, int]) -> bytes:
    # One flat color: megapixels in a few kilobytes, the shape of a decompression bomb.
    return encoded(Image.new("L", size), "PNG", optimize=True)


@pytest.mark.parametrize(
    ("kind", "params", "inputs", "code"),
    [
        ("image.thumbnail", {}, {"image": b"\x00not an image at all"}, "IMAGE_DECODE_ERROR"),
        ("image.resize", {"width": 8}, {"image": picture()[:200]}, "IMAGE_DECODE_ERROR"),
        ("image.convert", {"format": "png"}, {"image": picture("PCX")}, "UNSUPPORTED_FORMAT"),
        ("image.info", {}, {"image": picture("SGI")}, "UNSUPPORTED_FORMAT"),
        ("image.thumbnail", {}, {"image": _bomb((3000, 3000))}, "IMAGE_TOO_LARGE"),
        ("image.info", {}, {"image": _bomb((1200, 1000))}, "IMAGE_TOO_LARGE"),
        (
            "image.resize",
            {"width": 20000, "height": 20000},
            {"image": picture()},
            "IMAGE_TOO_LARGE",
        ),
        ("image.resize", {"width": 10000}, {"image": picture(size=(4, 400))}, "IMAGE_TOO_LARGE"),
        ("image.transform", {"rotate": 45}, {"image": _bomb((990, 990))}, "IMAGE_TOO_LARGE"),
        ("image.composite", {"width": 2000, "height": 2000}, {}, "IMAGE_TOO_LARGE"),
        ("image.resize", {}, {"image": picture()}, "INVALID_PARAMS"),
        ("image.resize", {"width": "wide"}, {"image": picture()}, "INVALID_PARAMS"),
        ("image.thumbnail", {"colour": "red"}, {"image": picture()}, "INVALID_PARAMS"),
        ("image.thumbnail", {"size": 2.5}, {"image": picture()}, "INVALID_PARAMS"),
        ("image.convert", {}, {"image": picture()}, "INVALID_PARAMS"),
        ("image.convert", {"format": "pcx"}, {"image": picture()}, "INVALID_PARAMS"),
        (
            "image.transform",
            {"crop": {"left": 50, "top": 0, "width": 20, "height": 10}},
            {"image": picture()},
            "INVALID_PARAMS",
        ),
        (
            "image.composite",
            {"width": 9, "height": 9, "background": "pink-ish"},
            {},
            "INVALID_PARAMS",
        ),
        (
            "image.composite",
            {"width": 9, "height": 9, "layers": [{"input": "a", "opacity": 2}]},
            {"a": picture()},
            "INVALID_PARAMS",
        ),
        (
            "image.composite",
            {"width": 9, "height": 9, "layers": [{"input": "logo"}]},
            {"a": picture()},
            "MISSING_INPUT",
        ),
        ("image.thumbnail", {}, {}, "MISSING_INPUT"),
        ("image.thumbnail", {}, {"a": picture(), "b": picture()}, "MISSING_INPUT"),
    ],
)
async def test_bad_images_and_params_fail_with_a_code_not_retried(
    pool: ProcessPool,
    kind: str,
    params: dict[str, Any],
    inputs: dict[str, bytes],
    code: str,
) -> None:
    error = (await run(pool, kind, params, inputs)).error
    assert (error.code, error.retryable) == (code, False), error.message
    assert error.message


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("image.resize", {}, "image.resize needs width, height or both"),
        ("image.resize", {"width": "wide"}, "params.width: must be an integer"),
        ("image.thumbnail", {"size": 2.5}, "params.size: must be an integer, got 2.5"),
        ("image.thumbnail", {"colour": "red"}, "params: image.thumbnail takes no param 'colour'"),
        ("image.convert", {}, "params.format: image.convert needs this param"),
        ("image.convert", {"format": "pcx"}, "params.format: must be one of: "),
        ("image.resize", {"width": 8, "resample": "sharp"}, "params.resample: must be one of"),
    ],
)
async def test_bad_params_are_named(
    pool: ProcessPool, kind: str, params: dict[str, Any], message: str
) -> None:
    error = (await run(pool, kind, params, {"image": picture()})).error
    assert error.code == "INVALID_PARAMS"
    assert error.message.startswith(message), error.message


async def test_the_limit_names_the_setting_and_the_pool_goes_on(pool: ProcessPool) -> None:
    error = (await run(pool, "image.thumbnail", {}, {"image": _bomb((1100, 1000))})).error
    assert "1100000 pixels" in error.message
    assert "limit of 1000000 (max_image_pixels)" in error.message
    done = await run(pool, "image.thumbnail", {"size": 10}, {"image": picture()})
    assert done.metadata["width"] == 10


def _near(got: Any, want: tuple[int, ...], tolerance: int = 8) -> bool:
    return all(abs(g - w) <= tolerance for g, w in zip(got, want, strict=True))
