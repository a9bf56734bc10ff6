"""Real gateway and worker processes on loopback, for integration and fault tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from jobmesh.v1 import admin_service_pb2, admin_service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
# The lease of gateways on PostgreSQL in tests: a killed one's work moves within seconds.
PG_LEASE = "5"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("JOBMESH_GATEWAY", None)
    return env


@dataclass
class Proc:
    """A child process with its output in a log file."""

    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables set for this process on top of the test's environment."""

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env={**_env(), **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.popen is None:
            return None
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(10)

    def kill(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Gateway(Proc):
    port_file: Path = field(default_factory=Path)
    port: int = 0
    tls_ca: Path | None = None
    """The CA of the gateway's certificate, when it serves TLS."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.launch()
        self.wait_serving()

    def launch(self) -> None:
        """Starts the process without waiting for it to serve."""
        self.port_file.unlink(missing_ok=True)
        super().start()

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{self.output()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())

    def workers(self) -> list[admin_service_pb2.Worker]:
        if self.tls_ca is None:
            channel = grpc.insecure_channel(self.address)
        else:
            credentials = grpc.ssl_channel_credentials(self.tls_ca.read_bytes())
            channel = grpc.secure_channel(self.address, credentials)
        with channel:
            stub = admin_service_pb2_grpc.AdminServiceStub(channel)
            return list(stub.ListWorkers(admin_service_pb2.ListWorkersRequest(), timeout=5).workers)

    def wait_for_workers(self, worker_ids: set[str], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            attached = {w.worker_id for w in self.workers()}
            if worker_ids <= attached:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {worker_ids - attached} did not attach")
            time.sleep(0.05)


class Cluster:
    """Starts gateways and workers for one test; everything is stopped afterwards."""

    def __init__(self, tmp_path: Path, postgres: str = "") -> None:
        """Gateways keep their jobs in `tmp_path/jobmesh.db`, or in the PostgreSQL database
        `postgres` names (a URL), with their blobs in `tmp_path/blobs`."""
        self.tmp = tmp_path
        self.procs: list[Proc] = []
        self.db = tmp_path / "jobmesh.db"
        self.postgres = postgres
        self.blob_dir = tmp_path / "blobs" if postgres else Path(f"{self.db}.blobs")
        self._n = 0

    def gateway(
        self,
        *extra: str,
        db: Path | None = None,
        port: int = 0,
        ping_interval: float = 0.5,
        env: Mapping[str, str] | None = None,
        tls_ca: Path | None = None,
        wait: bool = True,
    ) -> Gateway:
        """A gateway on `port` (0: a free one), e.g. the port of a killed one to replace it;
        `tls_ca` is the CA of its certificate when `extra` makes it serve TLS. Without
        `wait` it is only launched: `wait_serving` waits for it."""
        self._n += 1
        gw = Gateway(
            args=[
                sys.executable,
                "-m",
                "gateway",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                str(db or self.postgres or self.db),
                *(
                    ("--blob-dir", str(self.blob_dir), "--lease", PG_LEASE)
                    if self.postgres and db is None
                    else ()
                ),
                "--ping-interval",
                str(ping_interval),
                "--port-file",
                str(self.tmp / f"gateway{self._n}.port"),
                *extra,
            ],
            log=self.tmp / f"gateway{self._n}.log",
            port_file=self.tmp / f"gateway{self._n}.port",
            env=dict(env or {}),
            tls_ca=tls_ca,
        )
        self.procs.append(gw)
        if wait:
            gw.start()
        else:
            gw.launch()
        return gw

    def worker(
        self,
        gateway: Gateway,
        worker_id: str,
        *extra: str,
        slots: int = 2,
        wait: bool = True,
        env: Mapping[str, str] | None = None,
        address: str = "",
    ) -> Proc:
        """A worker of `gateway`, dialing `address` if given (a proxy in front of it)."""
        proc = Proc(
            args=[
                sys.executable,
                "-m",
                "worker_service",
                "--gateway",
                address or gateway.address,
                "--worker-id",
                worker_id,
                "--slots",
                str(slots),
                *extra,
            ],
            log=self.tmp / f"worker-{worker_id}.log",
            env=dict(env or {}),
        )
        self.procs.append(proc)
        proc.start()
        if wait:
            gateway.wait_for_workers({worker_id})
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()

    def logs(self) -> str:
        return "\n".join(f"===== {p.log.name}\n{p.output()[-4000:]}" for p in self.procs)


async def until(condition: Callable[[], bool]) -> None:
    """Waits until `condition()` holds, for what another process does (a file it writes)."""
    async with asyncio.timeout(START_TIMEOUT):
        while not condition():  # noqa: ASYNC110  # another process makes it true
            await asyncio.sleep(0.02)
