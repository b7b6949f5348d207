"""The outbound client's network backend (asyncio streams, the loop's own TLS) under httpx, on both loops,
against real TLS servers on loopback: what it connects with, keep-alive, a closed idle connection,
timeouts and TLS failures with their cause."""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import httpx
import pytest

from gateway.initiating.client import _chain  # the errors behind one (cause, else context)
from gateway.security.certs import CertSet
from gateway.security.tls import client_context, server_context
from gateway.web import loop as event_loop
from gateway.web.netbackend import LoopStream, loop_tls_transport

LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


def _server_ctx(c: CertSet) -> ssl.SSLContext:
    return server_context(c.gateway_cert, c.gateway_key, c.ca_cert)  # mutual TLS, as every XIG peer


def _client_ctx(c: CertSet) -> ssl.SSLContext:
    return client_context(c.partner_cert, c.partner_key, c.ca_cert)


class Server:
    """A TLS HTTP/1.1 server answering ``body`` with Content-Length; ``close_after`` requests per connection."""

    def __init__(self, body: bytes = b"hello", *, close_after: int = 100, silent: bool = False) -> None:
        self.body, self.close_after, self.silent = body, close_after, silent
        self.connections = 0
        self.closed = asyncio.Event()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(self.close_after):
                head = await r.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await r.readexactly(length)
                if self.silent:
                    await r.read()  # never answers; returns when the client gives up
                    return
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body) + self.body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()
            await w.wait_closed()
            self.closed.set()


async def _with(server: Server, ctx: ssl.SSLContext, work: Callable[[str], Awaitable[None]]) -> None:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=ctx)
    try:
        await work(f"https://localhost:{srv.sockets[0].getsockname()[1]}/x")
    finally:
        srv.close()


@LOOPS
def test_requests_go_through_the_loops_tls_and_reuse_the_connection(pki: CertSet,
                                                                     loop_kind: event_loop.EventLoopKind) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: many TLS records and reads
    server = Server(body)

    async def work(url: str) -> None:
        async with httpx.AsyncClient(transport=loop_tls_transport(_client_ctx(pki))) as client:
            for _ in range(3):
                resp = await client.post(url, content=b"ping")
                assert resp.status_code == 200 and resp.content == body
                assert isinstance(resp.extensions["network_stream"], LoopStream)  # not anyio's TLS stream
                ssl_object = resp.extensions["network_stream"].get_extra_info("ssl_object")
                assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        assert server.connections == 1  # kept alive

    event_loop.run(_with(server, _server_ctx(pki), work), loop_kind)


@LOOPS
def test_an_idle_connection_the_server_closed_is_not_reused(pki: CertSet,
                                                            loop_kind: event_loop.EventLoopKind) -> None:
    server = Server(close_after=1)  # answers one request, then closes the kept-alive connection

    async def work(url: str) -> None:
        async with httpx.AsyncClient(transport=loop_tls_transport(_client_ctx(pki))) as client:
            assert (await client.post(url, content=b"1")).content == b"hello"
            await server.closed.wait()
            # reusing the dead connection would fail with "server disconnected without a response"
            assert (await client.post(url, content=b"2")).content == b"hello"
        assert server.connections == 2

    event_loop.run(_with(server, _server_ctx(pki), work), loop_kind)


@LOOPS
def test_a_silent_server_times_out_as_a_read_timeout(pki: CertSet, loop_kind: event_loop.EventLoopKind) -> None:
    server = Server(silent=True)

    async def work(url: str) -> None:
        async with httpx.AsyncClient(transport=loop_tls_transport(_client_ctx(pki))) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, content=b"x", timeout=httpx.Timeout(5, read=0.3))

    event_loop.run(_with(server, _server_ctx(pki), work), loop_kind)


@LOOPS
def test_tls_failures_keep_their_cause(pki: CertSet, rogue_pki: CertSet, loop_kind: event_loop.EventLoopKind) -> None:
    async def untrusted(url: str) -> None:
        async with httpx.AsyncClient(transport=loop_tls_transport(_client_ctx(pki))) as client:
            with pytest.raises(httpx.ConnectError) as info:
                await client.post(url, content=b"x")
        assert any(isinstance(c, ssl.SSLCertVerificationError) for c in _chain(info.value)), _chain(info.value)

    event_loop.run(_with(Server(), _server_ctx(rogue_pki), untrusted), loop_kind)  # a CA we do not trust

    async def refused() -> None:
        async with httpx.AsyncClient(transport=loop_tls_transport(_client_ctx(pki))) as client:
            with pytest.raises(httpx.ConnectError) as info:
                await client.post("https://127.0.0.1:9/x", content=b"x")
        assert any(isinstance(c, ConnectionRefusedError) for c in _chain(info.value)), _chain(info.value)

    event_loop.run(refused(), loop_kind)
