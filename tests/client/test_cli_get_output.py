"""`jobmesh get JOB --output DIR` writes a finished job's outputs; what would make a job's
outputs unwritable, or the job fail, is refused before anything is submitted. Against real
gateway and worker processes."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from jobmesh import Client
from tests.client.test_cli import jobmesh
from tests.cluster import Cluster


def test_get_output_writes_the_outputs_named_with_the_extension_the_job_gives(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (320, 240), (200, 80, 40)).save(photo, "JPEG")
    with Client(gw.address) as client:
        thumb = client.submit("image.thumbnail", inputs={"image": photo}, params={"size": 64})
        echo = client.submit("echo", inputs={"photo.jpg": photo})
        client.wait(thumb.job.id, check=True)
        client.wait(echo.job.id, check=True)

    out = tmp_path / "out"
    got = jobmesh(gw.address, "get", thumb.job.id, "--output", str(out))
    assert got.returncode == 0, got.stderr
    assert [p.name for p in out.iterdir()] == ["image.jpg"]  # not `image`, as before
    with Image.open(out / "image.jpg") as written:
        assert (written.format, written.size) == ("JPEG", (64, 48))
    assert f"jobmesh: wrote {out / 'image.jpg'} (" in got.stderr
    assert got.stdout.split()[:2] == ["job", thumb.job.id]

    got = jobmesh(gw.address, "get", echo.job.id, "--output", str(out), "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["id"] == echo.job.id
    assert (out / "photo.jpg").read_bytes() == photo.read_bytes()


def test_get_output_of_a_job_without_outputs_says_why(cluster: Cluster, tmp_path: Path) -> None:
    gw = cluster.gateway()  # no worker: the job stays queued
    queued = jobmesh(gw.address, "submit", "echo").stdout.strip()
    got = jobmesh(gw.address, "get", queued, "--output", str(tmp_path / "out"))
    assert got.returncode == 3
    assert got.stderr.splitlines()[-1] == (
        f"jobmesh: FAILED_PRECONDITION: job {queued} is QUEUED: it has no outputs until it ends"
    )
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused_before_submitting(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for argv in (
        ["submit", "echo", "--wait", "--output", str(afile)],
        ["image", "thumbnail", str(afile), "-o", str(afile)],
    ):
        refused = jobmesh(gw.address, *argv)
        assert refused.returncode == 2
        assert f"--output: {str(afile)!r} is not a directory" in refused.stderr
    assert json.loads(jobmesh(gw.address, "list", "--json").stdout)["jobs"] == []
    assert afile.read_text() == "mine"


def test_resize_without_a_size_is_refused_before_submitting(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 24)).save(photo, "JPEG")
    refused = jobmesh(gw.address, "image", "resize", str(photo), "-o", str(tmp_path / "out"))
    assert (refused.returncode, refused.stderr) == (
        2,
        "jobmesh: INVALID_ARGUMENT: --width: resize needs --width, --height or both\n",
    )
    assert json.loads(jobmesh(gw.address, "list", "--json").stdout)["jobs"] == []
    assert not (tmp_path / "out").exists()
