"""The `jobmesh` command, run as a user runs it, against real gateway and worker processes:
what it prints, the files it writes, its exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from jobmesh import Client, InvalidArgument, JobFailed, NotFound, ResourceExhausted, Unavailable
from jobmesh.cli import describe, exit_code, main
from jobmesh.v1 import job_pb2
from tests.cluster import Cluster

JOBMESH = Path(sys.executable).parent / "jobmesh"


def jobmesh(
    gateway: str, *argv: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the installed `jobmesh` command with $JOBMESH_GATEWAY pointing at `gateway`."""
    env = {**os.environ, "JOBMESH_GATEWAY": gateway}
    return subprocess.run(
        [str(JOBMESH), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def test_submit_echo_waits_and_writes_its_outputs(cluster: Cluster, tmp_path: Path) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8jpeg bytes")
    out = tmp_path / "out"
    done = jobmesh(
        gw.address, "submit", "echo", "-p", "text=hi", "--input", str(photo), "--wait",
        "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [job_id] = done.stdout.split()
    assert "SUCCEEDED attempt 1 on w1 outputs: photo.jpg (12 B)" in done.stderr
    assert f"jobmesh: wrote {out / 'photo.jpg'} (12 B)" in done.stderr
    assert [p.name for p in out.iterdir()] == ["photo.jpg"]
    assert (out / "photo.jpg").read_bytes() == photo.read_bytes()
    shown = json.loads(jobmesh(gw.address, "get", job_id, "--json").stdout)
    assert shown["result"]["metadata"] == {"text": "hi"}


def test_submit_sleep_waits_showing_progress(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    done = jobmesh(gw.address, "submit", "sleep", "-p", "seconds=0.5", "--wait")
    assert done.returncode == 0, done.stderr
    assert "progress 50%" in done.stderr
    assert done.stderr.splitlines()[-1].endswith("SUCCEEDED attempt 1 on w1")

    done = jobmesh(gw.address, "submit", "sleep", "-p", "seconds=0.5", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    [submitted, *events] = [json.loads(line) for line in done.stdout.splitlines()]
    assert submitted["job"]["state"] == "QUEUED"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    progress = [e["progress"] for e in events if e["type"] == "PROGRESS"]
    assert progress == pytest.approx([i / 10 for i in range(1, 11)])
    assert events[-1]["state"] == "SUCCEEDED"
    assert events[-1]["result"]["metadata"] == {"slept": 0.5}


def test_submit_fail_waits_and_exits_1_with_the_error(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    done = jobmesh(gw.address, "submit", "fail", "-p", "message=boom", "--wait")
    assert done.returncode == 1
    [job_id] = done.stdout.split()
    assert done.stderr.endswith(f"jobmesh: job {job_id} FAILED: [FAILED_ON_PURPOSE] boom\n")


def test_a_job_with_an_output_name_that_could_escape_fails(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--handlers", "tests.client.handlers")
    out = tmp_path / "out"
    done = jobmesh(gw.address, "submit", "escaping-outputs", "--wait", "--output", str(out))
    assert done.returncode == 1
    [job_id] = done.stdout.split()
    # The worker refuses it before sending, by the rule the gateway and the CLI apply too.
    assert done.stderr.endswith(
        f"jobmesh: job {job_id} FAILED: [INVALID_RESULT] outputs: '../evil' is not an output "
        "name (letters, digits, '._ -', at most 128, no '..')\n"
    )
    # Nothing is written, not even the harmless output.
    assert not out.exists()
    assert not (tmp_path / "evil").exists()


def test_watch_follows_a_job_and_exits_by_how_it_ended(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    running = jobmesh(gw.address, "submit", "sleep", "-p", "seconds=1").stdout.strip()
    live = jobmesh(gw.address, "watch", running)
    assert live.returncode == 0, live.stderr
    assert "progress 100%" in live.stderr
    assert live.stderr.splitlines()[-1].endswith("SUCCEEDED attempt 1 on w1")

    failed = jobmesh(gw.address, "submit", "fail", "-p", "message=boom", "--wait").stdout.strip()
    watched = jobmesh(gw.address, "watch", failed)
    assert watched.returncode == 1
    assert watched.stderr.endswith(f"jobmesh: job {failed} FAILED: [FAILED_ON_PURPOSE] boom\n")

    last = json.loads(jobmesh(gw.address, "get", running, "--json").stdout)["event_seq"]
    tail = jobmesh(gw.address, "watch", running, "--after-seq", str(last - 2), "--json")
    assert tail.returncode == 0
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [e["seq"] for e in events] == [last - 1, last]
    assert events[-1]["state"] == "SUCCEEDED"
    # Past the last event there is nothing to show, but the exit code still tells the outcome.
    assert jobmesh(gw.address, "watch", running, "--after-seq", str(last)).returncode == 0
    assert jobmesh(gw.address, "watch", failed, "--after-seq", "99").returncode == 1


def test_get_shows_the_job_its_attempts_and_outputs_as_sizes(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    with Client(gw.address) as client:
        job_id = client.submit(
            "echo", inputs={"big.bin": b"\0" * 2048}, labels={"team": "web"}
        ).job.id
        client.wait(job_id)
    shown = jobmesh(gw.address, "get", job_id)
    assert shown.returncode == 0
    rows = {
        line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if line[:1].strip()
    }
    assert rows["job"] == [job_id]
    assert rows["state"] == ["SUCCEEDED", "(attempt", "1)"]
    assert rows["labels"] == ["team=web"]
    assert rows["outputs"] == ["big.bin", "(2.0", "KiB)"]
    assert rows["attempts"][:3] == ["#", "worker", "started"]
    assert "\0" not in shown.stdout

    as_json = json.loads(jobmesh(gw.address, "get", job_id, "--json").stdout)
    assert as_json["state"] == "SUCCEEDED"
    assert [a["worker_id"] for a in as_json["attempts"]] == ["w1"]


def test_cancel_ends_a_running_job_and_is_idempotent(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=1)
    job_id = jobmesh(gw.address, "submit", "sleep", "-p", "seconds=60").stdout.strip()
    with Client(gw.address) as client:
        for event in client.watch(job_id):
            if event.state == job_pb2.JOB_STATE_RUNNING:
                break
    cancelled = jobmesh(gw.address, "cancel", job_id, "--reason", "not needed")
    assert cancelled.returncode == 0
    assert cancelled.stdout == f"{job_id} CANCELLED\n"
    watched = jobmesh(gw.address, "watch", job_id)
    assert watched.returncode == 1
    assert watched.stderr.endswith(f"jobmesh: job {job_id} CANCELLED: [CANCELLED] not needed\n")
    again = jobmesh(gw.address, "cancel", job_id)
    assert (again.returncode, again.stdout) == (0, f"{job_id} CANCELLED\n")
    # The worker's only slot is free again.
    assert jobmesh(gw.address, "submit", "echo", "--wait").returncode == 0


def test_list_pages_up_to_the_limit_and_tells_how_to_go_on(cluster: Cluster) -> None:
    gw = cluster.gateway()  # no worker: the jobs stay queued
    web = []
    for _ in range(3):
        submitted = jobmesh(gw.address, "submit", "echo", "--label", "team=web")
        assert submitted.stderr.startswith("jobmesh: warning: no worker serving kind 'echo'")
        web.append(submitted.stdout.strip())
    jobmesh(gw.address, "submit", "echo", "--label", "team=ops")

    first = jobmesh(gw.address, "list", "--label", "team=web", "--limit", "2")
    assert first.returncode == 0
    [header, *rows] = [line.split() for line in first.stdout.splitlines()]
    assert header == ["ID", "KIND", "STATE", "ATTEMPT", "PROGRESS", "PRIORITY", "CREATED", "LABELS"]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [
        (web[2], "echo", "QUEUED", "team=web"),
        (web[1], "echo", "QUEUED", "team=web"),
    ]
    prefix = "jobmesh: more with --page-token "
    assert first.stderr.startswith(prefix)
    token = first.stderr.removeprefix(prefix).strip()

    rest = jobmesh(gw.address, "list", "--label", "team=web", "--page-token", token, "--json")
    assert rest.returncode == 0
    page = json.loads(rest.stdout)
    assert [j["id"] for j in page["jobs"]] == [web[0]]
    assert page["next_page_token"] == ""


def test_workers_shows_the_attached_replicas(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--products", "builtin", slots=2)
    shown = jobmesh(gw.address, "workers")
    assert shown.returncode == 0
    [header, row] = shown.stdout.splitlines()
    assert header.split()[:4] == ["ID", "STATE", "KINDS", "SLOTS"]
    assert row.split()[:6] == ["w1", "ACTIVE", "echo,", "fail,", "sleep", "2"]

    [worker] = json.loads(jobmesh(gw.address, "workers", "--json").stdout)["workers"]
    assert worker["worker_id"] == "w1"
    assert worker["slots"] == 2
    assert {k["kind"] for k in worker["kinds"]} == {"echo", "fail", "sleep"}


def test_failed_calls_print_one_line_and_exit_by_their_code(cluster: Cluster) -> None:
    gw = cluster.gateway()
    for argv in (["get", "nope"], ["watch", "nope"], ["cancel", "nope"]):
        done = jobmesh(gw.address, *argv)
        assert (done.returncode, done.stderr) == (3, "jobmesh: NOT_FOUND: job 'nope' not found\n")
    bad_kind = jobmesh(gw.address, "submit", "no such kind")
    assert bad_kind.returncode == 2
    assert bad_kind.stderr.startswith(
        "jobmesh: INVALID_ARGUMENT: spec.kind: 'no such kind' is not a kind"
    )
    assert len(bad_kind.stderr.splitlines()) == 1
    empty = jobmesh(gw.address, "submit", "")
    assert (empty.returncode, empty.stderr) == (
        2,
        "jobmesh: INVALID_ARGUMENT: spec.kind: must not be empty\n",
    )
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    unreachable = jobmesh(closed, "list")
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith("jobmesh: UNAVAILABLE: ")
    assert len(unreachable.stderr.splitlines()) == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "echo", "--output", "dir"]) == 2
    assert "--output: needs --wait" in capsys.readouterr().err
    for argv in (["submit", "echo", "-p", "novalue"], ["get"], ["list", "--state", "done"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2


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


def test_submit_streams_a_large_file_up_and_its_output_down(
    cluster: Cluster, tmp_path: Path
) -> None:
    gw = cluster.gateway("--max-message-bytes", str(1 << 21))
    cluster.worker(gw, "w1")
    data = os.urandom(5 << 20)  # over twice the gateway's message limit
    (tmp_path / "big.bin").write_bytes(data)
    out = tmp_path / "out"
    done = jobmesh(
        gw.address,
        "submit",
        "echo",
        "--input",
        str(tmp_path / "big.bin"),
        "--wait",
        "--output",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert (out / "big.bin").read_bytes() == data
