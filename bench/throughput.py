"""Throughput and latency of `echo` jobs through a gateway and one worker replica.

Starts `python -m gateway` (SQLite file in a temp dir) and `python -m worker_service`
on loopback, then prints JSON:

- `submit_wait_jobs_per_s`: 64 concurrent clients, each submitting one job and
  watching it to its result, over and over;
- `batch_jobs_per_s`: jobs sent with SubmitBatch (100 per call), until all are done;
- `latency_ms`: p50/p99 of one job at a time (submit → result).

With `--tls` and/or `--auth` it measures the same again for each configuration, with a
fresh gateway and worker each time: plaintext, then TLS (a certificate made with trustme
for the run), auth (an auth file of a client and a worker principal; bearer tokens on
loopback), and TLS+auth when both are given. It then prints one JSON object with each
configuration's figures under `configurations` and, under `vs_plaintext`, each figure
divided by plaintext's (a throughput below 1 and a latency above 1 are a cost).
`--rounds R` runs the configurations R times in turn (plaintext, tls, ..., plaintext, ...)
and reports the median of each figure, with the rounds' headline figures in `per_round`.

With `--db postgresql://...` every configuration is measured with the gateway on SQLite
and again on PostgreSQL (`sqlite`, `postgresql`, `sqlite+tls`, `postgresql+tls`, ...),
with each PostgreSQL figure divided by the same configuration's SQLite one under
`vs_sqlite`. The DSN's own database is left alone (it need not be empty): each
PostgreSQL run gets a database of its own on that server, `jobmesh_bench_<pid>_<n>`,
created through the DSN (its role needs CREATEDB) and dropped once that run's gateway
has exited, so every round starts as empty as SQLite's fresh file does. The server's
version, fsync and synchronous_commit are in `postgresql`: they bound its figures.
`--gateways N` (with `--db`) also measures N gateways sharing the PostgreSQL database
(`postgresqlxN`): the worker attaches to the first, and the clients take turns among the
gateways, so most jobs cross from one gateway to another (LISTEN/NOTIFY wake-ups, claims).

Usage: python bench/throughput.py [--jobs N] [--concurrency C] [--sequential N] [--slots S]
       [--tls] [--auth] [--db postgresql://USER@HOST:PORT/DB] [--gateways N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.store.open import is_postgres
from jobmesh import AsyncClient, JobState, TLSConfig, job_spec

ROOT = Path(__file__).resolve().parent.parent

# Principals of the auth file (`--auth`). The measured client is a client of one tenant and
# the worker a worker of every tenant, as in a deployment; the admin is only asked whether
# the worker has attached (AdminService/ListWorkers), before anything is measured.
CLIENT_TOKEN = "bench-client-5Rk2vQ8pLm3x"
WORKER_TOKEN = "bench-worker-9Tz4wH1cNb7y"
ADMIN_TOKEN = "bench-admin-3Jd6sF0gXe2q"
WORKER_ID = "bench"


@dataclass(frozen=True)
class Security:
    """How one configuration's gateway serves and how its clients dial it."""

    name: str
    tls: bool = False
    auth: bool = False


PLAINTEXT = Security("plaintext")
SQLITE, POSTGRESQL = "sqlite", "postgresql"


@dataclass(frozen=True)
class Configuration:
    """One gateway and worker to measure: how they talk, and where the gateway keeps jobs."""

    name: str
    security: Security = PLAINTEXT
    store: str = SQLITE
    gateways: int = 1
    """Gateways sharing the database; the worker attaches to the first, and the clients
    take turns among them."""


@dataclass(frozen=True)
class Credentials:
    """What the gateway, the worker and the clients of a configuration are given."""

    gateway_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    worker_env: tuple[tuple[str, str], ...] = ()
    tls: TLSConfig | None = None
    client_token: str = ""
    admin_token: str = ""


def principal(name: str, tenant: str, role: str, token: str, worker_ids: str = "") -> str:
    lines = [
        "[[principal]]",
        f'name = "{name}"',
        f'tenant = "{tenant}"',
        f'roles = ["{role}"]',
        f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"',
    ]
    if worker_ids:
        lines.append(f'worker_ids = "{worker_ids}"')
    return "\n".join(lines) + "\n"


