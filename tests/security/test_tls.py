"""TLS between real processes, with certificates made for each test: clients and workers
that trust the gateway's CA get through, others fail at once; the mTLS port takes only
certificates of the client CA; a rotated certificate is served without a restart; a
gateway off loopback refuses plaintext unless told `--insecure`."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from jobmesh import AsyncClient, Client, ClientSettings, JobState, TLSConfig, Unavailable
from tests.cluster import ROOT, Cluster, Gateway
from tests.security.conftest import Authority

# Long enough for any handshake here; a client that hangs instead of failing exceeds it.
FAIL_FAST = 10.0


def tls_gateway(
    cluster: Cluster, authority: Authority, cert: Path, key: Path, *extra: str
) -> Gateway:
    return cluster.gateway(
        "--tls-cert", str(cert), "--tls-key", str(key), *extra, tls_ca=authority.ca_file
    )


async def lists(address: str, tls: TLSConfig | None) -> None:
    """A call through a new connection; raises what the client raises."""
    settings = ClientSettings(gateway=address, tls=tls)
    async with asyncio.timeout(FAIL_FAST), AsyncClient(settings=settings) as client:
        await client.list()


async def refused(address: str, tls: TLSConfig | None) -> str:
    """The message of the Unavailable a new connection fails with, at once."""
    with pytest.raises(Unavailable) as error:
        await lists(address, tls)
    return error.value.message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_clients_that_trust_the_ca_get_through_and_others_fail_at_once(
    cluster: Cluster,
    authority: Authority,
    make_authority: Callable[[str], Authority],
    server_cert: tuple[Path, Path],
) -> None:
    gw = tls_gateway(cluster, authority, *server_cert)
    await lists(gw.address, TLSConfig(ca=authority.ca_file))
    with Client(gw.address, tls=authority.ca_file) as client:  # the blocking one too
        assert client.list() == ([], "")
    # The certificate names 127.0.0.1 and localhost, nothing else.
    await lists(f"localhost:{gw.port}", TLSConfig(ca=authority.ca_file))
    wrong_name = TLSConfig(ca=authority.ca_file, server_name="gateway.example")
    assert "Hostname Verification" in await refused(gw.address, wrong_name)

    assert "Socket closed" in await refused(gw.address, None)  # plaintext
    stranger = make_authority("stranger")
    assert "CERTIFICATE_VERIFY_FAILED" in await refused(gw.address, TLSConfig(stranger.ca_file))
    assert "CERTIFICATE_VERIFY_FAILED" in await refused(gw.address, TLSConfig())  # system roots
    assert gw.alive()


async def test_a_worker_that_trusts_the_ca_runs_jobs_with_blobs_over_tls(
    cluster: Cluster, authority: Authority, server_cert: tuple[Path, Path]
) -> None:
    gw = tls_gateway(cluster, authority, *server_cert)
    cluster.worker(gw, "w1", "--tls-ca", str(authority.ca_file))
    big = os.urandom(3 << 20)  # uploaded, downloaded by the worker, and back as a blob
    async with AsyncClient(gw.address, tls=authority.ca_file) as client:
        submitted = await client.submit("echo", params={"n": 1}, inputs={"big": big})
        job = await client.wait(submitted.job.id)
        assert job.state is JobState.SUCCEEDED
        assert job.result is not None
        assert "big" in job.result.output_blobs
        assert (await client.outputs(job))["big"] == big


async def test_the_mtls_port_takes_only_certificates_of_the_client_ca(
    cluster: Cluster,
    authority: Authority,
    make_authority: Callable[[str], Authority],
    server_cert: tuple[Path, Path],
) -> None:
    clients = make_authority("clients")
    port = free_port()
    gw = tls_gateway(
        cluster,
        authority,
        *server_cert,
        *("--tls-client-ca", str(clients.ca_file), "--mtls-listen", f"127.0.0.1:{port}"),
    )
    mtls = f"127.0.0.1:{port}"
    ca = authority.ca_file

    await refused(mtls, TLSConfig(ca=ca))  # no certificate
    cert, key = authority.issue("someone")  # not signed by the client CA
    await refused(mtls, TLSConfig(ca=ca, cert=cert, key=key))
    cert, key = clients.issue("app-1")
    await lists(mtls, TLSConfig(ca=ca, cert=cert, key=key))
    await lists(gw.address, TLSConfig(ca=ca))  # the main port asks for none

    cert, key = clients.issue("images-1")
    worker_tls = ("--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key))
    cluster.worker(gw, "images-1", "--gateway", mtls, *worker_tls)
    async with AsyncClient(gw.address, tls=ca) as client:
        job = await client.wait((await client.submit("echo")).job.id)
    assert job.state is JobState.SUCCEEDED
    assert f"127.0.0.1:{port} over TLS with client certificates" in gw.output()


async def test_a_rotated_certificate_is_served_without_a_restart(
    cluster: Cluster,
    authority: Authority,
    make_authority: Callable[[str], Authority],
    server_cert: tuple[Path, Path],
) -> None:
    cert, key = server_cert
    gw = tls_gateway(cluster, authority, cert, key)
    pid = gw.pid
    old = TLSConfig(ca=authority.ca_file)
    await lists(gw.address, old)

    renewed = make_authority("renewed")
    renewed.install(cert, key)  # as cert-manager does: new files renamed into place
    new = TLSConfig(ca=renewed.ca_file)
    await lists(gw.address, new)
    assert "CERTIFICATE_VERIFY_FAILED" in await refused(gw.address, old)

    # Written in place and cut short, as a careless copy leaves it: the renewed one stays.
    whole = cert.read_bytes()
    cert.write_bytes(whole[:100])
    await lists(gw.address, new)
    authority.install(cert, key)  # and back to the first CA
    await lists(gw.address, old)

    assert gw.alive()
    assert gw.pid == pid
    log = gw.output()
    assert log.count("keeping the TLS certificate in use") == 1
    assert log.count("TLS certificate read again") == 2


def test_a_gateway_off_loopback_refuses_plaintext_unless_insecure(
    cluster: Cluster, tmp_path: Path
) -> None:
    refused_start = subprocess.run(
        [sys.executable, "-m", "gateway", "--listen", "0.0.0.0:0", "--db", ":memory:"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused_start.returncode == 2  # the gateway's exit code for bad settings
    last = refused_start.stderr.strip().splitlines()[-1]
    assert "refusing to serve 0.0.0.0:0 without TLS" in last
    assert "--insecure" in last
    assert "Traceback" not in refused_start.stderr

    gw = cluster.gateway("--listen", "0.0.0.0:0", "--insecure")
    asyncio.run(lists(gw.address, None))


def test_the_cli_dials_a_tls_gateway(
    cluster: Cluster, authority: Authority, server_cert: tuple[Path, Path]
) -> None:
    gw = tls_gateway(cluster, authority, *server_cert)

    def jobmesh(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jobmesh", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )

    ca = str(authority.ca_file)
    for done in (
        jobmesh("--gateway", gw.address, "--tls-ca", ca, "list", "--json"),
        jobmesh("list", "--gateway", gw.address, "--tls-ca", ca),
        jobmesh("workers", JOBMESH_GATEWAY=gw.address, JOBMESH_TLS_CA=ca),
    ):
        assert done.returncode == 0, done.stderr
    plaintext = jobmesh("--gateway", gw.address, "list")
    assert plaintext.returncode == 3
    assert "UNAVAILABLE" in plaintext.stderr
    missing = jobmesh("--gateway", gw.address, "--tls-ca", "missing.pem", "list")
    assert missing.returncode == 2
    assert "tls_ca: 'missing.pem': No such file or directory" in missing.stderr


async def test_serve_with_tls_keeps_its_embedded_workers(
    cluster: Cluster, tmp_path: Path, authority: Authority, server_cert: tuple[Path, Path]
) -> None:
    cert, key = server_cert
    gw = Gateway(
        args=[
            *(sys.executable, "-m", "jobmesh", "serve", "--workers", "1", "--slots", "1"),
            *("--listen", "127.0.0.1:0", "--db", str(tmp_path / "serve.db")),
            *("--port-file", str(tmp_path / "serve.port")),
            *("--tls-cert", str(cert), "--tls-key", str(key)),
        ],
        log=tmp_path / "serve.log",
        port_file=tmp_path / "serve.port",
        tls_ca=authority.ca_file,
    )
    cluster.procs.append(gw)
    await asyncio.to_thread(gw.start)
    await asyncio.to_thread(gw.wait_for_workers, {"embedded-0"})
    async with AsyncClient(gw.address, tls=authority.ca_file) as client:
        job = await client.wait((await client.submit("echo")).job.id)
    assert job.state is JobState.SUCCEEDED


def test_tls_files_that_cannot_be_used_stop_gateway_and_worker_at_start(
    tmp_path: Path, server_cert: tuple[Path, Path]
) -> None:
    cert, _ = server_cert
    missing = tmp_path / "missing.key"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )

    gateway = run("gateway", "--db", ":memory:", "--tls-cert", str(cert), "--tls-key", str(missing))
    assert gateway.returncode == 3
    assert gateway.stderr.strip() == f"jobmesh: --tls-key {missing}: no such file or directory"
    worker = run("worker_service", "--tls-ca", str(missing), "--products", "builtin")
    assert worker.returncode == 2
    assert f"tls_ca: '{missing}': No such file or directory" in worker.stderr
