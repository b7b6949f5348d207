"""One conformance run's connection to the gateway under test, and the exchange primitive.

:meth:`Session.send` sends one SOAP request — normally a correct one with a freshly signed assertion,
or a deliberately wrong one (no or a broken ``wsse:Security`` header, an unknown ``wsa:Action``, no
``wsa:MessageID``) — through XIG's own :class:`~gateway.web.client.SoapClient` over mutual TLS, and
returns a :class:`Sent`: the parsed reply (or why there is none) and the raw :class:`Exchange` as it
went over the wire, recorded by :class:`~conformance.transport.RecordingTransport`.

The session also caches what several scenarios need (the matched patient, the KOS DocumentEntries,
the retrieved manifests); :mod:`conformance.prerequisites` fills it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
from lxml import etree

from conformance.model import Exchange
from conformance.target import SetupError, Target, TestPatient
from conformance.transport import Capture, RecordingTransport
from gateway.config import Config
from gateway.dicom.kos import KosManifest
from gateway.errors import SoapFault
from gateway.ihe.ebrim import CX, DocumentEntry
from gateway.ihe.iti39 import DocumentRequest
from gateway.initiating.client import classify_transport_error
from gateway.initiating.partners import URL_FIELDS, Partner
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom, ns, xml
from gateway.soap.envelope import build_envelope, new_message_id
from gateway.web.client import SoapClient, SoapReply, TransportError
from gateway.web.endpoints import BY_TRANSACTION

#: ``security=VALID``: a freshly signed assertion for our configured identity (the default)
VALID: Final = "valid"


@dataclass
class Sent:
    """One request and what came back: ``reply`` when a SOAP message arrived, else ``problem`` says why not."""

    transaction: str
    url: str
    message_id: str | None
    exchange: Exchange
    reply: SoapReply | None = None
    problem: str | None = None

    @property
    def answered(self) -> bool:
        """A non-fault SOAP reply arrived."""
        return self.reply is not None and self.reply.fault is None


@dataclass(frozen=True)
class Match:
    """The test patient as the partner knows it (from its XCPD answer)."""

    patient_id: CX
    home_community_id: str


@dataclass(frozen=True)
class Manifest:
    """A retrieved KOS and the DocumentEntry it was listed as."""

    entry: DocumentEntry
    request: DocumentRequest
    document_unique_id: str  #: NewDocumentUniqueId (On-Demand) or the entry's uniqueId
    data: bytes
    kos: KosManifest


@dataclass
class Session:
    """The run's state: target, TLS client, recorder and the cached prerequisites."""

    target: Target
    soap: SoapClient
    recorder: RecordingTransport
    workdir: Path
    match: Match | None = None
    entries: list[DocumentEntry] | None = None
    manifests: list[Manifest] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.target.config

    @property
    def partner(self) -> Partner:
        return self.target.partner

    @property
    def patient(self) -> TestPatient:
        return self.target.patient

    def url(self, transaction: str) -> str | None:
        return self.partner.url(transaction)

    def security(self, url: str, **kwargs: Any) -> etree._Element:
        """A valid ``wsse:Security`` header for ``url`` (``kwargs`` go to :func:`security_header`)."""
        return security_header(self.config, url, partner=self.target.section, **kwargs)

    async def aclose(self) -> None:
        await self.soap.aclose()

    async def send(self, transaction: str, body: etree._Element, *, security: etree._Element | str | None = VALID,
                   action: str | None = None, use_mtom: bool | None = None, with_message_id: bool = True,
                   sink_factory: Callable[[mtom.PartInfo], mtom.PartSink] | None = None,
                   whole_deadline: bool = True) -> Sent:
        """Send ``body`` to the partner's ``transaction`` endpoint (which must exist).

        ``security``: ``VALID`` (default), None (no header) or a header element to send as is. ``action``
        replaces the transaction's request Action. ``use_mtom`` defaults to the partner's ``mtom_requests``
        for ITI-39 / RAD-75 and plain SOAP otherwise. ``whole_deadline``: the partner's timeout bounds the
        whole exchange (else only connecting and each wait for data, for large RAD-75 answers).
        """
        endpoint = BY_TRANSACTION[transaction]
        url = self.url(transaction)
        if url is None:
            raise ValueError(f"the partner has no {transaction} endpoint ({URL_FIELDS[transaction]})")
        header: etree._Element | None
        if isinstance(security, str) and security != VALID:
            raise ValueError(f"security must be VALID, None or a wsse:Security element, not {security!r}")
        if security == VALID:
            header = await anyio.to_thread.run_sync(functools.partial(self.security, url))
        else:
            header = security if isinstance(security, etree._Element) else None
        mtom_request = (self.partner.mtom_requests if endpoint.mtom else False) if use_mtom is None else use_mtom
        message_id = new_message_id() if with_message_id else None
        data, content_type = encode(url, body, action or endpoint.request_action, header, mtom_request, message_id)
        timeout = self.partner.timeout
        before = len(self.recorder.captures)
        reply: SoapReply | None = None
        problem: str | None = None
        try:
            with anyio.fail_after(timeout if whole_deadline else None):
                reply = await self.soap.post(url, data, content_type, message_id or "", sink_factory=sink_factory,
                                             timeout=timeout)
        except TimeoutError:
            problem = f"no complete answer from {url} within {timeout:g} s (the partner's timeout_seconds)"
        except TransportError as exc:
            problem = classify_transport_error(exc, url, timeout)[1]
        except SoapFault as exc:  # raised locally: the reply could not be decoded (MTOM framing, XML, size)
            problem = f"the reply from {url} cannot be decoded: {exc.reason}"
        captures = self.recorder.captures[before:]
        exchange = _exchange(transaction, url, data, content_type, captures[-1] if captures else None, problem)
        return Sent(transaction, url, message_id, exchange, reply, problem)


