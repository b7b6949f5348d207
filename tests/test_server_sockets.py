"""Listening sockets: every accepted connection has Nagle's algorithm off, on both event loops.

With Nagle on, a response written in two pieces (head, then body) on a kept-alive connection waits for
the client's delayed ACK (40 ms on Linux) — asyncio turns it off only for sockets made with
``IPPROTO_TCP``, which :func:`gateway.web.server.bind` therefore asks for.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.web import loop as event_loop
from gateway.web.server import bind


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_accepted_connections_have_nagle_off(kind: event_loop.EventLoopKind) -> None:
    async def accepted_nodelay() -> int:
        sock = bind("127.0.0.1", 0)
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = writer.get_extra_info("socket")
            got.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            value = await asyncio.wait_for(got, 10)
            writer.close()
        return value

    assert bind("127.0.0.1", 0).proto == socket.IPPROTO_TCP
    assert event_loop.run(accepted_nodelay(), kind) == 1
