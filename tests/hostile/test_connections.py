"""Connections: a flood of idle ones, silent ones and too many watches from one address
neither exhaust the gateway nor keep others out."""

from __future__ import annotations

import asyncio
import socket

import grpc
import psutil
import pytest

from jobmesh import AsyncClient, Unavailable
from jobmesh.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.cluster import Cluster, until

FLOOD = 400


async def test_a_flood_of_idle_connections_neither_keeps_clients_out_nor_stays(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway("--handshake-timeout", "1")
    cluster.worker(gw, "w1")
    gateway = psutil.Process(gw.pid)
    before = gateway.num_fds()
    flood = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(FLOOD)]
    try:
        async with AsyncClient(gw.address) as client:
            job = await client.wait((await client.submit("echo")).job.id)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        # Silent connections are dropped after the handshake timeout: descriptors come back.
        await until(lambda: gateway.num_fds() < before + 20)
    finally:
        for sock in flood:
            sock.close()


async def test_past_the_connection_quota_connections_are_closed_not_held(
    cluster: Cluster,
) -> None:
    gw = cluster.gateway("--max-connections", "32", "--handshake-timeout", "1")
    gateway = psutil.Process(gw.pid)
    before = gateway.num_fds()
    flood = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(FLOOD)]
    try:
        assert gateway.num_fds() < before + 32 + 20
        # Once the silent ones are dropped, a client gets in again.
        async with asyncio.timeout(30):
            while True:
                try:
                    async with AsyncClient(gw.address) as client:
                        await client.submit("echo")
                    break
                except Unavailable:
                    await asyncio.sleep(0.2)
    finally:
        for sock in flood:
            sock.close()


async def test_a_connection_that_never_says_hello_is_closed(cluster: Cluster) -> None:
    gw = cluster.gateway("--handshake-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.settimeout(20)
        received = b""
        while chunk := sock.recv(4096):  # the server's settings frame, then EOF
            received += chunk
    assert chunk == b""


async def test_an_idle_channel_is_closed_by_the_gateway(cluster: Cluster) -> None:
    gw = cluster.gateway("--max-connection-idle", "0.5")
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        await stub.List(job_service_pb2.ListRequest())
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        async with asyncio.timeout(20):
            while channel.get_state() == grpc.ChannelConnectivity.READY:
                await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        assert channel.get_state() == grpc.ChannelConnectivity.IDLE


async def test_watch_streams_per_address_are_limited(cluster: Cluster) -> None:
    gw = cluster.gateway("--max-watches-per-peer", "5")
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        async with AsyncClient(gw.address) as client:
            job_id = (await client.submit("nobody.serves.this")).job.id
        watches = []
        for _ in range(5):
            call = stub.Watch(job_service_pb2.WatchRequest(job_id=job_id))
            first = await call.read()
            assert first.event.state == job_pb2.JOB_STATE_QUEUED
            watches.append(call)
        extra = stub.Watch(job_service_pb2.WatchRequest(job_id=job_id))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await extra.read()
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 5" in (raised.value.details() or "")
        # One closes: there is room for another.
        watches.pop().cancel()
        async with asyncio.timeout(20):
            while True:
                again = stub.Watch(job_service_pb2.WatchRequest(job_id=job_id))
                try:
                    first = await again.read()
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(0.05)
        assert first.event.job_id == job_id
        for call in [*watches, again]:
            call.cancel()
