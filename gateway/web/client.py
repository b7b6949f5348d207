"""SOAP 1.2 client over mutual TLS (httpx): what the initiating gateway and the conformance runner use.

A request is a body element, an Action and (normally) a WS-Security header; it is sent as plain
SOAP or as an MTOM package (ITI-39 / RAD-75 require MTOM requests). The response is consumed as
a stream: MTOM attachments go part by part to sinks (files, callbacks), so a RAD-75 study never
sits in memory.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from lxml import etree

from gateway.errors import XIG_MALFORMED, SoapFault, XigError, sender_fault
from gateway.security.tls import describe_tls_error
from gateway.soap import mtom, ns, xml
from gateway.soap.envelope import build_envelope, new_message_id
from gateway.soap.fault import parse_fault
from gateway.web.netbackend import loop_tls_transport


class TransportError(XigError):
    """The partner could not be reached or the exchange broke (with a reason an operator can act on)."""


@dataclass
class SoapReply:
    http_status: int
    content_type: str
    envelope: etree._Element
    body: etree._Element
    action: str | None
    relates_to: str | None
    message_id: str
    attachments: dict[str, Any] = field(default_factory=dict)
    fault: SoapFault | None = None

    @property
    def is_mtom(self) -> bool:
        return mtom.parse_content_type(self.content_type).media_type == "multipart/related"


def _header_text(env: etree._Element, local: str) -> str | None:
    el = env.find(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}{local}")
    return "".join(el.itertext()).strip() if el is not None else None


def parse_reply(status: int, content_type: str, root: bytes, attachments: dict[str, Any],
                message_id: str) -> SoapReply:
    env = xml.parse(root)
    if env.tag != ns.q(ns.SOAP12, "Envelope"):
        raise sender_fault(XIG_MALFORMED, f"reply is not a SOAP 1.2 envelope (root {env.tag})")
    body_el = env.find(f"{{{ns.SOAP12}}}Body")
    payload = [c for c in body_el if isinstance(c.tag, str)] if body_el is not None else []
    if len(payload) != 1:
        raise sender_fault(XIG_MALFORMED, "reply SOAP Body must hold exactly one element")
    return SoapReply(status, content_type, env, payload[0], _header_text(env, "Action"),
                     _header_text(env, "RelatesTo"), message_id, attachments, parse_fault(payload[0]))


class SoapClient:
    """One client per TLS identity; reuse it across requests (connection pooling)."""

    def __init__(self, ssl_context: ssl.SSLContext, *, timeout: float = 60.0,
                 max_root_bytes: int = 64 * 1024 * 1024,
                 wrap_transport: Callable[[httpx.AsyncHTTPTransport], httpx.AsyncBaseTransport] | None = None,
                 ) -> None:
        """``wrap_transport`` (optional) wraps the TLS transport, e.g. to record every raw exchange (the
        conformance runner does); it receives the real transport built from ``ssl_context``."""
        inner = loop_tls_transport(ssl_context)  # TLS by the event loop (gateway.web.netbackend)
        transport = wrap_transport(inner) if wrap_transport is not None else inner
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout)
        self.max_root_bytes = max_root_bytes

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SoapClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def encode_request(url: str, body: etree._Element, action: str, *,
                       security: etree._Element | None = None, use_mtom: bool = False,
                       message_id: str | None = None) -> tuple[bytes, str, str]:
        """Return ``(bytes, content-type, message-id)`` of a request envelope."""
        mid = message_id or new_message_id()
        env = build_envelope(body, action=action, message_id=mid, to=url, reply_to_anonymous=True,
                             extra_headers=[security] if security is not None else [])
        data = xml.tostring(env, declaration=True)
        if not use_mtom:
            return data, f'application/soap+xml; charset=UTF-8; action="{action}"', mid
        boundary, cid = mtom.new_boundary(), mtom.new_content_id("root")
        package = mtom.encode_mtom_bytes([mtom.Part(cid, mtom.ROOT_PART_CONTENT_TYPE, data)], boundary)
        return package, mtom.mtom_content_type(boundary, cid, action=action), mid

    async def call(self, url: str, body: etree._Element, action: str, *,
                   security: etree._Element | None = None, use_mtom: bool = False,
                   sink_factory: Callable[[mtom.PartInfo], mtom.PartSink] | None = None,
                   timeout: float | None = None) -> SoapReply:
        data, content_type, mid = self.encode_request(url, body, action, security=security, use_mtom=use_mtom)
        return await self.post(url, data, content_type, mid, sink_factory=sink_factory, timeout=timeout)

    async def post(self, url: str, data: bytes, content_type: str, message_id: str, *,
                   sink_factory: Callable[[mtom.PartInfo], mtom.PartSink] | None = None,
                   timeout: float | None = None) -> SoapReply:
        headers = {"content-type": content_type, "accept": "application/soap+xml, multipart/related"}
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            async with self._http.stream("POST", url, content=data, headers=headers, **extra) as resp:
                reply_type = resp.headers.get("content-type", "")
                media = mtom.parse_content_type(reply_type).media_type if reply_type else ""
                if media == "multipart/related":
                    msg = await mtom.decode_mtom_stream(reply_type, resp.aiter_bytes(), sink_factory,
                                                        max_root_bytes=self.max_root_bytes)
                    return parse_reply(resp.status_code, reply_type, msg.root, dict(msg.attachments), message_id)
                if media not in ("application/soap+xml", "text/xml", "application/xml"):
                    text = (await resp.aread())[:200].decode("utf-8", "replace")
                    raise TransportError(f"{url} answered HTTP {resp.status_code} with {reply_type or 'no'} "
                                         f"content type, not SOAP: {text!r}")
                root = bytearray()
                async for chunk in resp.aiter_bytes():
                    root += chunk
                    if len(root) > self.max_root_bytes:
                        raise TransportError(f"{url} sent a SOAP reply larger than {self.max_root_bytes} bytes")
                return parse_reply(resp.status_code, reply_type, bytes(root), {}, message_id)
        except httpx.ConnectError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLError):
                raise TransportError(f"{url}: {describe_tls_error(cause)}") from None
            raise TransportError(f"{url}: cannot connect ({str(exc) or type(exc).__name__})") from None
        except httpx.TimeoutException:
            raise TransportError(f"{url}: no answer within the timeout") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLError):
                raise TransportError(f"{url}: {describe_tls_error(cause)}") from None
            # TLS 1.3: a refused client certificate surfaces only as a connection closed after the handshake
            raise TransportError(f"{url}: the partner closed the connection ({str(exc) or type(exc).__name__}); with "
                                 "mutual TLS this usually means it did not accept our client certificate") from None
