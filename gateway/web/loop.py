"""The event loop XIG runs on: its servers, and the command line's steps (``xig discover``, ``pull-priors``…).

``[server] event_loop``: ``"uvloop"`` (libuv, the default) or ``"asyncio"`` (the standard library's).
uvloop's TLS and socket layers are compiled: measured by ``bench/rad75.py`` on this project's 2-core
machine, the gateway process spends about a quarter less CPU per byte of a RAD-75 stream than on
asyncio's own loop. Everything XIG does on the loop (its TLS set-up, transports, ``call_later``,
threads through anyio) works the same on both (the TLS set-up is tested on both), and ``"asyncio"``
stays available as a fallback.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoopKind = Literal["uvloop", "asyncio"]
_T = TypeVar("_T")


def new_event_loop(kind: EventLoopKind) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def ssl_protocol(loop: asyncio.AbstractEventLoop, app_protocol: asyncio.BaseProtocol, context: ssl.SSLContext,
                 waiter: asyncio.Future[None], *, handshake_timeout: float,
                 shutdown_timeout: float) -> asyncio.BaseProtocol:
    """The server-side TLS protocol of ``loop``'s own implementation (what ``loop.start_tls`` builds), not yet
    connected: give it the TCP transport with ``transport.set_protocol(p)`` and ``p.connection_made(transport)``;
    ``waiter`` completes when the handshake has (or raises why not); then ``p._get_app_transport()`` is the
    TLS transport for ``app_protocol``."""
    cls: Any = asyncio.sslproto.SSLProtocol
    try:
        import uvloop
        import uvloop.loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop works without it
        pass
    else:
        if isinstance(loop, uvloop.Loop):
            cls = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # compiled, not in its stubs
    protocol: asyncio.BaseProtocol = cls(loop, app_protocol, context, waiter, True, None, call_connection_made=False,
                                         ssl_handshake_timeout=handshake_timeout,
                                         ssl_shutdown_timeout=shutdown_timeout)
    return protocol


def run(main: Coroutine[Any, Any, _T], kind: EventLoopKind) -> _T:
    """``asyncio.run(main)`` on a new loop of ``kind``."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(main)


def run_call(kind: EventLoopKind, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """``anyio.run(fn, *args)`` on a new loop of ``kind``: how the command line runs its steps, so that the
    outbound client's TLS (the loop's own, :mod:`gateway.web.netbackend`) is uvloop's compiled one."""
    async def main() -> _T:
        return await fn(*args)
    return run(main(), kind)


__all__ = ["EventLoopKind", "new_event_loop", "run", "run_call", "ssl_protocol"]
