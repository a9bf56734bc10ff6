"""The session loop in this process, against a real (scripted) Dispatcher server: whatever
goes wrong between streams, it attaches again, and a result the gateway cannot read is not
resent forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jobmesh.v1 import dispatcher_pb2 as d
from tests.worker.fake_gateway import FakeGateway, FakeSession, until
from worker_service.config import WorkerSettings
from worker_service.session import DELIVERY_TRIES, Session


class _Handler:
    def attach(self) -> d.Attach:
        return d.Attach(worker_id="w1", slots=1)

    def on_welcome(self, welcome: d.Welcome) -> None:
        pass

    def on_response(self, response: d.SessionResponse) -> None:
        pass


@pytest.fixture
async def session(gateway: FakeGateway) -> AsyncIterator[Session]:
    settings = WorkerSettings(
        gateway=gateway.address,
        worker_id="w1",
        slots=1,
        reconnect_initial=0.01,
        reconnect_max=0.05,
        close_timeout=0,
    )
    s = Session(settings, _Handler())
    s.start()
    yield s
    await s.close()


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def unreadable(job_id: str) -> d.SessionRequest:
    """A Completed whose metadata protobuf parses as a Completed but not inside a
    SessionRequest: one level past its 100-level limit, as in the poison job of issue #8."""
    request = d.SessionRequest()
    completed = request.completed.add(job_id=job_id, attempt=1)
    completed.result.metadata.update(nested(33))
    return request


async def test_an_error_between_streams_does_not_end_the_session(
    gateway: FakeGateway, session: Session
) -> None:
    first = await gateway.session()
    await until(lambda: session.connected)
    gateway.refuse = True
    first.end()
    await until(lambda: not session.connected)
    # Queued while no stream is up: carrying them over to the next stream merges them into
    # one message, which protobuf cannot do with the deep one (the zombie of issue #8).
    progress = d.Progress(job_id="p", attempt=1, fraction=0.5)
    session.send(d.SessionRequest(progress=[progress]))
    session.send(unreadable("deep"))
    refused = gateway.refused
    # The next refusal is followed by a carry-over; a worker that survives it dials again.
    await until(lambda: gateway.refused >= refused + 2)
    gateway.refuse = False
    again = await gateway.session()
    assert again.attach.worker_id == "w1"


async def failed_or_ended(stream: FakeSession) -> d.Failed | None:
    """The first Failed the stream carries, or None if it ends first."""
    failed = asyncio.ensure_future(stream.next(d.Failed))
    ended = asyncio.ensure_future(stream.ended.wait())
    await asyncio.wait({failed, ended}, return_when=asyncio.FIRST_COMPLETED)
    ended.cancel()
    if not failed.done():
        failed.cancel()
        return None
    item = failed.result()
    assert isinstance(item, d.Failed)
    return item


async def test_a_result_the_gateway_cannot_read_fails_its_attempt_after_a_few_streams(
    gateway: FakeGateway, session: Session
) -> None:
    streams = [await gateway.session()]
    await until(lambda: session.connected)
    session.send(unreadable("deep"))
    # Each stream the result goes out on breaks; after DELIVERY_TRIES of them it is
    # reported as failed instead, which the gateway can read.
    while (failed := await failed_or_ended(streams[-1])) is None:
        streams.append(await gateway.session())
    assert (failed.job_id, failed.attempt) == ("deep", 1)
    assert (failed.error.code, failed.error.retryable) == ("RESULT_UNDELIVERABLE", True)
    assert len(streams) == DELIVERY_TRIES + 1
    # Still one session, attached and serving.
    assert session.connected
    assert session.unacknowledged == 1  # the fake gateway never acknowledges
