"""The session loop in this process, against a real (scripted) Dispatcher server: whatever
goes wrong between streams, it attaches again, a result the gateway cannot take is not
resent forever, and a refusal is sent once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from jobmesh.v1 import dispatcher_pb2 as d
from tests.worker.fake_gateway import TIMEOUT, FakeGateway, FakeSession, until
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


def unreadable(job_id: str) -> d.SessionRequest:
    """A Completed the gateway cannot take: over its message limit (the fake gateway keeps
    gRPC's default of 4 MiB; the worker sends up to its own, 64 MiB)."""
    request = d.SessionRequest()
    completed = request.completed.add(job_id=job_id, attempt=1)
    completed.result.outputs["big"] = b"x" * (5 << 20)
    return request


def refused(job_id: str) -> d.SessionRequest:
    return d.SessionRequest(refused=[d.Refused(job_id=job_id, attempt=1, reason="busy")])


async def marked(stream: FakeSession, job_id: str, session: Session) -> list[object]:
    """Everything the stream carried before a progress report sent now, and with it."""
    session.send(d.SessionRequest(progress=[d.Progress(job_id=job_id, attempt=1)]))
    before: list[object] = []
    async with asyncio.timeout(TIMEOUT):
        while not isinstance(item := await stream.items.get(), d.Progress):
            before.append(item)
    while not stream.items.empty():  # sent in the same (coalesced) message
        before.append(stream.items.get_nowait())
    return before


async def test_an_error_between_streams_does_not_end_the_session(
    gateway: FakeGateway, session: Session
) -> None:
    first = await gateway.session()
    await until(lambda: session.connected)
    gateway.refuse = True
    first.end()
    await until(lambda: not session.connected)
    # Queued while no stream is up: carried over to each next stream (issue #8's zombie
    # was a worker that a failed carry-over left without one).
    progress = d.Progress(job_id="p", attempt=1, fraction=0.5)
    session.send(d.SessionRequest(progress=[progress]))
    session.send(unreadable("big"))
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
    session.send(unreadable("big"))
    # Each stream the result goes out on breaks; after DELIVERY_TRIES of them it is
    # reported as failed instead, which the gateway can read.
    while (failed := await failed_or_ended(streams[-1])) is None:
        streams.append(await gateway.session())
    assert (failed.job_id, failed.attempt) == ("big", 1)
    assert (failed.error.code, failed.error.retryable) == ("RESULT_UNDELIVERABLE", True)
    assert len(streams) == DELIVERY_TRIES + 1
    # Still one session, attached and serving.
    assert session.connected
    assert session.unacknowledged == 1  # the fake gateway never acknowledges


async def test_a_refusal_goes_once_and_waits_for_no_acknowledgement(
    gateway: FakeGateway, session: Session
) -> None:
    first = await gateway.session()
    await until(lambda: session.connected)
    session.send(refused("r1"))
    item = await first.next(d.Refused)
    assert item == d.Refused(job_id="r1", attempt=1, reason="busy")
    assert session.unacknowledged == 0
    first.end()
    again = await gateway.session()
    # The gateway may have queued the job again, under the same attempt: no late copy.
    assert not [i for i in await marked(again, "mark", session) if isinstance(i, d.Refused)]


async def test_a_refusal_queued_while_no_stream_is_up_goes_after_the_next_attach(
    gateway: FakeGateway, session: Session
) -> None:
    first = await gateway.session()
    await until(lambda: session.connected)
    gateway.refuse = True
    first.end()
    await until(lambda: not session.connected)
    session.send(refused("r2"))
    gateway.refuse = False
    again = await gateway.session()
    item = await again.next(d.Refused)
    assert item == d.Refused(job_id="r2", attempt=1, reason="busy")
