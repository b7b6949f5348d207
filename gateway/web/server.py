"""Run the ASGI app behind real TLS with uvicorn (h11), requiring client certificates.

uvicorn builds its own SSL context from file names and cannot set a TLS floor or a cipher list,
so we hand it ours through ``ssl_context_factory``. The h11 protocol is subclassed only to put
the peer's certificate (DER) into the ASGI ``state`` of each request of that connection, so
handlers and audit know who the caller is.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.config import Config
from gateway.security.tls import server_context
from gateway.web.app import Handler, create_app

log = logging.getLogger("xig.server")


class _PeerCertH11(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # large MTOM responses: let the producer run ahead of drain() by a few MiB, not 64 KiB
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app_state = {**self.app_state, "tls_peer_certificate": der}


class _Server(uvicorn.Server):
    """uvicorn server that signals, without polling, when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def uvicorn_config(config: Config, app: Starlette, *, log_level: str = "warning") -> uvicorn.Config:
    ctx = server_context(config.server.certificate, config.server.private_key, config.server.client_ca)
    return uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        http=_PeerCertH11,
        ssl_certfile=str(config.server.certificate),  # required by uvicorn to switch TLS on
        ssl_context_factory=lambda _cfg, _default: ctx,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=int(config.server.shutdown_timeout),
        server_header=False,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _responding(config: Config) -> tuple[dict[str, Handler], Any]:
    from gateway.responding.assembly import RespondingServices
    from gateway.web.handlers import responding_handlers

    services = RespondingServices.open(config)
    return responding_handlers(services), services


def serve(config: Config, handlers: Mapping[str, Handler] | None = None, **app_kwargs: Any) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (graceful shutdown).

    Without ``handlers`` the full responding gateway is assembled from the configuration.
    """
    services = None
    if handlers is None:
        handlers, services = _responding(config)
    app = create_app(config, handlers, **app_kwargs)
    server = _Server(uvicorn_config(config, app, log_level="info"))

    async def run() -> None:
        try:
            await server.serve()
        finally:  # in the serving loop: backends' connections belong to it
            if services is not None:
                await services.aclose()

    with server.capture_signals():  # graceful shutdown on SIGINT/SIGTERM, as uvicorn.Server.run does
        asyncio.run(run())


class BackgroundServer:
    """A gateway serving in a thread of this process (tests, the demo, the conformance simulator).

    Binds first (port 0 picks a free port), so ``url`` is known before serving starts, and
    ``start()`` returns once the server accepts connections.
    """

    def __init__(self, config: Config, handlers: Mapping[str, Handler] | None = None, **app_kwargs: Any) -> None:
        self.config = config
        self.services: Any = None
        if handlers is None:
            handlers, self.services = _responding(config)
        self.app = create_app(config, handlers, **app_kwargs)
        self.socket = bind(config.server.host, config.server.port)
        self.port = self.socket.getsockname()[1]
        self.server = _Server(uvicorn_config(config, self.app))
        self._thread = threading.Thread(target=self._run, name=f"xig-server-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.config.server.host
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.socket])
        finally:  # in the serving loop: backends' connections belong to it
            if self.services is not None:
                await self.services.aclose()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by start()/stop()
            self._error = exc
            self.server.ready.set()

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        if not self.server.ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"gateway did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
