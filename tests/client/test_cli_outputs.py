"""What the CLI writes from a job's result: only outputs named by the gateway's own rule,
and never a worker-supplied extension with anything but letters and digits in it.

A real JobService on loopback answers with the results to refuse (the real gateway and
worker would refuse them first): the CLI must hold on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobmesh.cli import main
from jobmesh.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

JOB_ID = "0123456789abcdef0123456789abcdef"


class _Jobs(job_service_pb2_grpc.JobServiceServicer):
    """Takes any job; each ends SUCCEEDED with `result`."""

    def __init__(self) -> None:
        self.result = job_pb2.JobResult()

    def _job(self, spec: job_pb2.JobSpec, n: int = 0) -> job_pb2.Job:
        return job_pb2.Job(id=f"{JOB_ID[:-2]}{n:02d}", spec=spec, state=job_pb2.JOB_STATE_QUEUED)

    def Submit(
        self, request: job_service_pb2.SubmitRequest, context: Any
    ) -> job_service_pb2.SubmitResponse:
        return job_service_pb2.SubmitResponse(job=self._job(request.spec))

    def SubmitBatch(
        self, request: job_service_pb2.SubmitBatchRequest, context: Any
    ) -> job_service_pb2.SubmitBatchResponse:
        return job_service_pb2.SubmitBatchResponse(
            results=[
                job_service_pb2.SubmitResponse(job=self._job(spec, n))
                for n, spec in enumerate(request.specs)
            ]
        )

    def Watch(
        self, request: job_service_pb2.WatchRequest, context: Any
    ) -> Iterator[job_service_pb2.WatchResponse]:
        yield job_service_pb2.WatchResponse(
            event=job_pb2.JobEvent(
                job_id=request.job_id,
                seq=1,
                type=job_pb2.JOB_EVENT_TYPE_STATE,
                state=job_pb2.JOB_STATE_SUCCEEDED,
                attempt=1,
                result=self.result,
            )
        )


@pytest.fixture
def jobs() -> Iterator[tuple[_Jobs, str]]:
    servicer = _Jobs()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_an_output_name_that_is_not_a_payload_name_is_not_written(
    jobs: tuple[_Jobs, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, address = jobs
    out = tmp_path / "out"
    submit = ["submit", "echo", "--gateway", address, "--wait", "--output", str(out)]

    servicer.result = job_pb2.JobResult(outputs={"fine.txt": b"fine"})
    assert main(submit) == 0
    assert (out / "fine.txt").read_bytes() == b"fine"

    for name in ("a..b", "new\nline.txt"):
        servicer.result = job_pb2.JobResult(outputs={"other.txt": b"x", name: b"gotcha"})
        capsys.readouterr()
        assert main(submit) == 3
        line = capsys.readouterr().err.splitlines()[-1]
        assert line == (
            f"jobmesh: refusing to write output named {name!r}: not an output name (letters, "
            "digits, '._ -', at most 128, no '..')"
        )
        # Nothing of that result is written, not even the harmless output.
        assert sorted(p.name for p in out.iterdir()) == ["fine.txt"]


@pytest.mark.parametrize("extension", ["png\nevil", "../x", "p.ng", "x" * 11, "\x1b[31mpng"])
def test_an_image_whose_extension_is_not_letters_and_digits_is_not_written(
    jobs: tuple[_Jobs, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], extension: str
) -> None:
    servicer, address = jobs
    src = tmp_path / "photo.jpg"
    src.write_bytes(b"\xff\xd8not really a jpeg")

    def convert(out: Path) -> int:
        return main(
            ["image", "convert", str(src), "--format", "png", "-o", str(out), "--gateway", address]
        )

    servicer.result = job_pb2.JobResult(
        outputs={"image": b"png bytes"},
        metadata_json=json.dumps({"format": "PNG", "extension": "png"}),
    )
    assert convert(tmp_path / "ok") == 0
    assert [p.name for p in (tmp_path / "ok").iterdir()] == ["photo.png"]

    servicer.result.metadata_json = json.dumps({"format": "PNG", "extension": extension})
    capsys.readouterr()
    assert convert(tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert (
        f"jobmesh: {src}: NOT_WRITTEN: refusing the extension {extension!r} the job gave "
        "(at most 10 letters and digits)"
    ) in err
    assert list((tmp_path / "out").iterdir()) == []
