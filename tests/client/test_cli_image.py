"""`jobmesh image`, run as a user runs it, against a real gateway and a worker serving the
built-in image kinds: the files it writes, what it prints, its exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from jobmesh.cli import main
from jobmesh.cli.images import crop, layer
from tests.client.test_cli import jobmesh
from tests.cluster import Cluster, Gateway


def picture(path: Path, width: int, height: int, fmt: str = "JPEG") -> Path:
    Image.new("RGB", (width, height), (200, 80, 40)).save(path, fmt)
    return path


@pytest.fixture
def gateway(cluster: Cluster) -> Gateway:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    return gw


def test_thumbnail_writes_each_image_and_fails_only_the_garbage_one(
    gateway: Gateway, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    good = [picture(photos / f"p{i}.jpg", 320, 240) for i in range(3)]
    (photos / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    thumbs = tmp_path / "thumbs"
    files = [str(p) for p in sorted(photos.iterdir())]
    done = jobmesh(gateway.address, "image", "thumbnail", *files, "--size", "64", "-o", str(thumbs))
    assert done.returncode == 1, done.stderr
    assert sorted(p.name for p in thumbs.iterdir()) == [p.name for p in good]
    for path in thumbs.iterdir():
        with Image.open(path) as thumb:
            assert (thumb.format, thumb.size) == ("JPEG", (64, 48))
    [failed] = [line for line in done.stderr.splitlines() if "garbage.jpg" in line]
    assert failed.startswith(f"jobmesh: {photos / 'garbage.jpg'}: IMAGE_DECODE_ERROR: ")
    assert f"{photos / 'p0.jpg'} -> {thumbs / 'p0.jpg'} (" in done.stderr
    assert (
        done.stderr.splitlines()[-1] == f"jobmesh: 3 of 4 succeeded, 1 failed; images in {thumbs}"
    )

    again = jobmesh(
        gateway.address, "image", "thumbnail", *files, "--size", "64", "-o", str(thumbs), "--json"
    )
    assert again.returncode == 1
    lines = {Path(d["file"]).name: d for d in map(json.loads, again.stdout.splitlines())}
    assert sorted(lines) == ["garbage.jpg", "p0.jpg", "p1.jpg", "p2.jpg"]
    assert lines["garbage.jpg"]["ok"] is False
    assert lines["garbage.jpg"]["state"] == "FAILED"
    assert lines["garbage.jpg"]["error"]["code"] == "IMAGE_DECODE_ERROR"
    p0 = lines["p0.jpg"]
    assert (p0["ok"], p0["state"], p0["output"]) == (True, "SUCCEEDED", str(thumbs / "p0.jpg"))
    assert p0["metadata"] | {"format": "jpeg", "width": 64, "height": 48} == p0["metadata"]
    assert p0["bytes"] == (thumbs / "p0.jpg").stat().st_size


def test_info_prints_formats_and_sizes_and_writes_nothing(gateway: Gateway, tmp_path: Path) -> None:
    jpeg = picture(tmp_path / "a.jpg", 300, 200)
    png = picture(tmp_path / "b.png", 40, 50, "PNG")
    before = sorted(tmp_path.iterdir())
    shown = jobmesh(gateway.address, "image", "info", str(jpeg), str(png))
    assert shown.returncode == 0, shown.stderr
    [header, *rows] = [line.split() for line in shown.stdout.splitlines()]
    assert header == ["FILE", "FORMAT", "WIDTH", "HEIGHT", "MODE", "FRAMES", "EXIF"]
    assert [row[:6] for row in rows] == [
        [str(jpeg), "jpeg", "300", "200", "RGB", "1"],
        [str(png), "png", "40", "50", "RGB", "1"],
    ]
    assert sorted(tmp_path.iterdir()) == before

    as_json = jobmesh(gateway.address, "image", "info", str(png), "--json")
    [line] = [json.loads(text) for text in as_json.stdout.splitlines()]
    assert line["metadata"] | {"format": "png", "width": 40, "height": 50} == line["metadata"]


def test_resize_convert_transform_and_composite(gateway: Gateway, tmp_path: Path) -> None:
    src = picture(tmp_path / "wide.png", 200, 100, "PNG")
    out = tmp_path / "out"

    def run(*argv: str) -> Image.Image:
        done = jobmesh(gateway.address, "image", *argv, "-o", str(out))
        assert done.returncode == 0, done.stderr
        [line] = [line for line in done.stderr.splitlines() if " -> " in line]
        written = line.split(" -> ")[1].split(" (")[0]
        image = Image.open(written)
        image.load()
        return image

    assert run("resize", str(src), "--width", "50", "--height", "50", "--fit", "fill").size == (
        50,
        50,
    )
    webp = run("convert", str(src), "--format", "webp", "--quality", "80")
    assert (webp.format, webp.size) == ("WEBP", (200, 100))
    assert (out / "wide.webp").exists()
    assert run("transform", str(src), "--rotate", "90", "--flip", "horizontal").size == (100, 200)
    assert run("transform", str(src), "--crop", "10,10,30,20").size == (30, 20)

    logo = picture(tmp_path / "logo.png", 10, 10, "PNG")
    canvas = run(
        "composite", "--width", "64", "--height", "32", "--background", "white",
        "--layer", str(src), "--layer", f"{logo}:5,5,0.5,1", "--format", "png",
    )  # fmt: skip
    assert canvas.size == (64, 32)


def test_images_over_the_inline_limit_go_up_and_come_down_in_chunks(
    gateway: Gateway, tmp_path: Path
) -> None:
    noise = Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3))
    big = tmp_path / "noise.png"
    noise.save(big, "PNG")
    assert big.stat().st_size > 1 << 20  # the SDK's inline limit
    out = tmp_path / "out"
    done = jobmesh(gateway.address, "image", "convert", str(big), "--format", "png", "-o", str(out))
    assert done.returncode == 0, done.stderr
    with Image.open(out / "noise.png") as copy:
        assert copy.tobytes() == noise.tobytes()
    assert not [p.name for p in out.iterdir() if p.name != "noise.png"]


def test_bad_values_are_refused_before_anything_runs(gateway: Gateway, tmp_path: Path) -> None:
    src = picture(tmp_path / "a.jpg", 32, 32)
    out = tmp_path / "out"
    bad_fit = jobmesh(gateway.address, "image", "resize", str(src), "--fit", "stretch", "-o", "x")
    assert bad_fit.returncode == 2
    assert "argument --fit: invalid choice: 'stretch'" in bad_fit.stderr

    # The gateway checks params against the schema the worker declared.
    unknown = jobmesh(
        gateway.address, "image", "thumbnail", str(src), "-p", "bogus=1", "-o", str(out)
    )
    assert unknown.returncode == 2
    [line] = unknown.stderr.splitlines()
    assert line.startswith("jobmesh: INVALID_ARGUMENT: ")
    assert "bogus" in line
    assert not any(out.iterdir())


def test_an_output_that_would_overwrite_its_input_is_not_written(
    gateway: Gateway, tmp_path: Path
) -> None:
    src = picture(tmp_path / "a.jpg", 64, 64)
    original = src.read_bytes()
    done = jobmesh(
        gateway.address, "image", "thumbnail", str(src), "--size", "8", "-o", str(tmp_path)
    )
    assert done.returncode == 1
    assert f"jobmesh: {src}: NOT_WRITTEN: refusing to overwrite the input '{src}'" in done.stderr
    assert src.read_bytes() == original


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = picture(tmp_path / "a.jpg", 8, 8)
    (tmp_path / "sub").mkdir()
    b = picture(tmp_path / "sub" / "a.png", 8, 8, "PNG")
    assert main(["image", "thumbnail", str(a), str(b), "-o", str(tmp_path / "out")]) == 2
    assert "would both be written as" in capsys.readouterr().err
    assert main(["image", "info", str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg: No such file or directory" in capsys.readouterr().err
    for argv in (
        ["image", "thumbnail", str(a)],  # no -o
        ["image", "convert", str(a), "-o", "out"],  # no --format
        ["image", "transform", str(a), "--crop", "1,2,3", "-o", "out"],
        ["image", "composite", "--layer", f"{a}:1", "-o", "out"],
        ["image", "explode", str(a)],
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv


def test_layer_and_crop_values(tmp_path: Path) -> None:
    assert layer("a.png") == (Path("a.png"), {})
    assert layer("a.png:10,-5") == (Path("a.png"), {"x": 10, "y": -5})
    assert layer("dir/a.png:1,2,0.5,3") == (
        Path("dir/a.png"),
        {"x": 1, "y": 2, "opacity": 0.5, "z": 3},
    )
    odd = tmp_path / "odd:name.png"
    odd.write_bytes(b"")
    assert layer(str(odd)) == (odd, {})
    assert crop("1,2,30,40") == {"left": 1, "top": 2, "width": 30, "height": 40}
