"""SOAP 1.2 envelopes with WS-Addressing 1.0: parse what partners send, build what we send.

Rules implemented here (ITI TF-2 Appendix V §V.3, W3C SOAP 1.2 Part 1 §5.2.3, WS-Addressing 1.0
SOAP Binding §3):

* SOAP 1.2 only; a SOAP 1.1 envelope gets a ``VersionMismatch`` fault.
* ``mustUnderstand`` ("1" or "true", trimmed) on a header block we do not process → ``MustUnderstand``.
* ``wsa:Action`` and ``wsa:MessageID`` are required; header values are trimmed because real peers
  pretty-print them; MessageIDs without ``urn:uuid:`` are accepted and echoed verbatim.
* Only the anonymous ``wsa:ReplyTo`` is supported (synchronous exchange).
* We emit the strict form: Action and To with ``mustUnderstand="true"``, ``urn:uuid:`` MessageIDs,
  no ``mustUnderstand`` on ReplyTo (IHE notes toolkits that choke on it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from lxml import etree

from gateway.errors import (
    WSA_INVALID_HEADER,
    WSA_MISSING_HEADER,
    XIG_MALFORMED,
    QName,
    SoapFault,
    sender_fault,
)
from gateway.soap import ns

#: Header namespaces whose blocks XIG processes (and so may carry mustUnderstand).
UNDERSTOOD_HEADER_NAMESPACES = frozenset({ns.WSA, ns.WSSE, ns.WSSE11, ns.WSU, ns.XCPD})
WSA_NONE = "http://www.w3.org/2005/08/addressing/none"
WSA_ONLY_ANONYMOUS = QName(ns.WSA, "OnlyAnonymousAddressSupported", "wsa")

_NSMAP = {"soap": ns.SOAP12, "wsa": ns.WSA}


@dataclass(frozen=True)
class Addressing:
    action: str
    message_id: str
    to: str | None = None
    reply_to: str | None = None
    relates_to: str | None = None


@dataclass
class Envelope:
    """A parsed SOAP 1.2 envelope: the body's payload element and the headers XIG acts on."""

    element: etree._Element
    body: etree._Element
    addressing: Addressing
    security: etree._Element | None = None
    headers: list[etree._Element] = field(default_factory=list)

    def header(self, clark: str) -> etree._Element | None:
        for h in self.headers:
            if h.tag == clark:
                return h
        return None


def new_message_id() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _text(el: etree._Element | None) -> str | None:
    if el is None:
        return None
    value = "".join(el.itertext()).strip()
    return value or None


def is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true")


def check_must_understand(headers: Iterable[etree._Element], understood: frozenset[str]) -> None:
    """SOAP 1.2 Part 1 §5.2.3: fault on any mandatory header block we do not understand."""
    for h in headers:
        if not isinstance(h.tag, str):
            continue
        if is_true(h.get(ns.q(ns.SOAP12, "mustUnderstand"))):
            qn = etree.QName(h)
            if qn.namespace not in understood:
                fault = SoapFault("MustUnderstand",
                                  f"header block {{{qn.namespace}}}{qn.localname} is marked mustUnderstand "
                                  "but is not processed by this gateway")
                fault.headers["not-understood"] = h.tag
                raise fault