def encode(url: str, body: etree._Element, action: str, security: etree._Element | None, use_mtom: bool,
           message_id: str | None) -> tuple[bytes, str]:
    """``(bytes, content type)`` of a request envelope; ``message_id=None`` leaves ``wsa:MessageID`` out."""
    env = build_envelope(body, action=action, message_id=message_id, to=url, reply_to_anonymous=True,
                         extra_headers=[security] if security is not None else [])
    if message_id is None:
        for el in env.findall(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}MessageID"):
            el.getparent().remove(el)
    data = xml.tostring(env, declaration=True)
    if not use_mtom:
        return data, f'application/soap+xml; charset=UTF-8; action="{action}"'
    boundary, cid = mtom.new_boundary(), mtom.new_content_id("root")
    package = mtom.encode_mtom_bytes([mtom.Part(cid, mtom.ROOT_PART_CONTENT_TYPE, data)], boundary)
    return package, mtom.mtom_content_type(boundary, cid, action=action)


def _exchange(transaction: str, url: str, data: bytes, content_type: str, cap: Capture | None,
              problem: str | None) -> Exchange:
    if cap is None:  # nothing reached the transport
        return Exchange(transaction, url, (("content-type", content_type),), data, None, (), b"",
                        error=problem or "the request was not sent")
    return Exchange(transaction, cap.url, cap.request_headers, cap.request_body, cap.status, cap.response_headers,
                    bytes(cap.response_body), truncated=cap.truncated, elapsed_ms=round(cap.elapsed_ms, 1),
                    error=problem or cap.error)


async def open_session(target: Target, workdir: Path) -> Session:
    """A session presenting our client certificate (``[client]`` or ``[server]``) to the partner."""
    cfg = target.config
    try:
        ctx = client_context(cfg.client_certificate, cfg.client_private_key, cfg.client_trust)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise SetupError(f"cannot load our TLS client identity ({cfg.client_certificate}, "
                         f"{cfg.client_private_key}, trusting {cfg.client_trust}): {exc}") from None
    holder: list[RecordingTransport] = []

    def wrap(inner: Any) -> RecordingTransport:
        holder.append(RecordingTransport(inner))
        return holder[0]

    soap = SoapClient(ctx, timeout=target.partner.timeout, wrap_transport=wrap)
    return Session(target, soap, holder[0], workdir)


__all__ = ["VALID", "Manifest", "Match", "Sent", "Session", "encode", "open_session"]
