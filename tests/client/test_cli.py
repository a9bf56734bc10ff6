"""The `jobmesh` command against a scripted gateway: output, files written, exit codes."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import grpc
import pytest

from jobmesh import InvalidArgument, JobFailed, NotFound, ResourceExhausted, Unavailable
from jobmesh.cli import describe, exit_code, main
from jobmesh.v1 import admin_service_pb2, job_pb2
from tests.client.fake_gateway import FakeGateway


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (JobFailed("j1", "FAILED", "HANDLER_ERROR", "boom"), 1, "job j1 FAILED: [HANDLER_ERROR]"),
        (InvalidArgument("must not be empty", "spec.kind"), 2, "INVALID_ARGUMENT: spec.kind: must"),
        (NotFound("no job j1"), 3, "NOT_FOUND: no job j1"),
        (Unavailable("connection refused"), 3, "UNAVAILABLE: connection refused"),
        (ResourceExhausted("queue full"), 3, "refused because of a limit: queue full"),
    ],
)
def test_errors_map_to_exit_codes_and_one_line(error: Exception, code: int, line: str) -> None:
    assert isinstance(error, (JobFailed, InvalidArgument, NotFound, Unavailable, ResourceExhausted))
    assert exit_code(error) == code
    assert line in describe(error)


def test_an_unexpected_status_is_exit_code_3() -> None:
    error = Unavailable("x")
    error.code = grpc.StatusCode.PERMISSION_DENIED
    assert exit_code(error) == 3
    assert describe(error) == "PERMISSION_DENIED: x"


def test_submit_wait_shows_progress_and_writes_the_outputs(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "photo.jpg"
    source.write_bytes(b"jpeg bytes")
    out = tmp_path / "out"
    argv = ["submit", "echo", "-p", "n=3", "--input", str(source), "--wait", "--output", str(out)]
    assert main([*argv, "--gateway", gateway]) == 0
    captured = capsys.readouterr()
    assert captured.out == "job-1\n"
    assert "#5 SUCCEEDED attempt 1 on w1 outputs: photo.jpg (10 B)" in captured.err
    assert "no worker serves it yet" in captured.err
    assert (out / "photo.jpg").read_bytes() == b"jpeg bytes"


def test_a_job_that_fails_exits_1_with_its_error(
    gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "fail", "--wait", "--gateway", gateway]) == 1
    assert capsys.readouterr().err.endswith("jobmesh: job job-1 FAILED: [HANDLER_ERROR] boom\n")


def test_an_output_name_that_could_escape_is_not_written(
    fake: FakeGateway, gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["submit", "echo", "--input", f"../evil={__file__}", "--input", f"ok={__file__}"]
    assert main([*argv, "--wait", "--output", str(out), "--gateway", gateway]) == 2
    assert "refusing to write output named '../evil'" in capsys.readouterr().err
    assert not out.exists()


def test_watch_json_prints_one_event_per_line(
    fake: FakeGateway, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = fake.add(job_pb2.JobSpec(kind="echo", inputs={"a": b"xyz"}))
    assert main(["watch", job.id, "--after-seq", "2", "--json", "--gateway", gateway]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in events] == ["3", "4", "5"]
    assert events[-1]["result"]["outputs"] == {"a": "eHl6"}


def test_watch_of_an_ended_job_exits_by_how_it_ended(
    fake: FakeGateway, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = fake.add(job_pb2.JobSpec(kind="fail"))
    assert main(["watch", job.id, "--after-seq", "5", "--gateway", gateway]) == 1
    assert "FAILED: [HANDLER_ERROR] boom" in capsys.readouterr().err


def test_get_shows_outputs_as_names_and_sizes(
    fake: FakeGateway, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = fake.add(job_pb2.JobSpec(kind="echo", inputs={"big.bin": b"\0" * 2048}))
    assert main(["get", job.id, "--gateway", gateway]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED (attempt 1)" in out
    assert "outputs   big.bin (2.0 KiB)" in out
    assert main(["get", job.id, "--json", "--gateway", gateway]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "JOB_STATE_SUCCEEDED"


def test_list_pages_up_to_the_limit_and_tells_how_to_go_on(
    fake: FakeGateway, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        fake.add(job_pb2.JobSpec(kind="echo", labels={"team": "web"}))
    assert main(["list", "--limit", "2", "--gateway", gateway]) == 0
    captured = capsys.readouterr()
    rows = captured.out.splitlines()
    assert rows[0].split() == [
        "ID", "KIND", "STATE", "ATTEMPT", "PROGRESS", "PRIORITY", "CREATED", "LABELS"
    ]  # fmt: skip
    assert [r.split()[0] for r in rows[1:]] == ["job-3", "job-2"]
    assert "--page-token 2" in captured.err
    assert main(["list", "--page-token", "2", "--json", "--gateway", gateway]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)["jobs"]] == ["job-1"]


def test_workers_shows_a_table(
    fake: FakeGateway, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = admin_service_pb2.Worker(worker_id="embedded-0", slots=4, active_jobs=1)
    busy.kinds.add(kind="echo")
    busy.kinds.add(kind="sleep", max_concurrency=2)
    busy.stats.rss_bytes = 50 * 1024 * 1024
    busy.stats.cpu_percent = 12.4
    busy.last_pong_time.FromSeconds(int(time.time()) - 90)
    new = admin_service_pb2.Worker(worker_id="embedded-1", slots=1)
    fake.workers += [busy, new]
    assert main(["workers", "--gateway", gateway]) == 0
    rows = [row.split() for row in capsys.readouterr().out.splitlines()[1:]]
    assert rows[0][:-2] == [
        "embedded-0", "UNSPECIFIED", "echo,", "sleep(2)", "4", "1", "12", "50.0", "MiB"
    ]  # fmt: skip
    assert rows[0][-2].startswith("1m3")
    assert rows[1] == ["embedded-1", "UNSPECIFIED", "1", "0", "-", "-", "never"]


def test_failed_calls_print_their_code_and_exit_by_it(
    gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["get", "nope", "--gateway", gateway]) == 3
    assert capsys.readouterr().err == "jobmesh: NOT_FOUND: no job nope\n"
    assert main(["submit", "", "--gateway", gateway]) == 2
    assert capsys.readouterr().err == "jobmesh: INVALID_ARGUMENT: spec.kind: must not be empty\n"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    assert main(["list", "--gateway", closed]) == 3
    assert capsys.readouterr().err.startswith("jobmesh: UNAVAILABLE: ")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "echo", "--output", "dir"]) == 2
    assert "--output: needs --wait" in capsys.readouterr().err
    for argv in (["submit", "echo", "-p", "novalue"], ["get"], ["list", "--state", "done"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
