"""Run the ASGI app behind real TLS with uvicorn (h11), requiring client certificates.

TLS is terminated by XIG's own h11 protocol rather than by uvicorn: uvicorn's listener is plain TCP,
and each accepted connection is handed, inside ``connection_made``, to the event loop's own TLS
protocol (asyncio's or uvloop's ``SSLProtocol``, built as ``loop.start_tls`` builds it; see
:func:`gateway.web.loop.ssl_protocol`) with our SSL context (TLS floor, BCP 195 ciphers, client
certificate required). Not ``loop.start_tls`` itself: it swaps the protocol one event-loop turn later,
and uvloop starts reading a new connection as soon as ``connection_made`` returns. Doing the handshake
ourselves gives three things uvicorn cannot: a failed handshake is *reported*
(:class:`~gateway.web.exchange.TlsFailure` to the ``tls_failure_observers``; asyncio only logs it in
debug mode), the TLS close timeout is bounded (:data:`SSL_SHUTDOWN_TIMEOUT`), and the peer's
certificate (DER) is put into the ASGI ``state`` of each request of that connection together with a
hook that aborts the connection (used when a streamed response must be cut off).

Graceful shutdown (SIGINT/SIGTERM for ``serve``, :meth:`BackgroundServer.stop`):

1. stop accepting, abort handshakes in progress, close idle keep-alive connections at once
   (close_notify, then the TCP connection — an idle client never delays a stop);
2. let in-flight requests finish within ``[server] shutdown_timeout`` (their connections close after
   the response);
3. then abort what is left through the app (:meth:`GatewayApp.abort_inflight`): a request still in its
   handler gets a busy answer ("shutting down"), a response being streamed is cut off by closing the
   connection, so the client sees an incomplete MTOM package, never a complete-looking one. Handlers
   clean up on cancellation (RAD-75 removes its spool directory);
4. anything still running after a short grace is cancelled and its connection aborted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.config import Config
from gateway.security.tls import server_context
from gateway.web import loop as event_loop
from gateway.web.app import ABORT_CONNECTION, DISCONNECT_PROBE, PEER_CERTIFICATE, GatewayApp, Handler
from gateway.web.exchange import (
    ExchangeObserver,
    HealthCheck,
    LifecycleEvent,
    LifecycleObserver,
    TlsFailure,
    TlsFailureObserver,
    notify,
)
from gateway.web.metrics import Metrics

log = logging.getLogger("xig.server")

#: seconds a TLS handshake may take
SSL_HANDSHAKE_TIMEOUT = 30.0
#: seconds we wait for the peer's close_notify after ours before dropping the connection
SSL_SHUTDOWN_TIMEOUT = 5.0
#: seconds aborted requests get to unwind, and closing connections to go away, during a stop
ABORT_GRACE = 5.0


class _TlsState:
    """Per-server TLS set-up shared by its connections."""

    def __init__(self, context: ssl.SSLContext, observers: Sequence[TlsFailureObserver]) -> None:
        self.context = context
        self.observers = list(observers)
        self.handshakes: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.closed: asyncio.Event | None = None  # created in the serving loop

    def connection_closed(self) -> None:
        if self.closed is not None:
            self.closed.set()


class _Pending(asyncio.Protocol):
    """Stands in for the HTTP protocol while the TLS handshake runs; forwards once it is connected."""

    def __init__(self) -> None:
        self.target: asyncio.Protocol | None = None
        self.buffer: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        if self.target is not None:
            self.target.data_received(data)
        else:
            self.buffer.append(data)

    def eof_received(self) -> bool | None:
        if self.target is not None:
            return self.target.eof_received()
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.target is not None:
            self.target.connection_lost(exc)
        else:
            self.lost = True

    def pause_writing(self) -> None:
        if self.target is not None:
            self.target.pause_writing()

    def resume_writing(self) -> None:
        if self.target is not None:
            self.target.resume_writing()


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason or 'CERTIFICATE_VERIFY_FAILED'}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return f"TLS handshake did not complete within {SSL_HANDSHAKE_TIMEOUT:g} s"
    if isinstance(exc, ConnectionResetError):
        return "connection reset during the TLS handshake"
    return f"{type(exc).__name__}: {exc}"


#: body chunks up to this size are written joined with their framing (one write, one TLS record)
_JOIN_BELOW = 16 * 1024


class _BodyPassthrough(h11.Connection):
    """h11's server connection, except that a body chunk goes to the transport as its pieces.

    uvicorn writes ``conn.send(h11.Data(...))``; h11's ``send`` joins the chunk-size line, the data and the
    CRLF of a chunked body into one new ``bytes`` — a copy of every byte of a streamed RAD-75 response.
    Here a large data object (``bytes`` or a ``memoryview`` of a PACS read) goes to the transport as it is,
    with ``writelines``: its size line (after the previous chunk's CRLF) and then the data; its own CRLF is
    held back for the next write (or the end of the body). A small chunk (a MIME part header) goes out in one
    joined write. So a TLS transport makes no record of its own of a few framing bytes — two per chunk
    before, each also a read for the client. ``send`` returns ``b""`` for data, which uvicorn's
    ``transport.write`` skips. Everything else is h11's own.
    """

    transport: asyncio.Transport | None = None
    _held = b""  # the last chunk's CRLF, not written yet

    def send(self, event: h11.Event) -> bytes | None:  # type: ignore[override]
        if type(event) is h11.Data and self.transport is not None:
            pieces = self.send_with_data_passthrough(event)
            if not pieces:
                return b""
            if len(pieces) != 3:  # not chunked (a Content-Length body): the data as it is
                self.transport.writelines(pieces)
                return b""
            size, data, crlf = pieces
            head, self._held = self._held + size, b""
            if len(data) < _JOIN_BELOW:
                self.transport.write(head + bytes(data) + crlf)
            else:
                self.transport.writelines([head, data])
                self._held = crlf
            return b""
        out = super().send(event)
        if self._held:
            out, self._held = self._held + (out or b""), b""
        return out


class _TlsH11(H11Protocol):
    """uvicorn's h11 protocol on a connection whose TLS handshake we run ourselves (see the module docstring)."""

    xig_tls: _TlsState  # set on the per-server subclass made by :func:`_protocol_class`
    _xig_raw: asyncio.Transport | None = None  # the TCP transport under TLS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TLS takes over the connection right here, before a byte is read: what asyncio's ``loop.start_tls``
        # does, minus its first event-loop turn (uvloop starts reading a new connection as soon as this
        # returns, so a ``pause_reading()`` here would not hold and the ClientHello would reach h11)
        raw: asyncio.Transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        state = self.xig_tls
        waiter: asyncio.Future[None] = loop.create_future()
        pending = _Pending()
        tls_protocol = event_loop.ssl_protocol(loop, pending, state.context, waiter,
                                               handshake_timeout=SSL_HANDSHAKE_TIMEOUT,
                                               shutdown_timeout=SSL_SHUTDOWN_TIMEOUT)
        raw.set_protocol(tls_protocol)
        tls_protocol.connection_made(raw)
        task = loop.create_task(self._handshake(raw, tls_protocol, waiter, pending))
        state.handshakes.add(task)
        task.add_done_callback(state.handshakes.discard)

    async def _handshake(self, raw: asyncio.Transport, tls_protocol: asyncio.BaseProtocol,
                         waiter: asyncio.Future[None], pending: _Pending) -> None:
        state = self.xig_tls
        peer = raw.get_extra_info("peername") or (None, None)
        try:
            await waiter
        except asyncio.CancelledError:
            raw.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - every handshake failure is reported, none escapes
            raw.abort()
            if isinstance(exc, ConnectionResetError) and exc.errno is None:
                # asyncio's way of saying "EOF during the handshake": closed without an alert (port probes,
                # load balancer checks) — nothing was attempted, nothing to report
                log.debug("connection from %s:%s closed during the TLS handshake", peer[0], peer[1])
                return
            failure = TlsFailure(peer[0], peer[1], _failure_reason(exc), dt.datetime.now(dt.UTC))
            log.warning("TLS handshake with %s:%s failed: %s", failure.peer_host, failure.peer_port, failure.reason)
            notify(state.observers, failure, "TLS failure")
            return
        tls: asyncio.Transport = tls_protocol._get_app_transport()  # type: ignore[attr-defined]
        if pending.lost:
            log.debug("connection from %s:%s closed before the TLS handshake completed", peer[0], peer[1])
            raw.abort()
            return
        if state.stopping:
            tls.abort()
            return
        tls.set_protocol(self)
        pending.target = self
        self._xig_raw = raw
        self._connected(tls)
        if pending.buffer:
            self.data_received(b"".join(pending.buffer))
        if pending.eof:
            tls.close()

    def _connected(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        limit = self.config.h11_max_incomplete_event_size  # as uvicorn made its own (None: h11's default)
        conn = _BodyPassthrough(h11.SERVER) if limit is None else _BodyPassthrough(h11.SERVER, limit)
        conn.transport = transport
        self.conn = conn  # nothing was received yet: h11's state is the initial one
        # large MTOM responses: let the producer run ahead of drain() by a few MiB, not 64 KiB
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER_CERTIFICATE: der, ABORT_CONNECTION: self._abort_connection,
                          DISCONNECT_PROBE: self._disconnect_probe}

    def _disconnect_probe(self) -> Callable[[], bool]:
        """For the request being processed now: a function telling whether its client has gone away.

        The TCP transport knows at once when a write failed (reset, broken pipe); the h11 cycle learns it
        only when the event loop runs the connection-lost callback.
        """
        cycle, raw = self.cycle, self._xig_raw
        return lambda: cycle is None or cycle.disconnected or (raw is not None and raw.is_closing())

    def _abort_connection(self) -> None:
        """Cut the connection off now (a response that cannot be completed must not look complete)."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.xig_tls.connection_closed()

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()  # idle: close (sends close_notify); busy: no keep-alive after this response
        if idle:
            self.transport.abort()  # do not wait for the peer's close_notify: an idle client may never send it


def _notify_lifecycle(observers: Sequence[LifecycleObserver], event: LifecycleEvent) -> None:
    notify(observers, event, "lifecycle")


def _protocol_class(state: _TlsState) -> type[_TlsH11]:
    return type("XigTlsH11", (_TlsH11,), {"xig_tls": state})


class _Server(uvicorn.Server):
    """uvicorn server that signals when it is listening and stops as the module docstring describes."""

    def __init__(self, config: uvicorn.Config, *, gateway: GatewayApp | None = None,
                 lifecycle_observers: Sequence[LifecycleObserver] = (), shutdown_timeout: float = 30.0) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.gateway = gateway
        self.lifecycle_observers = list(lifecycle_observers)
        self.shutdown_timeout = shutdown_timeout
        self.tls: _TlsState | None = getattr(config.http, "xig_tls", None)

    def _lifecycle(self, event: LifecycleEvent) -> None:
        _notify_lifecycle(self.lifecycle_observers, event)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.tls is not None:
            self.tls.closed = asyncio.Event()
        await super().startup(sockets)
        self.ready.set()
        if self.started:
            self._lifecycle("started")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.tls is not None:
            self.tls.stopping = True
        if self.gateway is not None:
            self.gateway.stopping = True
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        self._lifecycle("stopping")
        log.info("stopping: no new connections; waiting up to %g s for %d request(s)",
                 self.shutdown_timeout, len(self.server_state.tasks))
        if self.tls is not None:
            for task in list(self.tls.handshakes):
                task.cancel()
        for connection in list(self.server_state.connections):
            connection.shutdown()

        pending = await self._wait_tasks(self.shutdown_timeout)
        if pending:
            log.warning("%d request(s) still running after %g s: aborting them", len(pending), self.shutdown_timeout)
            if self.gateway is not None:
                self.gateway.abort_inflight()
            pending = await self._wait_tasks(ABORT_GRACE)
            for task in pending:
                task.cancel(msg="graceful shutdown timeout exceeded")
            await self._wait_tasks(ABORT_GRACE)

        await self._wait_connections(ABORT_GRACE)
        for connection in list(self.server_state.connections):
            if connection.transport is not None:
                connection.transport.abort()
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _wait_tasks(self, timeout: float) -> set[asyncio.Task[None]]:
        """Wait until every request task finished or ``timeout`` passed; return those still running."""
        deadline = time.monotonic() + timeout
        while self.server_state.tasks and not self.force_exit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.wait(set(self.server_state.tasks), timeout=remaining)
        return set(self.server_state.tasks)

    async def _wait_connections(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        closed = self.tls.closed if self.tls is not None else None
        while self.server_state.connections and closed is not None and not self.force_exit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            closed.clear()
            if not self.server_state.connections:
                return
            try:
                await asyncio.wait_for(closed.wait(), remaining)
            except TimeoutError:
                return


def uvicorn_config(config: Config, app: Starlette, *, log_level: str = "warning",
                   tls_failure_observers: Sequence[TlsFailureObserver] = ()) -> uvicorn.Config:
    ctx = server_context(config.server.certificate, config.server.private_key, config.server.client_ca)
    return uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        http=_protocol_class(_TlsState(ctx, tls_failure_observers)),
        lifespan="off",
        log_level=log_level,
        log_config=None,  # uvicorn's loggers propagate to ours (text or JSON, gateway.logs)
        access_log=False,
        timeout_graceful_shutdown=int(config.server.shutdown_timeout),
        server_header=False,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for ``sockets=``. Created with ``IPPROTO_TCP`` explicitly: asyncio disables
    Nagle's algorithm (``TCP_NODELAY``) only on connections whose socket says so, and with Nagle on, a
    response written in two pieces (head, then body) on a kept-alive connection waits for the client's
    delayed ACK — 40 ms per response on Linux."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


class GatewayServer:
    """One gateway ready to serve: its app, its services and its uvicorn server.

    What :func:`serve`, :class:`BackgroundServer` and the worker processes run. Without ``handlers``
    the full responding gateway is assembled from the configuration (database, PACS — metered when
    metrics are on). ``health_checks`` are *added* to the built-in ones (certificates; database and
    PACS when assembled here). ``app_kwargs`` go to :class:`GatewayApp` (e.g. ``metrics=``, ``schemas=``).
    """

    def __init__(self, config: Config, handlers: Mapping[str, Handler] | None = None, *,
                 log_level: str = "warning", observers: Sequence[ExchangeObserver] = (),
                 health_checks: Sequence[HealthCheck] = (), tls_failure_observers: Sequence[TlsFailureObserver] = (),
                 lifecycle_observers: Sequence[LifecycleObserver] = (), **app_kwargs: Any) -> None:
        from gateway.web.health import builtin_checks

        self.config = config
        self.services: Any = None
        if handlers is None:
            handlers, self.services = _responding(config)
        metrics: Metrics | None = app_kwargs.pop("metrics", None)
        if metrics is None and config.observability.metrics:
            metrics = Metrics()
        if metrics is not None and self.services is not None:
            self._meter_pacs(self.services, metrics)
        checks = builtin_checks(config, engine=self.services.engine if self.services else None,
                                backends=self.services.community.backends if self.services else ())
        observers, tls_failure_observers = list(observers), list(tls_failure_observers)
        lifecycle_observers = list(lifecycle_observers)
        if self.services is not None:  # the assembled gateway audits every exchange (ATNA)
            from gateway.web.handlers import ExchangeAuditor
            from gateway.web.health import AuditCheck

            audit = ExchangeAuditor(self.services.auditor)
            observers.append(audit)
            tls_failure_observers.append(audit.tls_failure)
            lifecycle_observers.append(audit.lifecycle)
            checks = [*checks, AuditCheck(self.services.trail)]
            if metrics is not None:
                trail = self.services.trail
                metrics.set_gauge_callback(
                    "xig_audit_spool_depth", "audit messages recorded but not yet delivered, per repository",
                    lambda: {r["name"]: r["pending"] or 0 for r in trail.status()["repositories"]},
                    labels=("repository",))
        self.gateway = GatewayApp(config, handlers, observers=observers, health_checks=[*checks, *health_checks],
                                  metrics=metrics, **app_kwargs)
        self.metrics = metrics
        self.app: Starlette = self.gateway.build()
        tls_observers = [*([metrics.observe_tls_failure] if metrics is not None else []), *tls_failure_observers]
        self.lifecycle_observers = lifecycle_observers
        uv_config = uvicorn_config(config, self.app, log_level=log_level, tls_failure_observers=tls_observers)
        self.server = _Server(uv_config, gateway=self.gateway, lifecycle_observers=self.lifecycle_observers,
                              shutdown_timeout=config.server.shutdown_timeout)

    @staticmethod
    def _meter_pacs(services: Any, metrics: Metrics) -> None:
        from gateway.pacs.metered import MeteredPacs

        backends = services.community.backends
        raw = list(backends)
        backends[:] = [MeteredPacs(b, metrics) for b in raw]  # every service reaches the PACS through community
        metrics.set_gauge_callback(
            "xig_pacs_open_associations", "open DIMSE associations to the PACS",
            lambda: {str(getattr(b, "name", b.source_id)): getattr(b, "open_associations", 0) for b in raw},
            labels=("backend",))

    @property
    def ready(self) -> threading.Event:
        """Set once the server listens (or failed to start)."""
        return self.server.ready

    def request_stop(self) -> None:
        """Begin the graceful stop (thread-safe: the serving loop notices within 0.1 s)."""
        self.server.should_exit = True

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until stopped; then release the services (in the serving loop: their connections belong to it)."""
        try:
            await self.server.serve(sockets=sockets)
        finally:
            # "stopped" first: observers (the audit of the stop) may still use the services
            _notify_lifecycle(self.lifecycle_observers, "stopped")
            if self.services is not None:
                await self.services.aclose()


def serve(config: Config, handlers: Mapping[str, Handler] | None = None, **kwargs: Any) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (graceful shutdown, see the module docstring).

    Keyword arguments as for :class:`GatewayServer` (observers, health_checks, tls_failure_observers,
    lifecycle_observers, and :class:`GatewayApp`'s).
    """
    kwargs.setdefault("log_level", "info")
    gateway = GatewayServer(config, handlers, **kwargs)
    with gateway.server.capture_signals():  # graceful shutdown on SIGINT/SIGTERM, as uvicorn.Server.run does
        event_loop.run(gateway.serve(), config.server.event_loop)


class BackgroundServer:
    """A gateway serving in a thread of this process (tests, the demo, the conformance simulator).

    Binds first (port 0 picks a free port), so ``url`` is known before serving starts, and
    ``start()`` returns once the server accepts connections. Keyword arguments as for :class:`GatewayServer`.
    """

    def __init__(self, config: Config, handlers: Mapping[str, Handler] | None = None, **kwargs: Any) -> None:
        self.config = config
        self.gateway_server = GatewayServer(config, handlers, **kwargs)
        self.services: Any = self.gateway_server.services
        self.gateway: GatewayApp = self.gateway_server.gateway
        self.app: Starlette = self.gateway_server.app
        self.server = self.gateway_server.server
        self.socket = bind(config.server.host, config.server.port)
        self.port = self.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=f"xig-server-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.config.server.host
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def metrics(self) -> Metrics | None:
        return self.gateway.metrics

    def _run(self) -> None:
        try:
            event_loop.run(self.gateway_server.serve(sockets=[self.socket]), self.config.server.event_loop)
        except BaseException as exc:  # noqa: BLE001 - reported by start()/stop()
            self._error = exc
            self.server.ready.set()

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        if not self.server.ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"gateway did not start: {self._error!r}")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; returns when the server has stopped (or ``timeout``, default: the shutdown
        timeout plus the abort graces, has passed)."""
        self.gateway_server.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout if timeout is not None else self.config.server.shutdown_timeout + 4 * ABORT_GRACE)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["ABORT_GRACE", "BackgroundServer", "GatewayServer", "SSL_HANDSHAKE_TIMEOUT", "SSL_SHUTDOWN_TIMEOUT", "bind",
           "serve", "uvicorn_config"]
