"""Thumbnails through jobmesh against the same Pillow work in a local process pool.

Generates N 1600x1200 JPEGs in memory, then, in one run:

- `local_images_per_s`: `thumbnail()` below over every image in a ProcessPoolExecutor with
  one process per core: the most this machine does without jobmesh;
- `jobmesh_images_per_s`: `image.thumbnail` jobs (256 px, JPEG q85) sent with SubmitBatch to
  a gateway (`python -m gateway`, SQLite in a temp dir) and worker replicas on this machine,
  replicas x slots = cores, until every job has ended;

and prints JSON with both rates and `ratio` (jobmesh / local). Both sides are warmed up
first (pool processes started, Pillow imported), so the rates are the steady state.

Usage: python bench/images.py [--images N] [--replicas R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import PIL
import psutil
from PIL import Image, ImageDraw, ImageOps

from jobmesh import AsyncClient, JobEvent, JobState, job_spec

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = (1600, 1200)
THUMBNAIL = 256
QUALITY = 85
# Distinct pictures generated; the N images cycle through them (the work is the same).
DISTINCT = 16
BATCH = 100
WATCHES = 64


def thumbnail(data: bytes) -> bytes:
    """What `image.thumbnail` does with size 256: decode (JPEG draft at twice the box),
    turn upright from EXIF, shrink to fit with Lanczos, encode JPEG q85."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft(None, (2 * THUMBNAIL, 2 * THUMBNAIL))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def picture(n: int) -> bytes:
    """A 1600x1200 JPEG (q90): a tinted gradient with a few discs."""
    tint = ((n * 67) % 256, (n * 131) % 256, (n * 29 + 90) % 256)
    gradient = Image.linear_gradient("L").resize(IMAGE_SIZE).rotate(n * 23)
    image = Image.merge("RGB", [gradient.point(lambda v, c=c: (v * c) // 255) for c in tint])
    draw = ImageDraw.Draw(image)
    for i in range(5):
        x, y = (n * 173 + i * 331) % IMAGE_SIZE[0], (n * 97 + i * 211) % IMAGE_SIZE[1]
        r = 60 + 30 * i
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(255 - tint[i % 3], tint[(i + 1) % 3], 90))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def local(images: list[bytes], processes: int) -> tuple[float, float]:
    """Images per second through a local pool of `processes` (spawned, like jobmesh's), and
    CPU seconds per image (pool and this process)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        list(pool.map(thumbnail, images[: processes * 2]))  # start every process
        before = cpu_seconds(os.getpid())
        started = time.perf_counter()
        thumbs = list(pool.map(thumbnail, images))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(os.getpid()) - before
    assert all(Image.open(io.BytesIO(t)).size == (256, 192) for t in thumbs[:3])
    return len(images) / elapsed, cpu / len(images)


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def through_jobmesh(client: AsyncClient, images: list[bytes]) -> float:
    """Images per second: batches submitted, every job followed to its last event (which
    carries the result), as `jobmesh image` does."""
    started = time.perf_counter()
    gate = asyncio.Semaphore(WATCHES)

    async def end(job_id: str) -> JobEvent:
        async with gate:
            events = [event async for event in client.watch(job_id)]
            return events[-1]

    ends = []
    for offset in range(0, len(images), BATCH):
        specs = [
            job_spec("image.thumbnail", params={"size": THUMBNAIL}, inputs={"image": image})
            for image in images[offset : offset + BATCH]
        ]
        for submitted in await client.submit_batch(specs):
            ends.append(asyncio.create_task(end(submitted.job.id)))
    events = await asyncio.gather(*ends)
    elapsed = time.perf_counter() - started
    failed = [e for e in events if e.state is not JobState.SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0].error}")
    result = events[0].result
    assert result is not None
    meta = result.metadata
    assert (meta["width"], meta["height"]) == (256, 192), meta
    return len(images) / elapsed


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time of a process and (unless not asked) its live children, e.g. pool processes."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *(proc.children(recursive=True) if children else ())):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


async def measure(
    address: str, images: list[bytes], pids: dict[str, list[int]], warmup: int
) -> dict[str, Any]:
    async with AsyncClient(address) as client:
        for _ in range(600):
            if len(await client.list_workers()) == len(pids["workers"]):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the worker replicas did not attach")
        await through_jobmesh(client, images[:warmup])
        before = {part: _cpu(part, ids) for part, ids in pids.items()}
        rate = await through_jobmesh(client, images)
        after = {part: _cpu(part, ids) for part, ids in pids.items()}
    cpu = {part: round((after[part] - before[part]) / len(images) * 1000, 2) for part in pids}
    return {"images_per_s": rate, "cpu_ms_per_image": cpu}


def _cpu(part: str, pids: list[int]) -> float:
    # The client's children are the gateway and the workers, counted on their own.
    return sum(cpu_seconds(pid, children=part != "client") for pid in pids)


def jobmesh(images: list[bytes], replicas: int, slots: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        port_file = tmpdir / "port"
        argv = [sys.executable, "-m", "gateway", "--listen", "127.0.0.1:0", "--log-level", "ERROR"]
        argv += ["--db", str(tmpdir / "bench.db"), "--port-file", str(port_file)]
        gateway = start(argv, tmpdir / "gateway.log")
        workers: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(600):
                if port_file.exists() or gateway.poll() is not None:
                    break
                time.sleep(0.05)
            address = f"127.0.0.1:{port_file.read_text().strip()}"
            for i in range(replicas):
                argv = [sys.executable, "-m", "worker_service", "--gateway", address]
                argv += ["--slots", str(slots), "--worker-id", f"bench-{i}", "--log-level", "ERROR"]
                workers.append(start(argv, tmpdir / f"worker-{i}.log"))
            pids = {
                "gateway": [gateway.pid],
                "workers": [w.pid for w in workers],
                "client": [os.getpid()],
            }
            return asyncio.run(measure(address, images, pids, replicas * slots * 2))
        finally:
            for proc in (*workers, gateway):
                proc.terminate()
                proc.wait(30)


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="how many (default: 200)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=min(2, cores),
        help="worker replicas; each gets cores / replicas slots (default: 2)",
    )
    opts = parser.parse_args()
    if not 1 <= opts.replicas <= cores or cores % opts.replicas:
        parser.error(f"--replicas must divide the {cores} cores")
    slots = cores // opts.replicas
    distinct = [picture(n) for n in range(min(DISTINCT, opts.images))]
    images = [distinct[i % len(distinct)] for i in range(opts.images)]
    local_rate, local_cpu = local(images, cores)
    through = jobmesh(images, opts.replicas, slots)
    jobmesh_rate = through["images_per_s"]
    print(
        json.dumps(
            {
                "benchmark": "images",
                "kind": "image.thumbnail",
                "images": opts.images,
                "image_size": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}",
                "image_bytes_mean": sum(map(len, images)) // len(images),
                "thumbnail": THUMBNAIL,
                "cores": cores,
                "worker_replicas": opts.replicas,
                "worker_slots": slots,
                "local_processes": cores,
                "local_images_per_s": round(local_rate, 1),
                "jobmesh_images_per_s": round(jobmesh_rate, 1),
                "ratio": round(jobmesh_rate / local_rate, 3),
                "jobmesh_cpu_ms_per_image": through["cpu_ms_per_image"],
                "local_cpu_ms_per_image": round(local_cpu * 1000, 2),
                "python": platform.python_version(),
                "pillow": PIL.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
