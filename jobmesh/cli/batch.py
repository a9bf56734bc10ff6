"""One kind run over many files: submitted in batches, followed at once, each job's end
handed to the caller as it happens."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, Protocol

from jobmesh.client import AsyncClient
from jobmesh.convert import SpecOptions, is_terminal, job_spec, terminal_event
from jobmesh.errors import InvalidArgument, JobmeshError
from jobmesh.v1 import job_pb2

# The gateway takes at most 1000 jobs per SubmitBatch; smaller batches start work sooner.
MAX_BATCH_JOBS = 500
# Jobs followed at once; the others wait their turn, and their events are replayed then.
MAX_WATCHES = 64
# Large inputs streamed up at once.
MAX_UPLOADS = 4


@dataclass(frozen=True)
class Item:
    """One job of a batch: what the user calls it, and the files it sends."""

    name: str
    """How lines and JSON name it: the file as it was given."""
    files: Mapping[str, Path]
    """The job's inputs: input name → file."""
    sizes: Mapping[str, int]
    """Input name → bytes: small inputs ride in SubmitBatch, large ones are uploaded."""

    @classmethod
    def of(cls, name: str, files: Mapping[str, Path]) -> Item:
        """An item whose files exist; InvalidArgument naming the first that does not."""
        sizes: dict[str, int] = {}
        for input_name, path in files.items():
            try:
                stat = path.stat()
            except OSError as e:
                raise InvalidArgument(e.strerror or str(e), str(path)) from None
            if not S_ISREG(stat.st_mode):
                raise InvalidArgument("not a file", str(path))
            sizes[input_name] = stat.st_size
        return cls(name, dict(files), sizes)

    def inline_bytes(self, inline_limit: int) -> int:
        return sum(size for size in self.sizes.values() if size <= inline_limit)


@dataclass(frozen=True)
class Outcome:
    """How one item's job ended."""

    item: Item
    job_id: str
    end: job_pb2.JobEvent
    """The terminal event: SUCCEEDED with the result, else the error."""


class Tracker(Protocol):
    """What the batch tells whoever shows it."""

    def progress(self, job_id: str, fraction: float) -> None: ...

    def note(self, line: str) -> None: ...


def chunks(items: Sequence[Item], max_bytes: int, inline_limit: int) -> Iterator[Sequence[Item]]:
    """Runs of at most MAX_BATCH_JOBS items whose inline inputs add up to `max_bytes` at most
    (each input is at most `inline_limit`, far less)."""
    start, size = 0, 0
    for i, item in enumerate(items):
        inline = item.inline_bytes(inline_limit)
        if i > start and (i - start == MAX_BATCH_JOBS or size + inline > max_bytes):
            yield items[start:i]
            start, size = i, 0
        size += inline
    if start < len(items):
        yield items[start:]


async def run(
    client: AsyncClient,
    kind: str,
    params: Mapping[str, Any],
    options: SpecOptions,
    items: Sequence[Item],
    tracker: Tracker,
    on_end: Callable[[Outcome], Awaitable[None]],
) -> None:
    """Submits a job per item and calls `on_end` as each ends.

    A submit refused after earlier batches went through still lets those jobs be followed
    to their end; then its error is raised.
    """
    queue: asyncio.Queue[tuple[Item, str] | None] = asyncio.Queue()
    watchers = min(MAX_WATCHES, len(items))
    # Half the limit leaves room for everything in a request besides the inputs.
    max_bytes = client.settings.max_message_bytes // 2
    uploads = asyncio.Semaphore(MAX_UPLOADS)
    refused: list[JobmeshError] = []
    warned: set[str] = set()

    async def submit() -> None:
        try:
            for chunk in chunks(items, max_bytes, client.settings.inline_limit):
                specs = await asyncio.gather(
                    *(_spec(client, kind, params, options, item, uploads) for item in chunk)
                )
                submitted = await client.submit_batch(specs)
                for item, result in zip(chunk, submitted, strict=True):
                    for warning in set(result.warnings) - warned:
                        warned.add(warning)
                        tracker.note(f"jobmesh: warning: {warning}")
                    queue.put_nowait((item, result.job.id))
        except JobmeshError as e:
            refused.append(e)
        finally:
            for _ in range(watchers):
                queue.put_nowait(None)

    async def follow() -> None:
        while (entry := await queue.get()) is not None:
            item, job_id = entry
            await on_end(Outcome(item, job_id, await _end(client, job_id, tracker)))

    tasks = [asyncio.create_task(submit())]
    tasks += [asyncio.create_task(follow()) for _ in range(watchers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if refused:
        raise refused[0]


async def _spec(
    client: AsyncClient,
    kind: str,
    params: Mapping[str, Any],
    options: SpecOptions,
    item: Item,
    uploads: asyncio.Semaphore,
) -> job_pb2.JobSpec:
    """The item's job: small files inline, large ones streamed up first as blobs."""
    limit = client.settings.inline_limit
    inline = {name: path for name, path in item.files.items() if item.sizes[name] <= limit}
    inputs = await asyncio.to_thread(_read, inline)
    spec = job_spec(kind, params=params, inputs=inputs, **options).spec
    for name, path in item.files.items():
        if name not in inline:
            async with uploads:
                spec.input_blobs[name].CopyFrom((await client.upload(path)).proto)
    return spec


def _read(files: Mapping[str, Path]) -> dict[str, bytes]:
    inputs: dict[str, bytes] = {}
    for name, path in files.items():
        try:
            inputs[name] = path.read_bytes()
        except OSError as e:
            raise InvalidArgument(e.strerror or str(e), str(path)) from None
    return inputs


async def _end(client: AsyncClient, job_id: str, tracker: Tracker) -> job_pb2.JobEvent:
    """Follows the job, passing on its progress; returns its terminal event."""
    last: job_pb2.JobEvent | None = None
    async for watched in client.watch(job_id):
        event = watched.proto
        if event.type == job_pb2.JOB_EVENT_TYPE_PROGRESS:
            tracker.progress(job_id, event.progress)
        elif event.state == job_pb2.JOB_STATE_QUEUED:
            tracker.progress(job_id, 0.0)  # a retry starts over
        last = event
    if last is not None and is_terminal(last.state):
        return last
    return terminal_event((await client.get(job_id)).proto)
