"""The ASGI application: one route per IHE endpoint plus ``?wsdl``, schemas and health.

The path of one SOAP request (each step either passes or ends in one SOAP fault):

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
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from cryptography import x509
from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import gateway
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

log = logging.getLogger("xig.web")

SOAP_CONTENT_TYPE = "application/soap+xml; charset=UTF-8"


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


class _Inbound:
    """The synchronous, CPU-bound part of request processing (runs in a worker thread)."""

    def __init__(self, policy: VerificationPolicy, schemas: SchemaSet,
                 normalizers: Mapping[str, Normalizer]) -> None:
        self.policy = policy
        self.schemas = schemas
        self.normalizers = normalizers

    def __call__(self, endpoint: Endpoint, content_type: str, body: bytes,
                 ) -> tuple[Envelope, VerifiedIdentity, dict[str, bytes], bool]:
        root_bytes, attachments = mtom.decode_soap_body(content_type, body)
        is_mtom = mtom.parse_content_type(content_type).media_type == "multipart/related"
        envelope = parse_envelope(xml.parse(root_bytes))
        if envelope.addressing.action != endpoint.request_action:
            raise sender_fault(
                WSA_ACTION_NOT_SUPPORTED,
                f"wsa:Action {envelope.addressing.action!r} is not supported at {endpoint.path}; "
                f"this {endpoint.transaction} endpoint accepts {endpoint.request_action!r}")
        identity = verify_security_header(envelope.security, self.policy)
        normalize = self.normalizers.get(endpoint.transaction)
        if normalize is not None:
            envelope.body = normalize(envelope.body)
        self.schemas.validate(envelope.body)
        return envelope, identity, attachments, is_mtom


def _peer_certificate(request: Request) -> x509.Certificate | None:
    der = request.scope.get("state", {}).get("tls_peer_certificate")
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


def _soap_response(envelope: etree._Element, action: str, status: int = 200) -> Response:
    return Response(xml.tostring(envelope, declaration=True), status_code=status,
                    media_type=None, headers={"content-type": f'{SOAP_CONTENT_TYPE}; action="{action}"'})


def _mtom_response(envelope: etree._Element | Callable[[], etree._Element], action: str,
                   attachments: Sequence[mtom.Part] | AsyncIterable[mtom.Part], status: int = 200) -> Response:
    """MTOM package: root first, or — when ``envelope`` is a callable — root last."""
    boundary = mtom.new_boundary()
    root_cid = mtom.new_content_id("root")
    root_type = f'{mtom.ROOT_PART_CONTENT_TYPE}; action="{action}"'

    async def parts() -> AsyncIterator[mtom.Part]:
        if not callable(envelope):
            yield mtom.Part(root_cid, root_type, xml.tostring(envelope, declaration=True))
        if isinstance(attachments, AsyncIterable):
            async for p in attachments:
                yield p
        else:
            for p in attachments:
                yield p
        if callable(envelope):
            yield mtom.Part(root_cid, root_type, xml.tostring(envelope(), declaration=True))

    return StreamingResponse(mtom.encode_mtom(parts(), boundary), status_code=status,
                             headers={"content-type": mtom.mtom_content_type(boundary, root_cid, action=action)})


def fault_response(fault: SoapFault, *, relates_to: str | None = None, as_mtom: bool = False) -> Response:
    env = build_fault_envelope(fault, relates_to=relates_to)
    if as_mtom:
        return _mtom_response(env, ns.WSA_FAULT_ACTION, [], status=fault.status)
    return _soap_response(env, ns.WSA_FAULT_ACTION, status=fault.status)


class GatewayApp:
    """Builds the Starlette application for one configuration and a set of transaction handlers."""

    def __init__(self, config: Config, handlers: Mapping[str, Handler] | None = None, *,
                 policy: VerificationPolicy | None = None, schemas: SchemaSet | None = None,
                 normalizers: Mapping[str, Normalizer] | None = None) -> None:
        self.config = config
        self.handlers = dict(handlers or {})
        self.inbound = _Inbound(policy or verification_policy(config), schemas or default_schemas(),
                                DEFAULT_NORMALIZERS if normalizers is None else normalizers)

    def routes(self) -> list[Route]:
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/ihe/schemas/{path:path}", self.schema, methods=["GET"])]
        for endpoint in ENDPOINTS:
            routes.append(Route(endpoint.path, self._route(endpoint), methods=["GET", "POST"]))
        return routes

    def build(self) -> Starlette:
        return Starlette(routes=self.routes())

    # -- GET ------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": gateway.__version__,
                             "home_community_id": self.config.gateway.home_community_id,
                             "endpoints": {e.transaction: e.path for e in ENDPOINTS}})

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

    # -- POST -----------------------------------------------------------------------------------
    def _route(self, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            if request.method == "GET":
                if "wsdl" in (k.lower() for k in request.query_params):
                    return await self.wsdl(request, endpoint)
                return Response(f"{endpoint.transaction} endpoint: POST SOAP 1.2, or GET ?wsdl\n",
                                status_code=405, media_type="text/plain", headers={"allow": "GET, POST"})
            return await self.handle_soap(request, endpoint)
        return route

    async def handle_soap(self, request: Request, endpoint: Endpoint) -> Response:
        content_type = request.headers.get("content-type", "")
        relates_to: str | None = None
        as_mtom = False
        try:
            body = await _read_body(request, self.config.server.max_request_bytes)
            envelope, identity, attachments, as_mtom = await anyio.to_thread.run_sync(
                self.inbound, endpoint, content_type, body)
            relates_to = envelope.addressing.message_id
            handler = self.handlers.get(endpoint.transaction)
            if handler is None:
                raise receiver_fault(XIG_NOT_IMPLEMENTED,
                                     f"{endpoint.transaction} is not enabled on this gateway")
            ctx = RequestContext(endpoint, envelope, identity, attachments, as_mtom,
                                 _peer_certificate(request), self.config)
            result = await handler(ctx)
            mid = relates_to

            def wrap(body: etree._Element) -> etree._Element:
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
            return fault_response(fault, relates_to=relates_to, as_mtom=as_mtom)
        except Exception:  # noqa: BLE001 - the one place that turns surprises into a Receiver fault
            ref = str(uuid.uuid4())
            log.exception("internal error at %s (reference %s)", endpoint.path, ref)
            return fault_response(
                receiver_fault(XIG_INTERNAL, f"internal error while processing the request (reference {ref})"),
                relates_to=relates_to, as_mtom=as_mtom)


def create_app(config: Config, handlers: Mapping[str, Handler] | None = None, **kwargs: Any) -> Starlette:
    return GatewayApp(config, handlers, **kwargs).build()
