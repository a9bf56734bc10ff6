"""A bearer token read from a file and read again when the file changes, as kubelet rewrites
a projected service-account token before it expires: the file watch without processes, and
a worker that keeps working across a rotation of its token at a real gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path

import pytest

from jobmesh import AsyncClient, ClientSettings, InvalidArgument, JobState
from jobmesh.channels import TokenSource
from jobmesh.errors import PermissionDenied, Unauthenticated
from tests.cluster import Cluster, until
from tests.security.auth_fixtures import ADMIN, ALICE, WORKER, secured, write_auth
from tests.security.test_workers import workers
from worker_service.config import WorkerSettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class ProjectedVolume:
    """A directory laid out as kubelet's projected volume: `token` links to `..data/token`,
    and `..data` to a directory of the current version, swapped by renaming a new link."""

    def __init__(self, root: Path, token: str) -> None:
        self.root = root
        self.root.mkdir()
        self.path = root / "token"
        self._version = 0
        self.write(token)
        self.path.symlink_to("..data/token")

    def write(self, token: str) -> None:
        self._version += 1
        version = self.root / f"..v{self._version}"
        version.mkdir()
        (version / "token").write_text(token)
        link = self.root / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.root / "..data")

    def remove(self) -> None:
        (self.root / "..data").unlink()


def test_a_token_file_is_read_again_when_it_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    clock = Clock()
    source = TokenSource(path=path, clock=clock)
    assert source.metadata() == auth("first-token")

    new = tmp_path / "token.new"
    new.write_text("other-token")  # as long as the first: the inode tells them apart
    os.replace(new, path)
    assert source.metadata() == auth("first-token")  # looked at once a second at most
    clock.now += 1
    assert source.metadata() == auth("other-token")

    with caplog.at_level(logging.INFO):
        path.write_text("")  # caught half-written: the last token stays
        clock.now += 1
        assert source.metadata() == auth("other-token")
        path.write_text("third-token-longer")  # its length shows the change within a tick
        clock.now += 1
        assert source.metadata() == auth("third-token-longer")
    assert "token_file" in caplog.text
    assert "other-token" not in caplog.text
    assert "third-token" not in caplog.text


def test_a_projected_token_swapped_by_its_symlink_is_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = ProjectedVolume(tmp_path / "sa", "jwt-one")
    clock = Clock()
    source = TokenSource(path=volume.path, clock=clock)
    assert source.metadata() == auth("jwt-one")
    volume.write("jwt-two")
    clock.now += 1
    assert source.metadata() == auth("jwt-two")

    with caplog.at_level(logging.WARNING):
        volume.remove()
        for _ in range(3):
            clock.now += 1
            assert source.metadata() == auth("jwt-two")
        volume.write("jwt-three")
        clock.now += 1
        assert source.metadata() == auth("jwt-three")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "token_file" in warning
    assert "stays in use" in warning
    assert "jwt-" not in caplog.text


@pytest.mark.parametrize("content", [None, "", "  \n"], ids=["missing", "empty", "blank"])
def test_a_token_file_that_holds_no_token_at_start_is_refused(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidArgument) as raised:
        TokenSource(path=path)
    assert raised.value.field == "token_file"
    assert str(path) in str(raised.value)


def test_a_token_and_a_token_file_are_exclusive(tmp_path: Path) -> None:
    env = {"JOBMESH_TOKEN": "t", "JOBMESH_TOKEN_FILE": str(tmp_path / "token")}
    with pytest.raises(InvalidArgument, match="token_file"):
        ClientSettings.from_env(env)
    with pytest.raises(ValueError, match="token and token_file"):
        WorkerSettings.from_env(env)


async def test_a_worker_keeps_working_when_its_token_file_is_rotated(cluster: Cluster) -> None:
    gw = secured(cluster, principals=[ADMIN, ALICE, WORKER])
    volume = ProjectedVolume(cluster.tmp / "sa", WORKER.token)
    cluster.worker(gw, "w-1", "--token-file", str(volume.path), wait=False)
    await until(lambda: "w-1" in workers(gw))
    client_token = cluster.tmp / "alice-token"
    client_token.write_text(ALICE.token + "\n")
    payload = os.urandom(3 << 20)  # a blob each way: the worker downloads and uploads it
    async with AsyncClient(gw.address, token_file=client_token) as client:
        first = (await client.submit("echo", inputs={"data": payload})).job
        assert (await client.wait(first.id)).state == JobState.SUCCEEDED

        # The token is rotated: the worker's file first, then the gateway's auth file.
        rotated = time.monotonic()
        rotated_worker = dataclasses.replace(WORKER, token="workers-rotated-Zq81LmXc")
        volume.write(rotated_worker.token)
        write_auth(cluster.tmp / "auth.toml", [ADMIN, ALICE, rotated_worker])
        async with AsyncClient(gw.address, token=WORKER.token) as old:
            while not await unauthenticated(old):  # noqa: ASYNC110  # the gateway reloads
                await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, rotated + 1.1 - time.monotonic()))

        second = (await client.submit("echo", inputs={"data": payload})).job
        done = await client.wait(second.id)
        assert done.state == JobState.SUCCEEDED, done.error
        assert (await client.outputs(done))["data"] == payload
    assert "w-1" in workers(gw)


async def unauthenticated(client: AsyncClient) -> bool:
    """Whether the gateway refuses the client's token as no principal's."""
    try:
        await client.list()
    except Unauthenticated:
        return True
    except PermissionDenied:  # a worker's token: known, but not a client's
        pass
    return False