def credentials(security: Security, tmpdir: Path) -> Credentials:
    """Makes the files `security` needs in `tmpdir`: a CA and a gateway certificate for
    loopback (trustme), an auth file."""
    gateway_args: list[str] = []
    worker_args: list[str] = []
    worker_env: list[tuple[str, str]] = []
    tls = None
    if security.tls:
        import trustme  # a test dependency: only --tls needs it

        ca = trustme.CA(organization_name="jobmesh bench")
        ca_file = tmpdir / "ca.pem"
        cert_file, key_file = tmpdir / "gateway.crt", tmpdir / "gateway.key"
        ca.cert_pem.write_to_path(str(ca_file))
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        gateway_args += ["--tls-cert", str(cert_file), "--tls-key", str(key_file)]
        worker_args += ["--tls-ca", str(ca_file)]
        tls = TLSConfig(ca=ca_file)
    if not security.auth:
        return Credentials(tuple(gateway_args), tuple(worker_args), tuple(worker_env), tls)
    auth_file = tmpdir / "auth.toml"
    auth_file.write_text(
        "\n".join(
            [
                principal("bench-client", "bench", "client", CLIENT_TOKEN),
                principal("bench-workers", "*", "worker", WORKER_TOKEN, worker_ids=WORKER_ID),
                principal("bench-admin", "*", "admin", ADMIN_TOKEN),
            ]
        )
    )
    gateway_args += ["--auth-file", str(auth_file)]
    # In the environment, as the README says a token should be given, not as a flag.
    worker_env.append(("JOBMESH_TOKEN", WORKER_TOKEN))
    return Credentials(
        tuple(gateway_args),
        tuple(worker_args),
        tuple(worker_env),
        tls,
        client_token=CLIENT_TOKEN,
        admin_token=ADMIN_TOKEN,
    )


_databases = itertools.count(1)


async def _on_server(dsn: str, statement: str) -> None:
    import asyncpg  # the server extra's driver: only --db needs it

    conn = await asyncpg.connect(dsn)
    try:
        # FORCE (PostgreSQL 13+) ends sessions its gateway may have left for a moment.
        if statement.startswith("DROP") and conn.get_server_version().major >= 13:
            statement += " WITH (FORCE)"
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(dsn: str) -> Iterator[str]:
    """The DSN of a new database on the server of `dsn`, dropped on leaving (stop what
    uses it first)."""
    name = f"jobmesh_bench_{os.getpid()}_{next(_databases)}"
    asyncio.run(_on_server(dsn, f"CREATE DATABASE {name}"))
    try:
        yield urllib.parse.urlsplit(dsn)._replace(path="/" + name).geturl()
    finally:
        asyncio.run(_on_server(dsn, f"DROP DATABASE IF EXISTS {name}"))


