"""The jobmesh demo: `jobmesh serve`, then the images product on generated photos
(thumbnails with a live progress bar, their info, a conversion through the Python SDK),
then the worker replicas and the jobs.

`make demo` runs it. The server gets a free port and a throwaway database, and the photos a
temp directory, so nothing of yours is touched; the server is stopped the way a user would
stop it (SIGTERM: the workers drain, then the gateway stops). Each step is a function in
STEPS; add one to show more.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from jobmesh import Client

ROOT = Path(__file__).resolve().parent.parent
JOBMESH = (sys.executable, "-m", "jobmesh")
WORKERS = 2
PHOTOS = 24
PHOTO_SIZE = (1600, 1200)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


def heading(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def jobmesh(address: str, *argv: str, cwd: Path = ROOT) -> None:
    """Runs the `jobmesh` command as a user would type it; stops the demo if it fails."""
    print(f"$ jobmesh {shlex.join(argv)}", flush=True)
    env = {**os.environ, "JOBMESH_GATEWAY": address}
    subprocess.run([*JOBMESH, *argv], cwd=cwd, env=env, check=True)


def photo(path: Path, n: int) -> None:
    """A 1600x1200 JPEG: a coloured gradient with a few shapes, different for each n."""
    width, height = PHOTO_SIZE
    gradient = Image.linear_gradient("L").resize(PHOTO_SIZE).rotate(n * 30, expand=False)
    tint = ((n * 67) % 256, (n * 131) % 256, (n * 29 + 90) % 256)
    image = Image.merge("RGB", [gradient.point(lambda v, c=c: (v * c) // 255) for c in tint])
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x, y = (n * 173 + i * 331) % width, (n * 97 + i * 211) % height
        radius = 80 + 40 * i
        colour = (255 - tint[i % 3], tint[(i + 1) % 3], 255 - tint[(i + 2) % 3])
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    image.save(path, "JPEG", quality=90)


def thumbnails(address: str, tmp: Path) -> None:
    heading(f"Thumbnails of {PHOTOS} photos ({PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs), one batch")
    photos = tmp / "photos"
    photos.mkdir()
    for n in range(PHOTOS):
        photo(photos / f"photo{n + 1:02d}.jpg", n)
    names = [f"photos/{p.name}" for p in sorted(photos.iterdir())]
    jobmesh(address, "image", "thumbnail", *names, "--size", "256", "-o", "thumbs/", cwd=tmp)


def thumbnail_info(address: str, tmp: Path) -> None:
    heading("What the thumbnails are")
    names = [f"thumbs/{p.name}" for p in sorted((tmp / "thumbs").iterdir())[:4]]
    jobmesh(address, "image", "info", *names, cwd=tmp)


def convert_with_sdk(address: str, tmp: Path) -> None:
    heading("A conversion through the Python SDK")
    print('client.submit("image.convert", params={"format": "webp", "quality": 80}, inputs=...)')
    source = tmp / "photos" / "photo01.jpg"
    with Client(address) as client:
        submitted = client.submit(
            "image.convert",
            params={"format": "webp", "quality": 80},
            inputs={"image": source},  # a path: read, or streamed up when large
        )
        job = client.wait(submitted.job.id, check=True)
        webp = client.outputs(job)["image"]  # downloads it if the gateway kept it as a blob
    assert job.result is not None
    meta = job.result.metadata
    print(
        f"  {job.id} {job.state} on {job.worker_id}: {source.name}"
        f" ({source.stat().st_size // 1024} KiB JPEG) -> {meta['width']}x{meta['height']}"
        f" {meta['format']} ({len(webp) // 1024} KiB)"
    )


def workers(address: str, tmp: Path) -> None:
    heading("The worker replicas")
    jobmesh(address, "workers")


def jobs(address: str, tmp: Path) -> None:
    heading("The jobs")
    jobmesh(address, "list")


STEPS: list[Callable[[str, Path], None]] = [
    thumbnails,
    thumbnail_info,
    convert_with_sdk,
    workers,
    jobs,
]


def start_server(tmp: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [*JOBMESH, "serve", "--listen", "127.0.0.1:0", "--db", str(tmp / "jobmesh.db")]
    argv += ["--workers", str(WORKERS), "--port-file", str(tmp / "port")]
    heading("Starting the server")
    print(f"$ jobmesh {shlex.join(argv[3:])}", flush=True)
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_until_serving(server: subprocess.Popen[bytes], port_file: Path) -> str:
    """The server's address, once it serves and its worker replicas have attached."""
    deadline = time.monotonic() + START_TIMEOUT
    while not port_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    address = f"127.0.0.1:{int(port_file.read_text())}"
    with Client(address) as client:
        while len(client.list_workers()) < WORKERS:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker replicas did not attach")
            time.sleep(0.1)
    print(f"serving on {address} with {WORKERS} worker replicas")
    return address


def stop_server(server: subprocess.Popen[bytes]) -> int:
    heading("Stopping the server (SIGTERM: workers drain, then the gateway stops)")
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        code = server.wait()
    print("stopped cleanly" if code == 0 else f"the server exited with code {code}")
    return code


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jobmesh-demo-") as name:
        tmp = Path(name)
        log = tmp / "serve.log"
        server = start_server(tmp, log)
        try:
            address = wait_until_serving(server, tmp / "port")
            for step in STEPS:
                step(address, tmp)
        except Exception:
            print(f"\nthe demo failed; the server's log:\n{log.read_text()}", file=sys.stderr)
            raise
        finally:
            code = stop_server(server)
        if code != 0:
            print(f"the server's log:\n{log.read_text()}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
