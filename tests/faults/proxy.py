"""A TCP proxy that fault tests put between a worker and the gateway, to break the network.

It runs its own event loop in a thread, so it keeps forwarding whatever the test's loop is
busy with. `cut()` resets every connection, like a NAT or load balancer dropping its state;
`blackhole()` keeps connections open but drops every byte, like a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 65536


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers = [client]
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        """Closes both sockets with a TCP RST, dropping whatever was buffered."""
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target` (HOST:PORT) until told to fail."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy")
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._blackholed = False
        self.port = 0
        self.connections = 0
        """Connections accepted so far (a reconnecting worker adds one each time)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def retarget(self, target: str) -> None:
        """Forwards new connections to `target` from now on (a Service's other endpoint)."""
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))

    def cut(self) -> None:
        """Resets every open connection; new ones are accepted as usual."""
        self._call(self._reset_all())

    def blackhole(self) -> None:
        """From now on every byte, both ways and on new connections too, is dropped."""
        self._call(self._set_blackholed(True))

    def restore(self) -> None:
        """Forwards again: blackholed connections are reset so their peers reconnect."""
        self._call(self._set_blackholed(False))
        self.cut()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # On the proxy's loop.

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _set_blackholed(self, value: bool) -> None:
        self._blackholed = value

    async def _reset_all(self) -> None:
        links = list(self._links)
        for link in links:
            link.reset()
        await asyncio.gather(*(t for link in links for t in link.tasks), return_exceptions=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._reset_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self._links.add(link)
        task = asyncio.current_task()
        assert task is not None
        link.tasks.append(task)
        try:
            if self._blackholed:
                await self._pump(reader, None)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError:
                link.reset()
                return
            link.writers.append(up_writer)
            upstream = asyncio.create_task(self._pump(up_reader, writer))
            link.tasks.append(upstream)
            try:
                await self._pump(reader, up_writer)
            finally:
                upstream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upstream
        except asyncio.CancelledError:
            pass
        finally:
            self._links.discard(link)
            for w in link.writers:
                w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None
    ) -> None:
        """Copies until EOF; drops the bytes while the proxy is blackholed."""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(CHUNK):
                if self._blackholed or writer is None:
                    continue
                writer.write(data)
                await writer.drain()
        if writer is not None and not self._blackholed:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()
