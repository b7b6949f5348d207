"""The ASGI application: one route per IHE endpoint plus ``?wsdl``, schemas, ``/health`` and ``/metrics``.

The path of one SOAP request (each step either passes or ends in one SOAP fault):

0. admission: the concurrency limits per partner and globally (:mod:`gateway.web.limits`); over a
   limit the request gets a busy answer at once (``XDSRepositoryBusy``, ``XDSRegistryBusy``, XCPD
   ``ResponderBusy`` or ``xig:Busy``) and its body is read only as far as that answer needs,
1. body read with the configured size limit (HTTP 413 + ``xig:MessageTooLarge``),
2. plain SOAP or MTOM/XOP decoded (:mod:`gateway.soap.mtom`),
3. hardened XML parse (:mod:`gateway.soap.xml`), SOAP 1.2 + WS-Addressing checks,
4. dispatch on ``wsa:Action`` — never on HTTP headers — (``wsa:ActionNotSupported``),
5. WS-Security / XUA verification → :class:`VerifiedIdentity` (``wsse:*`` faults),
6. XSD validation of the body (``xig:SchemaValidationFailed``),
7. the transaction handler, whose :class:`SoapResponse` is sent as plain SOAP or streamed MTOM.

Anything unexpected becomes a ``Receiver`` fault with a reference id; the stack trace goes to
the log only. CPU-heavy steps (parsing, signature verification, validation) run in a worker
thread so the event loop keeps serving other partners.

Every SOAP POST is recorded as an :class:`~gateway.web.exchange.Exchange` handed to the observers
once its response was sent or failed (metrics are one observer; audit another). Log lines of the
exchange carry its wsa:MessageID as correlation id (:mod:`gateway.logs`). A stopping server calls
:meth:`GatewayApp.abort_inflight` when its grace period is over: requests still in their handler get
a busy answer, responses still streaming are cut off (the connection is closed mid-message).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from cryptography import x509
from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

import gateway
from gateway import logs
from gateway.config import Config
from gateway.errors import (
    WSA_ACTION_NOT_SUPPORTED,
    XIG_INTERNAL,
    XIG_NOT_IMPLEMENTED,
    XIG_TOO_LARGE,
    SoapFault,
    receiver_fault,
    sender_fault,
)
from gateway.ihe import iti55
from gateway.security.saml import VerificationPolicy, VerifiedIdentity, load_trusted
from gateway.security.wssecurity import verify_security_header
from gateway.soap import mtom, ns, xml
from gateway.soap.envelope import Envelope, build_envelope, parse_envelope
from gateway.soap.fault import build_fault_envelope
from gateway.soap.schema import SchemaSet, default_schemas
from gateway.soap.wsdl import render_schema, render_wsdl
from gateway.web.endpoints import ENDPOINTS, XCPD, Endpoint
from gateway.web.exchange import Exchange, ExchangeObserver, HealthCheck, notify
from gateway.web.limits import ConcurrencyLimiter, Rejection, Ticket, busy_answer, is_retrieval, partner_label
from gateway.web.metrics import Metrics

log = logging.getLogger("xig.web")

SOAP_CONTENT_TYPE = "application/soap+xml; charset=UTF-8"

#: ASGI ``state`` keys our TLS protocol (:mod:`gateway.web.server`) sets on every request
PEER_CERTIFICATE = "tls_peer_certificate"
#: ``() -> None``: cut the connection off now
ABORT_CONNECTION = "xig_abort_connection"
#: ``() -> (() -> bool)``: called when a request starts, gives a probe telling whether its client went away
DISCONNECT_PROBE = "xig_disconnect_probe"

#: a request refused while busy is read up to this size to answer it properly (RelatesTo, XCPD echo)
BUSY_READ_LIMIT = 1024 * 1024
#: at most this many busy answers are prepared at once; beyond, the refusal is a bare fault
BUSY_ANSWER_SLOTS = 32
#: seconds the stream clean-up of one response may take (closing PACS streams, removing spool files)
CLOSE_TIMEOUT = 10.0


@dataclass
class RequestContext:
    """Everything a transaction handler may use about one authenticated request."""

    endpoint: Endpoint
    envelope: Envelope
    identity: VerifiedIdentity
    attachments: Mapping[str, bytes]
    mtom: bool
    client_certificate: x509.Certificate | None
    config: Config
    #: the exchange being processed (peer address, partner label, timing)
    exchange: Exchange | None = None

    @property
    def body(self) -> etree._Element:
        return self.envelope.body


@dataclass
class SoapResponse:
    """A handler's answer: the body element and, for MTOM, the attachment parts (may stream).

    With ``body_after`` the body is only known once every attachment was streamed: the MTOM root part
    is then sent *last* (XOP 1.0 §3 / RFC 2387: the root is the part named by ``start``).
    """

    body: etree._Element | None
    attachments: Sequence[mtom.Part] | AsyncIterable[mtom.Part] = field(default_factory=list)
    body_after: Callable[[], etree._Element] | None = None


Handler = Callable[[RequestContext], Awaitable[SoapResponse]]


def verification_policy(config: Config) -> VerificationPolicy:
    return VerificationPolicy(
        trusted=load_trusted(config.saml.trusted_issuers),
        allow_sha1=config.saml.allow_sha1,
        clock_skew=dt.timedelta(seconds=config.saml.clock_skew_seconds),
        permitted_purposes=frozenset(p.strip().upper() for p in config.saml.permitted_purposes),
    )


Normalizer = Callable[[etree._Element], etree._Element]

#: Body fix-ups applied before schema validation, per transaction: real peers send ITI-55 bodies whose
#: HL7 elements carry no namespace (the Epic-bound Metriport request); the copy is what handlers see.
DEFAULT_NORMALIZERS: dict[str, Normalizer] = {XCPD.transaction: iti55.normalise_hl7}


@dataclass
class _Progress:
    """What the worker thread learned before a step failed (the exchange wants the envelope either way)."""

    envelope: Envelope | None = None
    identity: VerifiedIdentity | None = None


class _Inbound:
    """The synchronous, CPU-bound part of request processing (runs in a worker thread)."""

    def __init__(self, policy: VerificationPolicy, schemas: SchemaSet,
                 normalizers: Mapping[str, Normalizer]) -> None:
        self.policy = policy
        self.schemas = schemas
        self.normalizers = normalizers

    def __call__(self, endpoint: Endpoint, content_type: str, body: bytes, progress: _Progress | None = None,
                 ) -> tuple[Envelope, VerifiedIdentity, dict[str, bytes], bool]:
        progress = progress if progress is not None else _Progress()
        root_bytes, attachments = mtom.decode_soap_body(content_type, body)
        is_mtom = mtom.parse_content_type(content_type).media_type == "multipart/related"
        envelope = parse_envelope(xml.parse(root_bytes))
        progress.envelope = envelope
        if envelope.addressing.action != endpoint.request_action:
            raise sender_fault(
                WSA_ACTION_NOT_SUPPORTED,
                f"wsa:Action {envelope.addressing.action!r} is not supported at {endpoint.path}; "
                f"this {endpoint.transaction} endpoint accepts {endpoint.request_action!r}")
        identity = verify_security_header(envelope.security, self.policy)
        progress.identity = identity
        normalize = self.normalizers.get(endpoint.transaction)
        if normalize is not None:
            envelope.body = normalize(envelope.body)
        self.schemas.validate(envelope.body)
        return envelope, identity, attachments, is_mtom


def _envelope_only(content_type: str, body: bytes) -> Envelope:
    """Parse just the envelope (for a busy answer: no security, no validation)."""
    root_bytes, _ = mtom.decode_soap_body(content_type, body)
    return parse_envelope(xml.parse(root_bytes))


def _peer_certificate(scope: Scope) -> x509.Certificate | None:
    der = scope.get("state", {}).get(PEER_CERTIFICATE)
    return x509.load_der_x509_certificate(der) if der else None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise sender_fault(XIG_TOO_LARGE, f"request of {declared} bytes exceeds the limit of {limit} bytes",
                           status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise sender_fault(XIG_TOO_LARGE, f"request exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _soap_response(envelope: etree._Element, action: str, status: int = 200,
                   headers: Mapping[str, str] | None = None) -> Response:
    return Response(xml.tostring(envelope, declaration=True), status_code=status, media_type=None,
                    headers={**(headers or {}), "content-type": f'{SOAP_CONTENT_TYPE}; action="{action}"'})


class _MtomResponse(StreamingResponse):
    """A streamed MTOM package that knows the iterators to close when sending ends early."""

    closers: list[AsyncIterator[Any]]

    async def aclose_streams(self) -> None:
        for it in self.closers:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()


def _mtom_response(envelope: etree._Element | Callable[[], etree._Element], action: str,
                   attachments: Sequence[mtom.Part] | AsyncIterable[mtom.Part], status: int = 200,
                   headers: Mapping[str, str] | None = None) -> _MtomResponse:
    """MTOM package: root first, or — when ``envelope`` is a callable — root last."""
    boundary = mtom.new_boundary()
    root_cid = mtom.new_content_id("root")
    root_type = f'{mtom.ROOT_PART_CONTENT_TYPE}; action="{action}"'
    source = attachments.__aiter__() if isinstance(attachments, AsyncIterable) else None

    async def parts() -> AsyncIterator[mtom.Part]:
        try:
            if not callable(envelope):
                yield mtom.Part(root_cid, root_type, xml.tostring(envelope, declaration=True))
            if source is not None:
                async for p in source:
                    yield p
            else:
                assert not isinstance(attachments, AsyncIterable)
                for p in attachments:
                    yield p
            if callable(envelope):
                yield mtom.Part(root_cid, root_type, xml.tostring(envelope(), declaration=True))
        finally:
            if source is not None and hasattr(source, "aclose"):
                await source.aclose()

    part_iter = parts()
    body = mtom.encode_mtom(part_iter, boundary)
    response = _MtomResponse(body, status_code=status, headers={
        **(headers or {}), "content-type": mtom.mtom_content_type(boundary, root_cid, action=action)})
    response.closers = [body, part_iter, *([source] if source is not None else [])]
    return response


def fault_response(fault: SoapFault, *, relates_to: str | None = None, as_mtom: bool = False) -> Response:
    env = build_fault_envelope(fault, relates_to=relates_to)
    if as_mtom:
        return _mtom_response(env, ns.WSA_FAULT_ACTION, [], status=fault.status, headers=fault.headers)
    return _soap_response(env, ns.WSA_FAULT_ACTION, status=fault.status, headers=fault.headers)


class _ClientGone(Exception):
    """The client of a response went away while it was being sent."""


def _client_gone(exc: BaseException) -> bool:
    if isinstance(exc, _ClientGone):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(e) for e in exc.exceptions)
    return False


class _Flight:
    """One in-flight exchange and the cancel scope of its current phase (handler, then sending)."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.scope: anyio.CancelScope | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if self.scope is not None:
            self.scope.cancel()

    @contextlib.contextmanager
    def phase(self, *, skip_if_aborted: bool = True) -> Iterator[anyio.CancelScope]:
        """A cancel scope :meth:`abort` cancels; already cancelled when the exchange was aborted between phases."""
        with anyio.CancelScope() as scope:
            self.scope = scope
            if self.aborted and skip_if_aborted:
                scope.cancel()
            try:
                yield scope
            finally:
                self.scope = None


