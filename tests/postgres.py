"""A real PostgreSQL server for tests: `initdb` and `pg_ctl` in a temporary directory.

One cluster per pytest(-xdist) worker, on a free port of 127.0.0.1 (never 5432) with its
unix socket in the same directory, trust auth; each test gets a database of its own.
`initdb` refuses to run as root, so as root the cluster runs as the `postgres` user.
Where the binaries are missing the tests are skipped (`apt-get install postgresql`),
except in CI (`CI=true`), where that is a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
PREFERRED_VERSION = "15"
START_TIMEOUT = 30
INSTALL_HINT = (
    "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: apt-get install postgresql"
)


def pg_bin() -> Path | None:
    """The directory of initdb and pg_ctl: version 15's, else the newest installed."""
    preferred = PG_ROOT / PREFERRED_VERSION / "bin"
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


def require_pg_bin() -> Path:
    """pg_bin(), or skip the test (fail it in CI) saying what to install."""
    found = pg_bin()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port if port != 5432 else _free_port()


class PostgresCluster:
    """A PostgreSQL server of the tests' own; stop() and start() it to test outages."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        # Not under pytest's tmp_path: the postgres user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="jobmesh-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)
        try:
            self._init()
            self.start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                # Durable across a killed server (the WAL is written), not across a lost
                # machine, which tests do not need.
                "fsync = off\n"
                "full_page_writes = off\n"
                "shared_buffers = 32MB\n"
                "max_connections = 200\n"
            )

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=START_TIMEOUT
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed: {done.stdout}{done.stderr}{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start")

    def stop(self, *, kill: bool = False) -> None:
        """Stops the server: at once, as a crash would, with `kill`."""
        mode = "immediate" if kill else "fast"
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, database: str = "postgres", *, unix_socket: bool = False) -> str:
        if unix_socket:
            return f"postgresql://postgres@/{database}?host={self.root}&port={self.port}"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(self.bin / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {done.stderr}")
        return done.stdout.strip()

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        if not self.running():
            self.start()
        name = f"test_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        if self.running():
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        if self.running():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PostgresCluster:
    """A started cluster, or a skipped (in CI failed) test where PostgreSQL is missing."""
    bin_dir = require_pg_bin()
    for attempt in range(3):
        try:
            return PostgresCluster(bin_dir)
        except RuntimeError:
            # Another process may have taken the free port first.
            if attempt == 2:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")
