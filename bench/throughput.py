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

Usage: python bench/throughput.py [--jobs N] [--concurrency C] [--sequential N] [--slots S]
       [--tls] [--auth] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


async def concurrent(client: AsyncClient, jobs: int, concurrency: int) -> float:
    remaining = jobs

    async def one_client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await submit_and_wait(client, b"x" * 64)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return jobs / (time.perf_counter() - started)


async def batched(client: AsyncClient, jobs: int, batch: int) -> float:
    started = time.perf_counter()
    ids: list[str] = []
    for offset in range(0, jobs, batch):
        specs = [
            job_spec("echo", inputs={"in": b"x" * 64}) for _ in range(min(batch, jobs - offset))
        ]
        ids.extend(s.job.id for s in await client.submit_batch(specs))
    gate = asyncio.Semaphore(256)

    async def wait(job_id: str) -> None:
        async with gate:
            await client.wait(job_id)

    await asyncio.gather(*(wait(i) for i in ids))
    return jobs / (time.perf_counter() - started)


async def sequential(client: AsyncClient, jobs: int) -> dict[str, float]:
    latencies = sorted([await submit_and_wait(client, b"x" * 64) for _ in range(jobs)])
    return {
        "p50": round(1000 * statistics.median(latencies), 3),
        "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 3),
        "mean": round(1000 * statistics.fmean(latencies), 3),
    }


async def measure(address: str, opts: argparse.Namespace, creds: Credentials) -> dict[str, object]:
    if creds.admin_token:  # a client principal may not list workers
        async with AsyncClient(address, token=creds.admin_token, tls=creds.tls) as admin:
            await wait_for_worker(admin)
    async with AsyncClient(address, token=creds.client_token or None, tls=creds.tls) as client:
        if not creds.admin_token:
            await wait_for_worker(client)
        await concurrent(client, 200, opts.concurrency)  # warm up
        return {
            "submit_wait_jobs_per_s": round(
                await concurrent(client, opts.jobs, opts.concurrency), 1
            ),
            "batch_jobs_per_s": round(await batched(client, opts.jobs, 100), 1),
            "latency_ms": await sequential(client, opts.sequential),
        }


def run(opts: argparse.Namespace, security: Security) -> dict[str, object]:
    """The figures of one configuration, with a gateway and a worker of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        creds = credentials(security, tmpdir)
        port_file = tmpdir / "port"
        gateway = start(
            [
                sys.executable,
                "-m",
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(tmpdir / "bench.db"),
                "--port-file",
                str(port_file),
                "--log-level",
                "WARNING",
                *creds.gateway_args,
            ],
            tmpdir / "gateway.log",
        )
        worker = None
        try:
            for _ in range(600):
                if port_file.exists() or gateway.poll() is not None:
                    break
                time.sleep(0.05)
            if not port_file.exists():
                log = (tmpdir / "gateway.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {security.name} gateway did not start:\n{log}")
            address = f"127.0.0.1:{port_file.read_text().strip()}"
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
            return asyncio.run(measure(address, opts, creds))
        finally:
            for proc in (worker, gateway):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)


def configurations(opts: argparse.Namespace) -> list[Security]:
    found = [PLAINTEXT]
    if opts.tls:
        found.append(Security("tls", tls=True))
    if opts.auth:
        found.append(Security("auth", auth=True))
    if opts.tls and opts.auth:
        found.append(Security("tls+auth", tls=True, auth=True))
    return found


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
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, in turn, and report medians",
    )
    opts = parser.parse_args()
    header: dict[str, object] = {
        "benchmark": "throughput",
        "kind": "echo",
        "jobs": opts.jobs,
        "concurrency": opts.concurrency,
        "worker_replicas": 1,
        "worker_slots": opts.slots,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    chosen = configurations(opts)
    rounds: dict[str, list[dict[str, object]]] = {security.name: [] for security in chosen}
    for _ in range(max(1, opts.rounds)):
        for security in chosen:
            rounds[security.name].append(run(opts, security))
    figures = {
        name: found[0] if len(found) == 1 else medians(found) for name, found in rounds.items()
    }
    if opts.rounds > 1:
        header["rounds"] = opts.rounds
    if len(chosen) == 1:
        print(json.dumps({**header, **figures[PLAINTEXT.name]}, indent=2))
        return
    base = figures[PLAINTEXT.name]
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
                "vs_plaintext": {
                    name: ratios(values, base)
                    for name, values in figures.items()
                    if name != PLAINTEXT.name
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
