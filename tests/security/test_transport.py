"""The transport settings and what goes on the wire, in this process: TLS settings from the
environment, flags and arguments; clear errors for TLS files that cannot be used; the
bearer token on every call of the SDK and of a worker, and in no repr; the gateway's
certificate files read again when they change, and only then."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.tls import CertificateFiles
from jobmesh import AsyncClient, ClientSettings, InvalidArgument, JobmeshError, TLSConfig
from jobmesh.channels import tls_config
from jobmesh.cli import build_parser
from jobmesh.cli.args import client_settings
from jobmesh.v1 import dispatcher_pb2, job_pb2
from tests.security.conftest import Authority
from worker_service.config import WorkerSettings, read_config_file
from worker_service.payloads import Payloads
from worker_service.session import Session

TOKEN = "s3cret-token"


def test_the_environment_turns_tls_on() -> None:
    assert ClientSettings.from_env({}).tls is None
    assert ClientSettings.from_env({"JOBMESH_TLS": "false"}).tls is None
    assert ClientSettings.from_env({"JOBMESH_TLS": "true"}).tls == TLSConfig()
    env = {"JOBMESH_TLS_CA": "ca.pem", "JOBMESH_TLS_SERVER_NAME": "gw.example"}
    assert ClientSettings.from_env(env).tls == TLSConfig(ca="ca.pem", server_name="gw.example")
    env = {"JOBMESH_TLS_CERT": "me.crt", "JOBMESH_TLS_KEY": "me.key", "JOBMESH_TOKEN": TOKEN}
    settings = ClientSettings.from_env(env)
    assert settings.tls == TLSConfig(cert="me.crt", key="me.key")
    assert settings.token == TOKEN
    with pytest.raises(InvalidArgument, match="tls_key"):
        ClientSettings.from_env({"JOBMESH_TLS_CERT": "me.crt"})
    with pytest.raises(InvalidArgument, match="JOBMESH_TLS"):
        ClientSettings.from_env({"JOBMESH_TLS": "maybe"})


def test_tls_takes_true_a_ca_file_or_a_config() -> None:
    assert tls_config(None) is None
    assert tls_config(False) is None
    assert tls_config(True) == TLSConfig()
    assert tls_config("ca.pem") == TLSConfig(ca="ca.pem")
    assert tls_config(Path("ca.pem")) == TLSConfig(ca=Path("ca.pem"))
    config = TLSConfig(ca="ca.pem", server_name="gw")
    assert tls_config(config) is config


def test_cli_connection_flags_go_before_or_after_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOBMESH_TLS_SERVER_NAME", "gw.example")
    monkeypatch.setenv("JOBMESH_TOKEN", "from-env")
    for argv in (
        ["--tls-ca", "ca.pem", "--token", TOKEN, "list"],
        ["list", "--tls-ca", "ca.pem", "--token", TOKEN],
    ):
        settings = client_settings(build_parser().parse_args(argv))
        assert settings.tls == TLSConfig(ca="ca.pem", server_name="gw.example")
        assert settings.token == TOKEN
    settings = client_settings(build_parser().parse_args(["list"]))
    assert settings.tls == TLSConfig(server_name="gw.example")
    assert settings.token == "from-env"
    settings = client_settings(build_parser().parse_args(["--tls", "get", "j1"]))
    assert settings.tls == TLSConfig(server_name="gw.example")
    monkeypatch.delenv("JOBMESH_TLS_SERVER_NAME")
    assert client_settings(build_parser().parse_args(["list"])).tls is None


def test_worker_tls_settings_from_flags_env_and_file(tmp_path: Path) -> None:
    assert WorkerSettings().tls_config is None
    assert WorkerSettings(tls=True).tls_config == TLSConfig()
    env = {"JOBMESH_TLS_CA": "ca.pem", "JOBMESH_TOKEN": TOKEN}
    settings = WorkerSettings.from_env(env)
    assert settings.tls_config == TLSConfig(ca="ca.pem")
    assert settings.token == TOKEN
    config = tmp_path / "worker.toml"
    config.write_text(
        '[worker]\ntls_cert = "w.crt"\ntls_key = "w.key"\ntls_server_name = "gw"\ntls = true\n'
    )
    values = read_config_file(str(config))
    expected = TLSConfig(cert="w.crt", key="w.key", server_name="gw")
    assert WorkerSettings(**values).tls_config == expected
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        WorkerSettings(tls_cert="w.crt")


def test_the_token_is_in_no_repr_and_no_error() -> None:
    assert TOKEN not in repr(ClientSettings(token=TOKEN))
    assert TOKEN not in repr(WorkerSettings(token=TOKEN))
    with pytest.raises(InvalidArgument) as bad:
        ClientSettings(token="s3cret\nX-Other: 1")
    assert "s3cret" not in str(bad.value)
    with pytest.raises(ValueError, match="printable ASCII") as bad_worker:
        WorkerSettings(token=" s3cret")
    assert "s3cret" not in str(bad_worker.value)


async def test_tls_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(InvalidArgument, match=r"tls_ca: .*missing\.pem.*No such file"):
        AsyncClient("127.0.0.1:1", tls=missing)
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    with pytest.raises(InvalidArgument, match=r"tls_ca: .*ca\.pem.* not a PEM file"):
        AsyncClient("127.0.0.1:1", tls=not_pem)
    with pytest.raises(InvalidArgument, match="tls_cert"):
        AsyncClient("127.0.0.1:1", tls=TLSConfig(cert=missing, key=missing))


class Recorder(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Keeps each method's call metadata; the server has no services, so every call ends
    UNIMPLEMENTED after it was recorded."""

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, str]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        self.calls[details.method.rpartition("/")[2]] = dict(details.invocation_metadata or ())
        return await continuation(details)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    recording = Recorder()
    server = grpc.aio.server(interceptors=[recording])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield recording, f"127.0.0.1:{port}"
    await server.stop(0)