class _Endpoint:
    """The ASGI app of one IHE endpoint: GET (``?wsdl``) and POST (SOAP)."""

    def __init__(self, app: GatewayApp, endpoint: Endpoint) -> None:
        self.app, self.endpoint = app, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if request.method == "POST":
            await self.app.exchange(scope, receive, send, self.endpoint)
            return
        if "wsdl" in (k.lower() for k in request.query_params):
            response = await self.app.wsdl(request, self.endpoint)
        else:
            response = Response(f"{self.endpoint.transaction} endpoint: POST SOAP 1.2, or GET ?wsdl\n",
                                status_code=405, media_type="text/plain", headers={"allow": "GET, POST"})
        await response(scope, receive, send)


class GatewayApp:
    """Builds the Starlette application for one configuration and a set of transaction handlers.

    ``observers`` get every finished :class:`Exchange`; ``health_checks`` are what ``/health`` runs
    (default: the certificate checks of :func:`gateway.web.health.certificate_checks`); ``metrics``
    is the registry served at ``/metrics`` (default: a new one when ``[observability] metrics``).
    """

    def __init__(self, config: Config, handlers: Mapping[str, Handler] | None = None, *,
                 policy: VerificationPolicy | None = None, schemas: SchemaSet | None = None,
                 normalizers: Mapping[str, Normalizer] | None = None,
                 observers: Sequence[ExchangeObserver] = (),
                 health_checks: Sequence[HealthCheck] | None = None,
                 metrics: Metrics | None = None,
                 limiter: ConcurrencyLimiter | None = None) -> None:
        from gateway.web.health import certificate_checks

        self.config = config
        self.handlers = dict(handlers or {})
        self.inbound = _Inbound(policy or verification_policy(config), schemas or default_schemas(),
                                DEFAULT_NORMALIZERS if normalizers is None else normalizers)
        if metrics is None and config.observability.metrics:
            metrics = Metrics()
        self.metrics = metrics
        self.observers: list[ExchangeObserver] = [*([metrics] if metrics is not None else []), *observers]
        self.health_checks = list(certificate_checks(config) if health_checks is None else health_checks)
        self.limiter = limiter or ConcurrencyLimiter(config.limits)
        #: set by the server when a graceful stop begins: new requests get a busy answer
        self.stopping = False
        self._flights: set[_Flight] = set()
        self._busy_answers = 0

    def routes(self) -> list[Route]:
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/ihe/schemas/{path:path}", self.schema, methods=["GET"])]
        if self.metrics is not None:
            routes.append(Route("/metrics", self.metrics_page, methods=["GET"]))
        for endpoint in ENDPOINTS:
            routes.append(Route(endpoint.path, _Endpoint(self, endpoint), methods=["GET", "POST"]))
        return routes

    def build(self) -> Starlette:
        return Starlette(routes=self.routes())

    # -- GET ------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        from gateway.web.health import run_checks

        status, checks = await run_checks(self.health_checks)
        return JSONResponse({"status": status, "version": gateway.__version__,
                             "home_community_id": self.config.gateway.home_community_id,
                             "endpoints": {e.transaction: e.path for e in ENDPOINTS},
                             "checks": checks}, status_code=503 if status == "fail" else 200)

    async def metrics_page(self, request: Request) -> Response:
        assert self.metrics is not None
        body, content_type = self.metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=None, headers={"content-type": content_type})

    def _base_url(self, request: Request) -> str:
        if self.config.server.public_url:
            return self.config.server.public_url.rstrip("/")
        host = request.headers.get("host") or f"{self.config.server.host}:{self.config.server.port}"
        return f"https://{host}"

    async def schema(self, request: Request) -> Response:
        try:
            data = render_schema(request.path_params["path"])
        except (FileNotFoundError, ValueError):
            return Response("no such schema\n", status_code=404, media_type="text/plain")
        return Response(data, media_type="application/xml")

    async def wsdl(self, request: Request, endpoint: Endpoint) -> Response:
        base = self._base_url(request)
        data = render_wsdl(endpoint.service, base + endpoint.path, base + "/ihe/schemas")
        return Response(data, media_type="text/xml; charset=UTF-8")

    # -- in-flight exchanges (graceful shutdown) ------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def abort_inflight(self) -> int:
        """Abort every exchange still running (see the module docstring); returns how many."""
        flights = list(self._flights)
        for flight in flights:
            flight.abort()
        return len(flights)

    # -- POST -----------------------------------------------------------------------------------
    def _new_exchange(self, scope: Scope, endpoint: Endpoint) -> Exchange:
        client = scope.get("client") or (None, None)
        cert = _peer_certificate(scope)
        return Exchange(endpoint=endpoint, started=time.monotonic(), started_at=dt.datetime.now(dt.UTC),
                        peer_host=client[0], peer_port=client[1], client_certificate=cert,
                        partner=partner_label(cert, client[0]))

    async def exchange(self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
        """One SOAP POST, from admission to the last byte; observers are notified exactly once."""
        request = Request(scope, receive)
        ex = self._new_exchange(scope, endpoint)
        flight = _Flight(ex)
        self._flights.add(flight)
        ticket: Ticket | None = None
        tokens: list[tuple[Any, Token[Any]]] = [
            (logs.correlation_id, logs.correlation_id.set(None)),
            (logs.transaction_var, logs.transaction_var.set(endpoint.transaction)),
            (logs.partner_var, logs.partner_var.set(ex.partner))]
        try:
            admission: Ticket | Rejection
            if self.stopping:
                admission = Rejection("shutdown", 0, self.config.limits.retry_after_seconds)
            else:
                admission = self.limiter.admit(ex.partner, retrieval=is_retrieval(endpoint))
            if isinstance(admission, Rejection):
                ex.rejected = admission.scope
                response = await self._refuse(request, endpoint, ex, admission)
            else:
                ticket = admission
                if self.metrics is not None:
                    self.metrics.request_started(endpoint.transaction)
                with flight.phase() as phase:
                    response = await self._process(request, endpoint, ex)
                if phase.cancelled_caught:
                    response = self._shutdown_answer(endpoint, ex)
            # a busy / shutdown answer is small and is sent even to an aborted exchange
            await self._send(response, scope, receive, send, ex, flight, abortable=ex.rejected is None)
        finally:
            if ticket is not None:
                ticket.release()
                if self.metrics is not None:
                    self.metrics.request_finished(endpoint.transaction)
            ex.finished = time.monotonic()
            self._flights.discard(flight)
            for var, token in reversed(tokens):
                var.reset(token)
            notify(self.observers, ex, "exchange")

    def _bind_message_id(self, ex: Exchange, envelope: Envelope | None) -> None:
        if envelope is not None and ex.message_id is None:
            ex.envelope = envelope
            ex.message_id = envelope.addressing.message_id
            logs.correlation_id.set(ex.message_id)

    async def _process(self, request: Request, endpoint: Endpoint, ex: Exchange) -> Response:
        content_type = request.headers.get("content-type", "")
        as_mtom = False
        progress = _Progress()
        try:
            body = await _read_body(request, self.config.server.max_request_bytes)
            ex.bytes_in = len(body)
            try:
                envelope, identity, attachments, as_mtom = await anyio.to_thread.run_sync(
                    self.inbound, endpoint, content_type, body, progress)
            finally:
                self._bind_message_id(ex, progress.envelope)
                ex.identity = progress.identity
            log.debug("%s request %s from %s", endpoint.transaction, ex.message_id, ex.partner)
            handler = self.handlers.get(endpoint.transaction)
            if handler is None:
                raise receiver_fault(XIG_NOT_IMPLEMENTED,
                                     f"{endpoint.transaction} is not enabled on this gateway")
            ctx = RequestContext(endpoint, envelope, identity, attachments, as_mtom, ex.client_certificate,
                                 self.config, ex)
            result = await handler(ctx)
            mid = ex.message_id

            def wrap(body: etree._Element) -> etree._Element:
                ex.response_body = body
                return build_envelope(body, action=endpoint.response_action, relates_to=mid, to=ns.WSA_ANONYMOUS)

            if result.body_after is not None:
                late = result.body_after
                return _mtom_response(lambda: wrap(late()), endpoint.response_action, result.attachments)
            assert result.body is not None, "a SoapResponse needs body or body_after"
            if endpoint.mtom or as_mtom:
                return _mtom_response(wrap(result.body), endpoint.response_action, result.attachments)
            return _soap_response(wrap(result.body), endpoint.response_action)
        except SoapFault as fault:
            log.info("fault %s at %s: %s", fault.subcode or fault.code, endpoint.path, fault.reason)
            ex.fault = fault
            return fault_response(fault, relates_to=ex.message_id, as_mtom=as_mtom)
        except Exception:  # noqa: BLE001 - the one place that turns surprises into a Receiver fault
            ref = str(uuid.uuid4())
            log.exception("internal error at %s (reference %s)", endpoint.path, ref)
            internal = receiver_fault(XIG_INTERNAL, f"internal error while processing the request (reference {ref})")
            ex.fault = internal
            return fault_response(internal, relates_to=ex.message_id, as_mtom=as_mtom)

    def _answer_busy(self, endpoint: Endpoint, ex: Exchange, body: etree._Element | None, reason: str,
                     retry_after: int, as_mtom: bool) -> Response:
        answer = busy_answer(endpoint, self.config, body, reason, retry_after)
        headers = {"retry-after": str(retry_after)}
        if isinstance(answer, SoapFault):
            ex.fault = answer
            return fault_response(answer, relates_to=ex.message_id, as_mtom=as_mtom)
        ex.response_body = answer
        env = build_envelope(answer, action=endpoint.response_action, relates_to=ex.message_id,
                             to=ns.WSA_ANONYMOUS)
        if endpoint.mtom or as_mtom:
            return _mtom_response(env, endpoint.response_action, [], headers=headers)
        return _soap_response(env, endpoint.response_action, headers=headers)

    async def _refuse(self, request: Request, endpoint: Endpoint, ex: Exchange, rejection: Rejection) -> Response:
        """The busy answer for a request over a limit (see :mod:`gateway.web.limits`)."""
        log.warning("%s from %s refused: %s", endpoint.transaction, ex.partner, rejection.reason)
        content_type = request.headers.get("content-type", "")
        as_mtom = mtom.parse_content_type(content_type).media_type == "multipart/related" if content_type else False
        if self._busy_answers >= BUSY_ANSWER_SLOTS:  # a flood: do not even read the body
            return self._answer_busy(endpoint, ex, None, rejection.reason, rejection.retry_after, as_mtom)
        self._busy_answers += 1
        try:
            envelope: Envelope | None = None
            try:
                body = await _read_body(request, min(BUSY_READ_LIMIT, self.config.server.max_request_bytes))
                ex.bytes_in = len(body)
                envelope = await anyio.to_thread.run_sync(_envelope_only, content_type, body)
            except (SoapFault, ValueError) as exc:
                log.debug("busy answer without the request's envelope: %s", exc)
            self._bind_message_id(ex, envelope)
            payload = envelope.body if envelope is not None else None
            return self._answer_busy(endpoint, ex, payload, rejection.reason, rejection.retry_after, as_mtom)
        finally:
            self._busy_answers -= 1

    def _shutdown_answer(self, endpoint: Endpoint, ex: Exchange) -> Response:
        """The answer to a request whose handler a stopping server aborted."""
        retry = self.config.limits.retry_after_seconds
        ex.rejected = "shutdown"
        ex.response_body = None
        reason = Rejection("shutdown", 0, retry).reason
        log.warning("%s %s aborted by the shutdown: answering busy", endpoint.transaction, ex.message_id)
        body = ex.envelope.body if ex.envelope is not None else None
        response = self._answer_busy(endpoint, ex, body, reason, retry, bool(ex.envelope and endpoint.mtom))
        response.headers["connection"] = "close"
        return response

    async def _send(self, response: Response, scope: Scope, receive: Receive, send: Send, ex: Exchange,
                    flight: _Flight, *, abortable: bool = True) -> None:
        """Send ``response``, counting bytes; on an early end, cut the connection and close the streams."""

        probe_factory = scope.get("state", {}).get(DISCONNECT_PROBE)
        gone: Callable[[], bool] = probe_factory() if probe_factory is not None else (lambda: False)

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.http_status = message["status"]
            elif message["type"] == "http.response.body":
                # the server drops silently what a vanished client cannot get: stop producing (and reading
                # the PACS) at once, even when the producer never yields to the event loop
                if gone():
                    raise _ClientGone
                ex.bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    await send(message)
                    ex.completed = True
                    return
            await send(message)

        with flight.phase(skip_if_aborted=abortable) as phase:
            try:
                await response(scope, receive, observed)
            except Exception as exc:  # noqa: BLE001 - a broken stream ends this exchange, not the server
                if not _client_gone(exc):
                    log.exception("%s response to %s broke off after %d bytes", ex.transaction, ex.message_id,
                                  ex.bytes_out)
        if not ex.completed:
            why = "aborted by the shutdown" if phase.cancelled_caught else "not completed (client gone or stream broke)"
            log.warning("%s response to %s %s after %d bytes", ex.transaction, ex.message_id, why, ex.bytes_out)
            abort = scope.get("state", {}).get(ABORT_CONNECTION)
            if abort is not None:
                abort()
        if isinstance(response, _MtomResponse):
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await response.aclose_streams()
                except Exception:  # noqa: BLE001 - clean-up failures are logged, never raised
                    log.exception("closing the response streams of %s failed", ex.message_id)


def create_app(config: Config, handlers: Mapping[str, Handler] | None = None, **kwargs: Any) -> Starlette:
    return GatewayApp(config, handlers, **kwargs).build()


__all__ = ["ABORT_CONNECTION", "DEFAULT_NORMALIZERS", "DISCONNECT_PROBE", "PEER_CERTIFICATE", "GatewayApp", "Handler",
           "Normalizer", "RequestContext", "SoapResponse", "create_app", "fault_response", "verification_policy"]
