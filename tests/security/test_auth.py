"""Credentials and roles: who may call what.

The parser and the reload of the auth file are tested without processes; everything else
against a real gateway on loopback without TLS (tokens work there), with an auth file the
test writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.auth import (
    OPEN,
    AuthFile,
    AuthFileError,
    Role,
    parse,
    roles_for,
    token_sha256,
)
from jobmesh import AsyncClient, JobState, TLSConfig
from jobmesh.errors import PermissionDenied, Unauthenticated
from jobmesh.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    dispatcher_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from tests.cluster import ROOT, Cluster
from tests.security.auth_fixtures import (
    ADMIN,
    ALICE,
    PRINCIPALS,
    WORKER,
    Who,
    attach_refused,
    bearer,
    first_log_line,
    refused,
    secured,
    until_accepted,
    write_auth,
)
from tests.security.conftest import Authority

HASH = token_sha256("s3cret")

# --- the auth file, without processes ----------------------------------------------


def entry(**fields: object) -> str:
    values = {"name": "app", "tenant": "team-a", "roles": ["client"], "token_sha256": HASH}
    values.update(fields)
    lines = ["[[principal]]"]
    for key, value in values.items():
        if value is not None:
            shown = (
                "[" + ", ".join(f'"{v}"' for v in value) + "]"
                if isinstance(value, list)
                else f'"{value}"'
            )
            lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


def test_a_valid_file_maps_token_hashes_and_certificate_names_to_principals() -> None:
    text = (
        entry()
        + entry(
            name="image-workers",
            tenant="*",
            roles=["worker"],
            token_sha256=token_sha256("w").upper(),  # hex in either case
            worker_ids="images-*",
        )
        + entry(name="scaler", tenant="*", roles=["scaler"], token_sha256=None, certificate="keda")
    )
    found = parse(text)
    assert found.count == 3
    app = found.by_token[HASH]
    assert (app.name, app.tenant, app.roles, app.worker_ids) == (
        "app",
        "team-a",
        frozenset({Role.CLIENT}),
        "",
    )
    assert found.by_token[token_sha256("w")].worker_ids == "images-*"
    assert found.by_certificate["keda"].roles == {Role.SCALER}
    assert "s3cret" not in repr(found)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (entry(tokn="x"), "principal #1 ('app'): unknown key 'tokn'"),
        (entry(roles=["client", "root"]), "principal #1 ('app'): 'root' is not a role"),
        (entry(roles=[]), "roles must be a list"),
        (entry(token_sha256="s3cret"), "('app'): token_sha256 must be the token's SHA-256"),
        (entry(token_sha256=HASH[:63]), "64 hex digits"),
        (entry() + entry(name="other"), "principal #2 ('other'): token_sha256 is also 'app'"),
        (entry() + entry(token_sha256=token_sha256("x")), "#2 ('app'): another principal"),
        (entry(tenant="*"), 'tenant "*" (every tenant) is for worker and admin'),
        (entry(tenant="team a"), "tenant 'team a' must be letters"),
        (entry(roles=["worker"]), "a worker principal needs worker_ids"),
        (entry(worker_ids="x-*"), "worker_ids is for principals with the worker role"),
        (entry(token_sha256=None), "needs token_sha256, certificate or jwt_subject"),
        (entry(name=None), "principal #1: name is missing"),
        ("", "declares no [[principal]]"),
        ("[[principal]\n", "not TOML"),
        ("tokens = 1\n" + entry(), "unknown key 'tokens'"),
    ],
)
def test_a_bad_file_is_refused_naming_the_principal_at_fault(text: str, message: str) -> None:
    with pytest.raises(AuthFileError) as raised:
        parse(text, "auth.toml")
    assert message in str(raised.value)
    assert str(raised.value).startswith("auth.toml: ")


def test_the_file_is_read_again_when_it_changes_and_a_broken_edit_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(entry())
    clock = [0.0]
    auth = AuthFile(path, clock=lambda: clock[0])
    assert set(auth.current().by_token) == {HASH}

    path.write_text(entry() + entry(name="new", token_sha256=token_sha256("new")))
    assert set(auth.current().by_token) == {HASH}  # looked at once a second at most
    clock[0] += 1.0
    assert set(auth.current().by_token) == {HASH, token_sha256("new")}

    path.write_text(entry() + entry(name="new", token_sha256="oops"))
    with caplog.at_level(logging.WARNING, "gateway.auth"):
        for _ in range(3):
            clock[0] += 1.0
            assert set(auth.current().by_token) == {HASH, token_sha256("new")}
    [warning] = [r.getMessage() for r in caplog.records]
    assert "principal #2 ('new'): token_sha256" in warning
    assert "the principals read before stay in force" in warning

    path.unlink()
    clock[0] += 1.0
    assert set(auth.current().by_token) == {HASH, token_sha256("new")}


def test_each_service_needs_its_roles() -> None:
    assert roles_for("/jobmesh.v1.JobService/Submit") == {Role.CLIENT, Role.ADMIN}
    assert roles_for("/jobmesh.v1.BlobService/Download") == {
        Role.CLIENT,
        Role.ADMIN,
        Role.WORKER,
    }
    assert roles_for("/jobmesh.v1.Dispatcher/Session") == {Role.WORKER}
    assert roles_for("/jobmesh.v1.AdminService/ListWorkers") == {Role.ADMIN}
    assert roles_for("/grpc.health.v1.Health/Check") is None
    assert roles_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == set(Role)
    assert roles_for("/some.New/Service") == {Role.ADMIN}  # what nobody listed is for admins
    assert OPEN.roles == set(Role)


# --- a real gateway -------------------------------------------------------------------


async def test_without_an_auth_file_every_caller_is_an_admin_of_tenant_default(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway()
    assert "auth: none — every caller is an admin of tenant default" in first_log_line(gw)
    async with AsyncClient(gw.address) as client:
        submitted = await client.submit("echo")
        job = await client.cancel(submitted.job.id)
        assert job.state is JobState.CANCELLED
        assert (job.tenant, job.submitted_by, job.cancelled_by) == (
            "default",
            "anonymous",
            "anonymous",
        )
        assert await client.list_workers() == []
    async with grpc.aio.insecure_channel(gw.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = [a async for a in reflection.ServerReflectionInfo(iter([request]))]
        assert "jobmesh.v1.JobService" in {s.name for s in answer.list_services_response.service}


async def test_a_missing_garbled_or_unknown_token_is_unauthenticated(cluster: Cluster) -> None:
    gw = secured(cluster)
    auth_file = cluster.tmp / "auth.toml"
    assert first_log_line(gw).endswith(f"auth: {len(PRINCIPALS)} principals from {auth_file}")
    async with grpc.aio.insecure_channel(gw.address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        submit = job_service_pb2.SubmitRequest(spec=job_pb2.JobSpec(kind="echo"))
        for metadata in (
            (),
            (("authorization", "Basic YWxpY2U6cHc="),),
            (("authorization", "Bearer"),),
            (("authorization", "Bearer not-a-known-token"),),
            (("authorization", f"Bearer {ALICE.token}"), ("authorization", "Bearer x")),
        ):
            error = await refused(jobs.Submit(submit, metadata=metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "not-a-known-token" not in (error.details() or "")
        # The SDK raises its own error for it; nothing was queued.
        async with AsyncClient(gw.address, token="not-a-known-token") as stranger:
            with pytest.raises(Unauthenticated, match="not one this gateway knows"):
                await stranger.submit("echo")
        async with AsyncClient(gw.address, token=ADMIN.token) as admin:
            assert (await admin.list()) == ([], "")


async def test_a_credential_for_another_service_is_permission_denied(cluster: Cluster) -> None:
    gw = secured(cluster)
    async with AsyncClient(gw.address, token=WORKER.token) as worker:
        with pytest.raises(PermissionDenied) as raised:
            await worker.submit("echo")
        assert "'workers'" in raised.value.message
        assert "needs the client or admin role" in raised.value.message
    async with AsyncClient(gw.address, token=ALICE.token) as client:
        with pytest.raises(PermissionDenied, match="needs the admin role"):
            await client.list_workers()
    async with grpc.aio.insecure_channel(gw.address) as channel:
        attach = dispatcher_pb2.Attach(
            worker_id="w-1", slots=1, kinds=[dispatcher_pb2.KindCapacity(kind="echo")]
        )
        error = await attach_refused(channel, ALICE.token, attach)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "a client credential ('alice-app') cannot call jobmesh.v1.Dispatcher/Session" in (
            error.details() or ""
        )
        assert "needs the worker role" in (error.details() or "")
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        listed = await admin.ListWorkers(
            admin_service_pb2.ListWorkersRequest(), metadata=bearer(ADMIN.token)
        )
        assert list(listed.workers) == []


async def test_health_stays_open_and_reflection_needs_a_credential(cluster: Cluster) -> None:
    gw = secured(cluster)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async with grpc.aio.insecure_channel(gw.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        error = await refused(reflection.ServerReflectionInfo(iter([request])))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        for who in (ALICE, WORKER):
            call = reflection.ServerReflectionInfo(iter([request]), metadata=bearer(who.token))
            [found] = [a async for a in call]
            names = {s.name for s in found.list_services_response.service}
            assert "jobmesh.v1.Dispatcher" in names


async def test_the_auth_file_is_read_again_while_the_gateway_serves(cluster: Cluster) -> None:
    late = Who("late-app", "team-c", ("client",), "late-2bYt9Wq")
    gw = secured(cluster)
    path = cluster.tmp / "auth.toml"
    async with AsyncClient(gw.address, token=late.token) as client:
        with pytest.raises(Unauthenticated):
            await client.list()

        write_auth(path, [*PRINCIPALS, late])

        await until_accepted(client)
        job = (await client.submit("echo")).job
        assert (job.tenant, job.submitted_by) == ("team-c", "late-app")

        # A broken edit: the gateway warns, keeps the principals it had and keeps serving.
        path.write_text(path.read_text() + '\n[[principal]]\nname = "typo"\nroles = "client"\n')
        async with asyncio.timeout(10):
            # The file is looked at on calls, at most once a second; they keep being served.
            while "stay in force" not in gw.output():
                assert (await client.get(job.id)).id == job.id
                await asyncio.sleep(0.2)
        assert (await client.get(job.id)).id == job.id
        warning = [line for line in gw.output().splitlines() if "stay in force" in line]
        assert len(warning) == 1
        assert "principal #6 ('typo')" in warning[0]
    assert gw.alive()


async def test_a_verified_client_certificate_names_its_principal_on_the_mtls_port(
    cluster: Cluster,
    authority: Authority,
    make_authority: Callable[[str], Authority],
    server_cert: tuple[Path, Path],
) -> None:
    clients = make_authority("clients")
    path = cluster.tmp / "auth.toml"
    path.write_text(
        ADMIN.toml()
        + '[[principal]]\nname = "batch"\ntenant = "team-a"\nroles = ["client"]\n'
        + 'certificate = "batch.team-a"\n'
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mtls = f"127.0.0.1:{s.getsockname()[1]}"
    gw = cluster.gateway(
        *("--tls-cert", str(server_cert[0]), "--tls-key", str(server_cert[1])),
        *("--tls-client-ca", str(clients.ca_file), "--mtls-listen", mtls),
        *("--auth-file", str(path)),
        tls_ca=authority.ca_file,
    )
    ca = authority.ca_file
    cert, key = clients.issue("batch.team-a")
    async with AsyncClient(mtls, tls=TLSConfig(ca=ca, cert=cert, key=key)) as batch:
        job = (await batch.submit("echo")).job
        assert (job.tenant, job.submitted_by) == ("team-a", "batch")
    cert, key = clients.issue("stranger.team-b")  # signed by the client CA, in no principal
    async with AsyncClient(mtls, tls=TLSConfig(ca=ca, cert=cert, key=key)) as stranger:
        with pytest.raises(Unauthenticated, match=r"'stranger\.team-b' names no principal"):
            await stranger.list()
    # The main port asks for no certificate: a token it is.
    async with AsyncClient(gw.address, tls=ca) as anonymous:
        with pytest.raises(Unauthenticated, match="or a client certificate on its mTLS port"):
            await anonymous.list()
    async with AsyncClient(gw.address, tls=ca, token=ADMIN.token) as admin:
        assert [j.id for j in (await admin.list())[0]] == [job.id]


def test_a_bad_auth_file_stops_the_gateway_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(entry(token_sha256="the-token-itself"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--db",
            ":memory:",
            "--auth-file",
            str(path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert done.stderr == (
        f"jobmesh: auth file {path}: principal #1 ('app'): token_sha256 must be the token's "
        "SHA-256 as 64 hex digits (never the token itself)\n"
    )
