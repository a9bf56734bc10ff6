"""The CLI fails fast and cleanly, as a user runs it: a closed pipe, output piped into a file,
a gateway that is down."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from jobmesh import Client, Unavailable, job_spec
from tests.client.test_cli import JOBMESH, jobmesh
from tests.cluster import Cluster


def piped_to_head(gateway: str, *argv: str) -> tuple[int, str, str]:
    """`jobmesh ARGV | head -1`: jobmesh's exit code and stderr, and what head printed."""
    env = {**os.environ, "JOBMESH_GATEWAY": gateway}
    with subprocess.Popen(
        [str(JOBMESH), *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as cli:
        assert cli.stdout is not None
        assert cli.stderr is not None
        head = subprocess.run(
            ["head", "-1"], stdin=cli.stdout, capture_output=True, text=True, timeout=20
        )
        cli.stdout.close()  # only head reads it now: when head exits, the pipe is closed
        code = cli.wait(timeout=20)
        return code, cli.stderr.read().decode(), head.stdout


def closed_port() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_closed_pipe_ends_quietly_with_exit_0(cluster: Cluster) -> None:
    gw = cluster.gateway()
    # More than a pipe's buffer holds, so that writing meets the closed end.
    with Client(gw.address) as client:
        client.submit_batch([job_spec("echo", labels={"padding": "x" * 200}) for _ in range(300)])
    for argv in (
        ["top", "--json", "--interval", "0.1"],
        ["top", "--interval", "0.1"],
        ["list", "--json", "--limit", "300"],
        ["list", "--limit", "300"],
    ):
        code, err, head = piped_to_head(gw.address, *argv)
        assert (code, err) == (0, ""), argv
        assert head.startswith("{" if "--json" in argv else ("jobmesh top", "ID")), argv


def test_lines_piped_into_a_file_are_not_wrapped(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    message = " ".join(["a long message"] * 12)
    failed = jobmesh(gw.address, "submit", "fail", "-p", f"message={message}", "--wait")
    assert failed.returncode == 1
    [event] = [line for line in failed.stderr.splitlines() if " FAILED attempt 1 " in line]
    assert event.endswith(f"[FAILED_ON_PURPOSE] {message}")

    label = "x" * 150
    jobmesh(gw.address, "submit", "echo", "--label", f"long={label}")
    listed = jobmesh(gw.address, "list", "--kind", "echo")
    [_, row] = listed.stdout.splitlines()
    assert row.split()[-1] == f"long={label}"


@pytest.mark.parametrize(
    "argv", [["watch", "0123456789abcdef0123456789abcdef"], ["top"], ["top", "--json"]]
)
def test_streams_against_a_gateway_that_is_down_fail_like_a_unary_call(argv: list[str]) -> None:
    # The subprocess's timeout is the only bound: the stream used to retry for a minute.
    done = jobmesh(closed_port(), *argv, timeout=20)
    assert done.returncode == 3
    assert done.stderr.startswith("jobmesh: UNAVAILABLE: ")
    assert len(done.stderr.splitlines()) == 1
    assert done.stdout == ""


def test_the_streams_of_the_sdk_fail_at_once_when_the_gateway_is_down() -> None:
    with Client(closed_port()) as client:
        with pytest.raises(Unavailable):
            next(iter(client.watch("0123456789abcdef0123456789abcdef")))
        with pytest.raises(Unavailable):
            next(iter(client.watch_stats(0.5)))