def parse_envelope(root: etree._Element,
                   understood: frozenset[str] = UNDERSTOOD_HEADER_NAMESPACES) -> Envelope:
    """Check and decompose a SOAP 1.2 envelope element (already parsed by :func:`gateway.soap.xml.parse`)."""
    if root.tag == ns.q(ns.SOAP11, "Envelope"):
        raise SoapFault("VersionMismatch", "SOAP 1.1 envelopes are not supported; IHE requires SOAP 1.2 "
                        f"({ns.SOAP12})")
    if root.tag != ns.q(ns.SOAP12, "Envelope"):
        raise sender_fault(XIG_MALFORMED, f"root element {root.tag} is not a SOAP 1.2 Envelope")
    children = [c for c in root if isinstance(c.tag, str)]
    header_el = next((c for c in children if c.tag == ns.q(ns.SOAP12, "Header")), None)
    body_el = next((c for c in children if c.tag == ns.q(ns.SOAP12, "Body")), None)
    if body_el is None:
        raise sender_fault(XIG_MALFORMED, "SOAP envelope has no Body")
    payload = [c for c in body_el if isinstance(c.tag, str)]
    if len(payload) != 1:
        raise sender_fault(XIG_MALFORMED, f"SOAP Body must hold exactly one element, found {len(payload)}")
    headers = [] if header_el is None else [h for h in header_el if isinstance(h.tag, str)]
    check_must_understand(headers, understood)

    def wsa(local: str) -> list[etree._Element]:
        return [h for h in headers if h.tag == ns.q(ns.WSA, local)]

    for local in ("Action", "MessageID", "To", "ReplyTo", "RelatesTo"):
        if len(wsa(local)) > 1:
            raise sender_fault(WSA_INVALID_HEADER, f"more than one wsa:{local} header")
    action = _text(next(iter(wsa("Action")), None))
    if not action:
        raise sender_fault(WSA_MISSING_HEADER, "wsa:Action header is required (WS-Addressing 1.0, ITI TF-2 V.3.2)")
    message_id = _text(next(iter(wsa("MessageID")), None))
    if not message_id:
        raise sender_fault(WSA_MISSING_HEADER, "wsa:MessageID header is required for a request-response exchange")
    reply_to_el = next(iter(wsa("ReplyTo")), None)
    reply_to = None
    if reply_to_el is not None:
        reply_to = _text(reply_to_el.find(ns.q(ns.WSA, "Address")))
        if reply_to and reply_to not in (ns.WSA_ANONYMOUS,):
            raise sender_fault(WSA_ONLY_ANONYMOUS,
                               f"wsa:ReplyTo {reply_to} is not supported; use {ns.WSA_ANONYMOUS} (synchronous)")
    security = next((h for h in headers if h.tag == ns.q(ns.WSSE, "Security")), None)
    return Envelope(
        element=root,
        body=payload[0],
        addressing=Addressing(action=action, message_id=message_id, to=_text(next(iter(wsa("To")), None)),
                              reply_to=reply_to, relates_to=_text(next(iter(wsa("RelatesTo")), None))),
        security=security,
        headers=headers,
    )


def _wsa(parent: etree._Element, local: str, text: str, must_understand: bool = False) -> etree._Element:
    el = etree.SubElement(parent, ns.q(ns.WSA, local))
    el.text = text
    if must_understand:
        el.set(ns.q(ns.SOAP12, "mustUnderstand"), "true")
    return el


def build_envelope(
    body: etree._Element,
    *,
    action: str,
    message_id: str | None = None,
    to: str | None = None,
    relates_to: str | None = None,
    reply_to_anonymous: bool = False,
    extra_headers: Iterable[etree._Element] = (),
) -> etree._Element:
    """Build a SOAP 1.2 envelope around ``body`` with WS-Addressing headers.

    Requests pass ``to`` (the endpoint URL) and ``reply_to_anonymous=True``; responses pass
    ``relates_to`` (the request's MessageID). ``extra_headers`` (e.g. ``wsse:Security``) follow.
    """
    env = etree.Element(ns.q(ns.SOAP12, "Envelope"), nsmap=_NSMAP)
    header = etree.SubElement(env, ns.q(ns.SOAP12, "Header"))
    _wsa(header, "Action", action, must_understand=True)
    _wsa(header, "MessageID", message_id or new_message_id())
    if reply_to_anonymous:
        reply = etree.SubElement(header, ns.q(ns.WSA, "ReplyTo"))
        _wsa(reply, "Address", ns.WSA_ANONYMOUS)
    if relates_to is not None:
        _wsa(header, "RelatesTo", relates_to)
    if to is not None:
        _wsa(header, "To", to, must_understand=True)
    for h in extra_headers:
        header.append(h)
    etree.SubElement(env, ns.q(ns.SOAP12, "Body")).append(body)
    return env
