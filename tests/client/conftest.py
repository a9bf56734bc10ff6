"""Fixtures of the client tests: a scripted gateway on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.fake_gateway import FakeGateway, serve


@pytest.fixture
def fake() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def gateway(fake: FakeGateway) -> Iterator[str]:
    """The address of a server that answers with `fake`."""
    server, address = serve(fake)
    try:
        yield address
    finally:
        server.stop(None)