async def _fails(call: Awaitable[Any]) -> None:
    with pytest.raises(JobmeshError):
        await call


async def _drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


async def test_every_sdk_call_carries_the_token(recorder: tuple[Recorder, str]) -> None:
    recording, address = recorder
    async with AsyncClient(address, token=TOKEN) as client:
        await _fails(client.submit("echo"))
        await _fails(client.submit_batch([]))
        await _fails(client.get("j1"))
        await _fails(client.cancel("j1"))
        await _fails(client.list())
        await _fails(client.list_workers())
        await _fails(client.upload(b"payload"))
        await _fails(client.download("b1"))
        await _fails(_drain(client.watch("j1")))
        await _fails(_drain(client.run("echo")))
        await _fails(_drain(client.watch_stats()))
    methods = {
        *("Submit", "SubmitBatch", "Get", "Cancel", "List", "ListWorkers", "Upload"),
        *("Download", "Watch", "Run", "WatchStats"),
    }
    assert set(recording.calls) == methods
    for method, metadata in recording.calls.items():
        assert metadata.get("authorization") == f"Bearer {TOKEN}", method


async def test_without_a_token_no_authorization_is_sent(recorder: tuple[Recorder, str]) -> None:
    recording, address = recorder
    async with AsyncClient(address, settings=ClientSettings(gateway=address)) as client:
        await _fails(client.get("j1"))
    assert "authorization" not in recording.calls["Get"]


class _Handler:
    def attach(self) -> dispatcher_pb2.Attach:
        return dispatcher_pb2.Attach(worker_id="w1", slots=1)

    def on_welcome(self, welcome: dispatcher_pb2.Welcome) -> None:
        pass

    def on_response(self, response: dispatcher_pb2.SessionResponse) -> None:
        pass


async def test_a_worker_sends_its_token_on_its_session_and_blob_calls(
    recorder: tuple[Recorder, str], caplog: pytest.LogCaptureFixture
) -> None:
    recording, address = recorder
    settings = WorkerSettings(
        gateway=address, worker_id="w1", slots=1, token=TOKEN, close_timeout=0
    )
    session = Session(settings, _Handler())
    with caplog.at_level(logging.DEBUG):
        session.start()
        async with asyncio.timeout(10):
            while "Session" not in recording.calls:  # noqa: ASYNC110  # the server's doing
                await asyncio.sleep(0.01)
        await session.close()
    payloads = Payloads(settings)
    await _fails(payloads.fetch({"input": job_pb2.BlobRef(id="b1", size=1)}))
    await payloads.close()
    assert recording.calls["Session"]["authorization"] == f"Bearer {TOKEN}"
    assert recording.calls["Download"]["authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in caplog.text


def test_certificate_files_are_read_again_only_when_they_change(
    authority: Authority,
    make_authority: Callable[[str], Authority],
    server_cert: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = server_cert
    files = CertificateFiles(str(cert), str(key))
    assert isinstance(files.load(), grpc.ServerCertificateConfiguration)
    assert files.fetch() is None  # unchanged
    make_authority("next").install(cert, key)
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
    assert files.fetch() is None
    # Half-written: the certificate cut short. The one in use stays, with one warning.
    whole = cert.read_bytes()
    with caplog.at_level(logging.WARNING, logger="gateway"):
        cert.write_bytes(whole[: len(whole) // 2])
        assert files.fetch() is None
        assert files.fetch() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "--tls-cert" in warnings[0].getMessage()
    assert "keeping the TLS certificate in use" in warnings[0].getMessage()
    # A certificate whose key is not written yet is not taken either.
    authority.install(cert, key)
    key.write_bytes(make_authority("third").ca.issue_cert("x").private_key_pem.bytes())
    assert files.fetch() is None
    authority.install(cert, key)  # now both are new
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)


def test_bad_certificate_files_stop_the_gateway_with_a_named_file(
    tmp_path: Path, server_cert: tuple[Path, Path]
) -> None:
    cert, key = server_cert
    with pytest.raises(OSError, match=r"--tls-key .*missing\.key: no such file"):
        CertificateFiles(str(cert), str(tmp_path / "missing.key")).load()
    with pytest.raises(OSError, match=r"--tls-cert .* and --tls-key .*: not a PEM certificate"):
        CertificateFiles(str(key), str(key)).load()
    garbage = tmp_path / "clients.pem"
    garbage.write_text("not a CA")
    with pytest.raises(OSError, match=r"--tls-client-ca .*clients\.pem"):
        CertificateFiles(str(cert), str(key), str(garbage)).load()
