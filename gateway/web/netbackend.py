"""The outbound HTTP client's sockets and TLS: asyncio streams with the event loop's own TLS, under httpx.

httpx (through httpcore) normally runs its connections on anyio streams, whose TLS is an
``ssl.SSLObject`` driven from Python: every TLS record in or out, and every handshake step, is a
round of Python calls. Here httpcore gets a network backend on asyncio's streams instead, so TLS is
the event loop's — on uvloop (XIG's default loop, ``[server] event_loop``) compiled code. Measured
(``bench``-style, this project's 2-core machine, the same run): receiving a 200 MB RAD-75 answer
through :class:`~gateway.web.client.SoapClient` cost the initiating side 1.66 CPU-s with anyio's TLS
and 0.77 CPU-s with this backend on uvloop; an XCPD fan-out to 50 partners ~15 % less CPU. On the
standard library's loop it costs about what anyio's does.

httpx is kept for everything else (HTTP/1.1 framing, pooling, timeouts, its errors): the backend only
opens sockets (``TCP_NODELAY``), upgrades them to TLS and reads and writes, mapping failures to
httpcore's exceptions with the original error as their cause (which
:func:`~gateway.initiating.client.classify_transport_error` reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

#: httpx's defaults (``httpx.Limits()``), kept
_MAX_CONNECTIONS, _MAX_KEEPALIVE, _KEEPALIVE_EXPIRY = 100, 20, 5.0
_SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
_STREAM_LIMIT = 1024 * 1024  # what a stream buffers ahead of httpcore's 64 KiB reads before pausing the socket


@contextlib.contextmanager
def _mapped(timeout_error: type[httpcore.TimeoutException], other: type[httpcore.NetworkError]) -> Iterator[None]:
    try:
        yield
    except TimeoutError as exc:
        raise timeout_error(str(exc) or "timed out") from exc
    except OSError as exc:  # ssl.SSLError included: the cause tells TLS failures apart
        raise other(str(exc) or type(exc).__name__) from exc


def _socket_readable(sock: Any) -> bool:
    """Whether an idle connection's socket has something to read — data or, usually, the peer's close."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


class LoopStream(httpcore.AsyncNetworkStream):
    """One connection: an asyncio stream pair, upgraded to TLS in place by :meth:`start_tls`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()

    async def aclose(self) -> None:
        self._writer.close()  # a TLS transport sends its close_notify; nothing to wait for

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> LoopStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":  # asked of idle pooled connections: a closed one must not be reused
            return self._reader.at_eof() or self._writer.is_closing() or _socket_readable(
                self._writer.get_extra_info("socket"))
        return None


class LoopNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on the running asyncio loop (see the module docstring)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[_SocketOption] | None = None,
                          ) -> LoopStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None, limit=_STREAM_LIMIT)
        sock = writer.get_extra_info("socket")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        except OSError as exc:
            writer.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return LoopStream(reader, writer)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[_SocketOption] | None = None,
                                  ) -> LoopStream:
        raise httpcore.UnsupportedProtocol("unix sockets are not used by XIG's client")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def loop_tls_transport(ssl_context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    """An httpx transport (HTTP/1.1, httpx's default limits) whose connections use :class:`LoopNetworkBackend`.

    httpx has no public way to pass httpcore a network backend; its transport keeps its pool in
    ``_pool`` (httpx 0.23 – 0.29), which is replaced here. ``tests/test_netbackend.py`` fails if that
    changes.
    """
    transport = httpx.AsyncHTTPTransport(verify=ssl_context)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context, max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_KEEPALIVE,
        keepalive_expiry=_KEEPALIVE_EXPIRY, http1=True, http2=False, network_backend=LoopNetworkBackend())
    return transport


__all__ = ["LoopNetworkBackend", "LoopStream", "loop_tls_transport"]
