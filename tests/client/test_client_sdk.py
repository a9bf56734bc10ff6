"""The SDK against an in-process fake gateway (a real grpc.aio server on port 0, no
processes): inputs as paths, downloads to paths or files, the types it hands out, and
every failure a JobmeshError."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobmesh import (
    AsyncClient,
    BlobRef,
    Client,
    ClientSettings,
    FailedPrecondition,
    InvalidArgument,
    Job,
    JobFailed,
    JobState,
    NotFound,
    Unavailable,
    job_spec,
)
from jobmesh.v1 import (
    blob_service_pb2,
    blob_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

BROKEN = "f" * 64  # a blob whose download fails half-way


@dataclass
class FakeGateway(
    job_service_pb2_grpc.JobServiceServicer, blob_service_pb2_grpc.BlobServiceServicer
):
    """Keeps what it is sent; answers Get and List from `jobs`."""

    address: str = ""
    specs: list[job_pb2.JobSpec] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    uploads: int = 0
    jobs: dict[str, job_pb2.Job] = field(default_factory=dict)

    def _accept(self, spec: job_pb2.JobSpec) -> job_service_pb2.SubmitResponse:
        self.specs.append(spec)
        job = job_pb2.Job(id=f"j{len(self.specs)}", spec=spec, state=job_pb2.JOB_STATE_QUEUED)
        self.jobs[job.id] = job
        return job_service_pb2.SubmitResponse(job=job)

    async def Submit(self, request: Any, context: Any) -> job_service_pb2.SubmitResponse:
        return self._accept(request.spec)

    async def SubmitBatch(self, request: Any, context: Any) -> Any:
        results = [self._accept(spec) for spec in request.specs]
        return job_service_pb2.SubmitBatchResponse(results=results)

    async def Get(self, request: Any, context: Any) -> job_service_pb2.GetResponse:
        if request.job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not found")
        return job_service_pb2.GetResponse(job=self.jobs[request.job_id])

    async def List(self, request: Any, context: Any) -> job_service_pb2.ListResponse:
        wanted = set(request.states)
        jobs = [j for j in self.jobs.values() if not wanted or j.state in wanted]
        return job_service_pb2.ListResponse(jobs=jobs[::-1])

    async def Upload(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        first = await anext(aiter(requests))
        yield blob_service_pb2.UploadResponse(ready=True)
        data = first.chunk + b"".join([r.chunk async for r in requests])
        assert len(data) == first.size
        self.uploads += 1
        blob_id = hashlib.sha256(data).hexdigest()
        self.blobs[blob_id] = data
        yield blob_service_pb2.UploadResponse(blob=job_pb2.BlobRef(id=blob_id, size=len(data)))

    async def Download(self, request: Any, context: Any) -> AsyncIterator[Any]:
        if request.blob_id == BROKEN:
            yield blob_service_pb2.DownloadResponse(chunk=b"half")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway went away")
        if request.blob_id not in self.blobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"blob {request.blob_id} not found")
        data = self.blobs[request.blob_id]
        for start in range(0, len(data), 1000):
            yield blob_service_pb2.DownloadResponse(chunk=data[start : start + 1000])


@pytest.fixture
async def fake() -> AsyncIterator[FakeGateway]:
    gateway = FakeGateway()
    server = grpc.aio.server()
    job_service_pb2_grpc.add_JobServiceServicer_to_server(gateway, server)
    blob_service_pb2_grpc.add_BlobServiceServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gateway.address = f"127.0.0.1:{port}"
    try:
        yield gateway
    finally:
        await server.stop(None)


def _client(fake: FakeGateway, inline_limit: int = 1000) -> AsyncClient:
    return AsyncClient(settings=ClientSettings(gateway=fake.address, inline_limit=inline_limit))


async def test_inputs_may_be_paths_in_submit_batch_small_read_large_streamed_up(
    fake: FakeGateway, tmp_path: Path
) -> None:
    small, large = tmp_path / "small.txt", tmp_path / "large.bin"
    small.write_bytes(b"hello")
    large.write_bytes(bytes(range(256)) * 20)  # over the 1000-byte inline limit
    spec = job_spec("echo", inputs={"s": str(small), "l": large, "b": b"x" * 2000, "i": b"in"})
    async with _client(fake) as client:
        # The same request thrice: the large file goes up once, and the request is not changed.
        submitted = await client.submit_batch([spec, spec, spec])
    assert [s.job.state for s in submitted] == [JobState.QUEUED] * 3
    assert fake.uploads == 1 + 3  # the file once; the large bytes, which are not files, each time
    sent = fake.specs[0]
    assert dict(sent.inputs) == {"s": b"hello", "i": b"in"}
    assert set(sent.input_blobs) == {"l", "b"}
    assert fake.blobs[sent.input_blobs["l"].id] == large.read_bytes()
    assert fake.blobs[sent.input_blobs["b"].id] == b"x" * 2000
    assert spec.files == {"s": small, "l": large}
    assert dict(spec.spec.inputs) == {"b": b"x" * 2000, "i": b"in"}
    # Raw messages are still taken as they are.
    raw_spec = job_pb2.JobSpec(kind="echo", inputs={"in": b"raw"})
    async with _client(fake) as client:
        [raw] = await client.submit_batch([raw_spec])
    assert raw.job.spec.inputs == {"in": b"raw"}


async def test_a_missing_input_file_is_an_invalid_argument_naming_the_input(
    fake: FakeGateway, tmp_path: Path
) -> None:
    async with _client(fake) as client:
        with pytest.raises(InvalidArgument, match="No such file") as caught:
            await client.submit("echo", inputs={"photo": tmp_path / "nope.jpg"})
        assert caught.value.field == "inputs.photo"
        # A file that goes away between job_spec and the submit.
        gone = tmp_path / "gone.bin"
        gone.write_bytes(b"soon gone")
        spec = job_spec("echo", inputs={"g": gone})
        gone.unlink()
        with pytest.raises(InvalidArgument, match=r"gone\.bin") as caught:
            await client.submit_batch([spec])
        assert caught.value.field == "inputs.g"
        with pytest.raises(InvalidArgument, match=r"nope\.jpg"):
            await client.upload(tmp_path / "nope.jpg")
    assert fake.specs == []


async def test_download_takes_a_path_or_a_binary_file(fake: FakeGateway, tmp_path: Path) -> None:
    data = bytes(range(256)) * 50
    async with _client(fake) as client:
        ref = await client.upload(data)
        assert ref == BlobRef(hashlib.sha256(data).hexdigest(), len(data))
        assert await client.download(ref.id) == data
        assert await client.download(ref.id, str(tmp_path / "a.bin")) == b""
        await client.download(ref.id, tmp_path / "b.bin")
        sink = io.BytesIO()
        await client.download(ref.id, sink)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert (tmp_path / "b.bin").read_bytes() == data
    assert sink.getvalue() == data


async def test_a_download_to_a_path_writes_all_or_nothing(
    fake: FakeGateway, tmp_path: Path
) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"before")
    async with _client(fake) as client:
        with pytest.raises(Unavailable):
            await client.download(BROKEN, target)
        with pytest.raises(NotFound):
            await client.download("0" * 64, tmp_path / "new.bin")
        with pytest.raises(InvalidArgument, match="No such file") as caught:
            await client.download("0" * 64, tmp_path / "no" / "dir.bin")
        assert caught.value.field == "sink"
    assert target.read_bytes() == b"before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # noqa: ASYNC240


async def test_outputs_downloads_the_blobs(fake: FakeGateway) -> None:
    async with _client(fake) as client:
        ref = await client.upload(b"large" * 1000)
        message = job_pb2.Job(
            id="done",
            state=job_pb2.JOB_STATE_SUCCEEDED,
            result=job_pb2.JobResult(outputs={"small": b"s"}, output_blobs={"large": ref.proto}),
        )
        fake.jobs["done"] = message
        job = await client.wait("done", check=True)
        assert await client.outputs(job) == {"small": b"s", "large": b"large" * 1000}
        assert await client.outputs(replace(job, result=None)) == {}


async def test_wait_check_raises_job_failed_with_the_job(fake: FakeGateway) -> None:
    fake.jobs["bad"] = job_pb2.Job(
        id="bad",
        state=job_pb2.JOB_STATE_FAILED,
        error=job_pb2.JobError(code="FAILED_ON_PURPOSE", message="boom"),
    )
    async with _client(fake) as client:
        with pytest.raises(JobFailed, match=r"bad FAILED: \[FAILED_ON_PURPOSE\] boom") as caught:
            await client.wait("bad", check=True)
    assert caught.value.job is not None
    assert caught.value.job.state is JobState.FAILED


async def test_list_hands_out_jobs_even_with_params_it_cannot_decode(fake: FakeGateway) -> None:
    fake.jobs["a"] = job_pb2.Job(
        id="a", state=job_pb2.JOB_STATE_QUEUED, spec=job_pb2.JobSpec(params_json='{"n": 1}')
    )
    fake.jobs["b"] = job_pb2.Job(
        id="b", state=job_pb2.JOB_STATE_SUCCEEDED, spec=job_pb2.JobSpec(params_json="not json")
    )
    async with _client(fake) as client:
        jobs, token = await client.list(states=["queued", JobState.SUCCEEDED])
        everything = [job async for job in client.list_all()]
        with pytest.raises(InvalidArgument):
            await client.list(page_size=-1)
        with pytest.raises(InvalidArgument, match="interval"):
            await anext(client.watch_stats(float("nan")))
    assert [j.id for j in jobs] == [j.id for j in everything] == ["b", "a"]
    assert all(isinstance(j, Job) for j in jobs)
    assert jobs[1].spec.params == {"n": 1}
    with pytest.raises(InvalidArgument, match=r"job b: spec\.params_json: not JSON"):
        jobs[0].spec.params.get("n")
    assert token == ""


async def test_a_closed_client_raises_failed_precondition(fake: FakeGateway) -> None:
    client = _client(fake)
    await client.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        await client.get("x")
    with pytest.raises(FailedPrecondition, match="closed"):
        [e async for e in client.watch("x")]


def test_the_blocking_client_raises_jobmesh_errors_too() -> None:
    with pytest.raises(InvalidArgument, match="gateway: expected HOST:PORT"):
        Client("nowhere")
    client = Client("127.0.0.1:1")
    client.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        client.get("x")


def test_client_reads_the_gateway_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBMESH_GATEWAY", "10.1.2.3:7000")
    assert ClientSettings.from_env().gateway == "10.1.2.3:7000"
    monkeypatch.setenv("JOBMESH_GATEWAY", "")
    assert ClientSettings.from_env().gateway == "127.0.0.1:50051"
    monkeypatch.setenv("JOBMESH_GATEWAY", "no port")
    with pytest.raises(InvalidArgument, match="gateway"):
        ClientSettings.from_env()