async def server_facts(dsn: str) -> dict[str, Any]:
    """What the PostgreSQL figures depend on; SystemExit if the bench cannot create databases
    there (found now, not after the first SQLite run)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ):
            raise SystemExit(
                "--db: its role may not create databases (CREATEDB), and each PostgreSQL run "
                "needs a fresh one"
            )
        return {
            "version": await conn.fetchval("SHOW server_version"),
            "fsync": await conn.fetchval("SHOW fsync"),
            "synchronous_commit": await conn.fetchval("SHOW synchronous_commit"),
        }
    finally:
        await conn.close()


def start(
    args: list[str], log: Path, extra_env: tuple[tuple[str, str], ...] = ()
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(extra_env)
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_for_worker(client: AsyncClient) -> None:
    for _ in range(600):
        if await client.list_workers():
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("worker did not attach")


async def submit_and_wait(client: AsyncClient, payload: bytes) -> float:
    started = time.perf_counter()
    submitted = await client.submit("echo", inputs={"in": payload})
    job = await client.wait(submitted.job.id)
    if job.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {job.state}")
    return time.perf_counter() - started


async def concurrent(clients: list[AsyncClient], jobs: int, concurrency: int) -> float:
    remaining = jobs

    async def one_client(client: AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await submit_and_wait(client, b"x" * 64)

    started = time.perf_counter()
    await asyncio.gather(*(one_client(clients[i % len(clients)]) for i in range(concurrency)))
    return jobs / (time.perf_counter() - started)


async def batched(clients: list[AsyncClient], jobs: int, batch: int) -> float:
    started = time.perf_counter()
    ids: list[tuple[AsyncClient, str]] = []
    for n, offset in enumerate(range(0, jobs, batch)):
        client = clients[n % len(clients)]
        specs = [
            job_spec("echo", inputs={"in": b"x" * 64}) for _ in range(min(batch, jobs - offset))
        ]
        ids.extend((client, s.job.id) for s in await client.submit_batch(specs))
    gate = asyncio.Semaphore(256)

    async def wait(client: AsyncClient, job_id: str) -> None:
        async with gate:
            await client.wait(job_id)

    await asyncio.gather(*(wait(c, i) for c, i in ids))
    return jobs / (time.perf_counter() - started)


async def sequential(clients: list[AsyncClient], jobs: int) -> dict[str, float]:
    latencies = sorted(
        [await submit_and_wait(clients[j % len(clients)], b"x" * 64) for j in range(jobs)]
    )
    return {
        "p50": round(1000 * statistics.median(latencies), 3),
        "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 3),
        "mean": round(1000 * statistics.fmean(latencies), 3),
    }


async def measure(
    addresses: list[str], opts: argparse.Namespace, creds: Credentials
) -> dict[str, object]:
    """The figures through the gateways at `addresses` (the worker attaches to the first)."""
    if creds.admin_token:  # a client principal may not list workers
        async with AsyncClient(addresses[0], token=creds.admin_token, tls=creds.tls) as admin:
            await wait_for_worker(admin)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                AsyncClient(address, token=creds.client_token or None, tls=creds.tls)
            )
            for address in addresses
        ]
        if not creds.admin_token:
            await wait_for_worker(clients[0])
        await concurrent(clients, 200, opts.concurrency)  # warm up
        return {
            "submit_wait_jobs_per_s": round(
                await concurrent(clients, opts.jobs, opts.concurrency), 1
            ),
            "batch_jobs_per_s": round(await batched(clients, opts.jobs, 100), 1),
            "latency_ms": await sequential(clients, opts.sequential),
        }


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ends `proc` and waits until it has exited: the next gateway may need its database."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(opts: argparse.Namespace, config: Configuration) -> dict[str, object]:
    """The figures of one configuration, with a gateway, a worker and a database of its own."""
    with contextlib.ExitStack() as stack:
        tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if config.store == POSTGRESQL:
            db = ["--db", stack.enter_context(fresh_database(opts.db))]
            db += ["--blob-dir", str(tmpdir / "blobs")]
        else:
            db = ["--db", str(tmpdir / "bench.db")]
        creds = credentials(config.security, tmpdir)
        addresses = []
        for n in range(config.gateways):
            port_file = tmpdir / f"port{n}"
            gateway = start(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "--listen",
                    "127.0.0.1:0",
                    *db,
                    "--port-file",
                    str(port_file),
                    "--log-level",
                    "WARNING",
                    *creds.gateway_args,
                ],
                tmpdir / f"gateway{n}.log",
            )
            # Callbacks run last in, first out: the gateways have exited before their
            # database is dropped and their files removed.
            stack.callback(stop, gateway)
            for _ in range(600):
                if port_file.exists() or gateway.poll() is not None:
                    break
                time.sleep(0.05)
            if not port_file.exists():
                log = (tmpdir / f"gateway{n}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {config.name} gateway did not start:\n{log}")
            addresses.append(f"127.0.0.1:{port_file.read_text().strip()}")
        address = addresses[0]
        worker = start(
            [
                sys.executable,
                "-m",
                "worker_service",
                "--gateway",
                address,
                "--slots",
                str(opts.slots),
                "--worker-id",
                WORKER_ID,
                *creds.worker_args,
            ],
            tmpdir / "worker.log",
            creds.worker_env,
        )
        stack.callback(stop, worker)
        return asyncio.run(measure(addresses, opts, creds))


def configurations(opts: argparse.Namespace) -> list[Configuration]:
    """Each security configuration asked for, on SQLite and (with --db) on PostgreSQL."""
    securities = [PLAINTEXT]
    if opts.tls:
        securities.append(Security("tls", tls=True))
    if opts.auth:
        securities.append(Security("auth", auth=True))
    if opts.tls and opts.auth:
        securities.append(Security("tls+auth", tls=True, auth=True))
    if not opts.db:
        return [Configuration(security.name, security) for security in securities]
    chosen = []
    for security in securities:
        suffix = "" if security == PLAINTEXT else f"+{security.name}"
        chosen.append(Configuration(f"{SQLITE}{suffix}", security, SQLITE))
        chosen.append(Configuration(f"{POSTGRESQL}{suffix}", security, POSTGRESQL))
        if opts.gateways > 1:
            name = f"{POSTGRESQL}x{opts.gateways}{suffix}"
            chosen.append(Configuration(name, security, POSTGRESQL, opts.gateways))
    return chosen


def medians(rounds: list[dict[str, object]]) -> dict[str, object]:
    """Each figure's median over `rounds` (the figures of one configuration, per round)."""
    out: dict[str, object] = {}
    for key, first in rounds[0].items():
        if isinstance(first, dict):
            out[key] = medians([r[key] for r in rounds])  # type: ignore[misc]
        else:
            out[key] = round(statistics.median(float(r[key]) for r in rounds), 3)  # type: ignore[arg-type]
    return out


