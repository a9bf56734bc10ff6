"""The jobmesh demo: `jobmesh serve`, a job with live progress, a batch, workers and jobs.

`make demo` runs it. The server gets a free port and a throwaway database, so nothing of
yours is touched, and it is stopped the way a user would stop it (SIGTERM: the workers
drain, then the gateway stops). Each step is a function in STEPS; add one to show more.
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

from jobmesh import Client, job_spec

ROOT = Path(__file__).resolve().parent.parent
JOBMESH = (sys.executable, "-m", "jobmesh")
WORKERS = 2
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


def heading(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def jobmesh(address: str, *argv: str) -> None:
    """Runs the `jobmesh` command as a user would type it; stops the demo if it fails."""
    print(f"$ jobmesh {shlex.join(argv)}", flush=True)
    env = {**os.environ, "JOBMESH_GATEWAY": address}
    subprocess.run([*JOBMESH, *argv], cwd=ROOT, env=env, check=True)


def live_progress(address: str) -> None:
    heading("A job with live progress")
    jobmesh(address, "submit", "sleep", "-p", "seconds=3", "--wait")


def echo_batch(address: str) -> None:
    heading("A batch of echo jobs through the Python SDK")
    print("client.submit_batch([job_spec('echo', ...) for i in range(5)])")
    with Client(address) as client:
        specs = [
            job_spec("echo", params={"n": i}, inputs={"text": f"hello {i}".encode()})
            for i in range(5)
        ]
        for submitted in client.submit_batch(specs):
            job = client.wait(submitted.job.id, check=True)
            print(f"  {job.id} on {job.worker_id}: {job.result.outputs['text'].decode()!r}")


def workers(address: str) -> None:
    heading("The worker replicas")
    jobmesh(address, "workers")


def jobs(address: str) -> None:
    heading("The jobs")
    jobmesh(address, "list")


STEPS: list[Callable[[str], None]] = [live_progress, echo_batch, workers, jobs]


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
                step(address)
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
