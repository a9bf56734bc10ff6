"""Every image kind fed random and mutated bytes ends cleanly, and the pool keeps serving."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from jobmesh.v1 import job_pb2
from tests.worker.pictures import encoded, gradient, picture
from worker_service.handlers.images import configure
from worker_service.pool import ProcessPool
from worker_service.task import Task

CASES_PER_KIND = 60
# What a broken input may end in; a crash, a retryable HANDLER_ERROR or a dead pool
# process would be a bug.
CLEAN_CODES = {
    "IMAGE_DECODE_ERROR",
    "IMAGE_TOO_LARGE",
    "UNSUPPORTED_FORMAT",
    "IMAGE_PROCESS_ERROR",
}
# As the executor hands them to the pool: typed.
KINDS: dict[str, dict[str, object]] = {
    "image.thumbnail": {"size": 16},
    "image.resize": {"width": 20, "height": 12, "fit": "cover"},
    "image.convert": {"format": "png"},
    "image.transform": {"rotate": 30.0, "flip": "horizontal"},
    "image.composite": {"width": 40, "height": 30, "layers": [{"input": "image", "x": 3}]},
    "image.info": {},
}


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPool]:
    p = ProcessPool(
        2, ["worker_service.handlers.images"], initializer=configure, initargs=(2_000_000,)
    )
    p.start()
    try:
        yield p
    finally:
        p.close()


def seeds() -> list[bytes]:
    image = gradient((48, 32))
    return [
        *(encoded(image, fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "TGA")),
        encoded(image, "JPEG", progressive=True),
        encoded(image.convert("RGBA"), "PNG"),
        encoded(image.convert("P"), "GIF", transparency=0),
        picture("ICO", size=(32, 32)),
        picture("AVIF", size=(16, 16)),
    ]


def mutate(rng: random.Random, samples: list[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.15:
        return rng.randbytes(rng.randrange(0, 600))
    data = bytearray(rng.choice(samples))
    if choice < 0.35:
        return bytes(data[: rng.randrange(len(data))])
    if choice < 0.45:  # a real header with noise after it
        cut = rng.randrange(8, 64)
        return bytes(data[:cut]) + rng.randbytes(rng.randrange(0, 400))
    for _ in range(rng.randrange(1, 10)):
        # Mostly the header, where the dimensions and the chunk lengths live.
        span = 64 if rng.random() < 0.7 else len(data)
        data[rng.randrange(min(span, len(data)))] = rng.randrange(256)
    return bytes(data)


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_broken_bytes_end_in_a_result_or_a_clean_error(pool: ProcessPool, kind: str) -> None:
    rng = random.Random(f"jobmesh-{kind}")  # the same cases every run
    samples = seeds()
    inputs = [mutate(rng, samples) for _ in range(CASES_PER_KIND)]

    async def one(i: int, data: bytes) -> job_pb2.JobResult | job_pb2.JobError:
        task = Task(
            job_id=f"fuzz-{i}", attempt=1, kind=kind, params=KINDS[kind], inputs={"image": data}
        )
        return await pool.run(task, threading.Event(), lambda f, m: None)

    outcomes = await asyncio.gather(*(one(i, data) for i, data in enumerate(inputs)))
    ends: Counter[str] = Counter()
    for data, outcome in zip(inputs, outcomes, strict=True):
        if isinstance(outcome, job_pb2.JobError):
            assert outcome.code in CLEAN_CODES, (outcome, data[:80])
            assert not outcome.retryable
        ends["ok" if isinstance(outcome, job_pb2.JobResult) else outcome.code] += 1
    assert ends["IMAGE_DECODE_ERROR"] > 0, ends  # the mutations did break images

    # The pool still serves a good image.
    good = Task(
        job_id="after", attempt=1, kind="image.info", inputs={"image": picture(size=(30, 20))}
    )
    outcome = await pool.run(good, threading.Event(), lambda f, m: None)
    assert isinstance(outcome, job_pb2.JobResult)
    assert json.loads(outcome.metadata_json)["width"] == 30