def headline(rounds: list[dict[str, object]]) -> dict[str, list[object]]:
    """The main figures of each round, to see how much they move from one to the next."""
    return {
        "submit_wait_jobs_per_s": [r["submit_wait_jobs_per_s"] for r in rounds],
        "batch_jobs_per_s": [r["batch_jobs_per_s"] for r in rounds],
        "latency_p50_ms": [r["latency_ms"]["p50"] for r in rounds],  # type: ignore[index]
    }


def ratios(figures: dict[str, object], base: dict[str, object]) -> dict[str, object]:
    """Each figure of `figures` divided by the same figure of `base`."""
    out: dict[str, object] = {}
    for key, value in figures.items():
        other = base[key]
        if isinstance(value, dict) and isinstance(other, dict):
            out[key] = ratios(value, other)
        elif isinstance(value, int | float) and isinstance(other, int | float) and other:
            out[key] = round(value / other, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--tls", action="store_true", help="also measure over TLS, against plaintext"
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="also measure with an auth file and bearer tokens, against plaintext",
    )
    parser.add_argument(
        "--db",
        default="",
        metavar="postgresql://...",
        help="also measure the gateway on PostgreSQL, against SQLite: a DSN of a server where "
        "the bench may create (and drop) a database per run; its own database is not touched",
    )
    parser.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="also measure this many gateways sharing the PostgreSQL database (the worker "
        "attached to one, the clients taking turns among them), against one",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, in turn, and report medians",
    )
    opts = parser.parse_args()
    if opts.db and not is_postgres(opts.db):
        parser.error("--db must be a postgresql:// URL (SQLite is always measured, in a temp dir)")
    if opts.gateways < 1:
        parser.error("--gateways must be at least 1")
    if opts.gateways > 1 and not opts.db:
        parser.error("--gateways: several gateways share a PostgreSQL database: give --db")
    header: dict[str, object] = {
        "benchmark": "throughput",
        "kind": "echo",
        "jobs": opts.jobs,
        "concurrency": opts.concurrency,
        "gateways": opts.gateways,
        "worker_replicas": 1,
        "worker_slots": opts.slots,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if opts.db:
        header["postgresql"] = asyncio.run(server_facts(opts.db))
    chosen = configurations(opts)
    rounds: dict[str, list[dict[str, object]]] = {config.name: [] for config in chosen}
    for _ in range(max(1, opts.rounds)):
        for config in chosen:
            rounds[config.name].append(run(opts, config))
    figures = {
        name: found[0] if len(found) == 1 else medians(found) for name, found in rounds.items()
    }
    if opts.rounds > 1:
        header["rounds"] = opts.rounds
    if len(chosen) == 1:
        print(json.dumps({**header, **figures[chosen[0].name]}, indent=2))
        return
    named = {(c.security, c.store, c.gateways): c.name for c in chosen}
    against: dict[str, object] = {}
    if len({config.security for config in chosen}) > 1:
        against["vs_plaintext"] = {
            config.name: ratios(
                figures[config.name], figures[named[PLAINTEXT, config.store, config.gateways]]
            )
            for config in chosen
            if config.security != PLAINTEXT
        }
    if opts.db:
        against["vs_sqlite"] = {
            config.name: ratios(figures[config.name], figures[named[config.security, SQLITE, 1]])
            for config in chosen
            if config.store == POSTGRESQL
        }
    print(
        json.dumps(
            {
                **header,
                "sequential": opts.sequential,
                "configurations": figures,
                **(
                    {"per_round": {name: headline(found) for name, found in rounds.items()}}
                    if opts.rounds > 1
                    else {}
                ),
                **against,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
