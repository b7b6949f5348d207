"""The ``wsse:Security`` SOAP header that carries the XUA assertion: build and verify.

ITI TF-2 3.40.4.1.2: the X-Service User includes the WS-Security header with a SAML 2.0 assertion
as the security token; 3.40.4.1.3: the X-Service Provider processes it per WSS and answers failures
with the WSS 1.0 §12 fault codes. Layout per WSS SOAP Message Security 1.0 §5 (header, SOAP 1.2
``mustUnderstand``) and §10 (at most one ``wsu:Timestamp``, Created / Expires in UTC).

Real peers order the children differently (CONNECT: Timestamp, Assertion, Signature; Epic-bound
Metriport requests: Assertion, Signature, Timestamp) — any order is accepted. They also add a
message-level ``ds:Signature`` over the Timestamp whose KeyInfo is a SecurityTokenReference
(KeyIdentifier ValueType ``...#SAMLID``) to the assertion. That signature is tolerated but **not
verified**: the caller is authenticated by the signed assertion (and mutual TLS), and freshness is
bounded by the assertion's own NotOnOrAfter; verifying the Timestamp signature would add the proof
that the holder of the assertion's key sent this message (holder-of-key), which XIG does not claim.
Pure codec, no I/O.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from lxml import etree

from gateway.errors import (
    WSSE_INVALID_SECURITY,
    WSSE_MESSAGE_EXPIRED,
    WSSE_UNSUPPORTED_SECURITY_TOKEN,
    SecurityError,
)
from gateway.security.saml import (
    VerificationPolicy,
    VerifiedIdentity,
    format_instant,
    parse_instant,
    utc_now,
    verify_assertion,
)
from gateway.soap import ns

SAML1: str = "urn:oasis:names:tc:SAML:1.0:assertion"


def _wsse(local: str) -> str:
    return ns.q(ns.WSSE, local)


def _wsu(local: str) -> str:
    return ns.q(ns.WSU, local)


def build_security_header(assertion_el: etree._Element, *, now: datetime | None = None,
                          ttl: timedelta = timedelta(minutes=5)) -> etree._Element:
    """``wsse:Security`` (``mustUnderstand="true"``, SOAP 1.2) with a ``wsu:Timestamp`` and the assertion.

    The assertion element is moved into the header; its exclusive-c14n signature stays valid because the
    header binds only wsse, wsu and soap. The same must hold for the envelope this header is appended to:
    it must not bind the assertion's namespaces (saml2, ds, xsi, hl7) to other prefixes, or lxml rebinds
    the moved elements and the signature breaks (see :func:`~gateway.security.saml.sign_assertion`).
    """
    if ttl <= timedelta(0):
        raise ValueError("the Timestamp lifetime must be positive")
    created = utc_now(now)
    security = etree.Element(_wsse("Security"), nsmap={"wsse": ns.WSSE, "wsu": ns.WSU, "soap": ns.SOAP12})
    security.set(ns.q(ns.SOAP12, "mustUnderstand"), "true")
    timestamp = etree.SubElement(security, _wsu("Timestamp"))
    timestamp.set(_wsu("Id"), f"TS-{uuid.uuid4()}")
    etree.SubElement(timestamp, _wsu("Created")).text = format_instant(created)
    etree.SubElement(timestamp, _wsu("Expires")).text = format_instant(created + ttl)
    security.append(assertion_el)
    return security


def verify_security_header(security_el: etree._Element | None, policy: VerificationPolicy, *,
                           now: datetime | None = None) -> VerifiedIdentity:
    """Check the header's shape and Timestamp, then :func:`~gateway.security.saml.verify_assertion`.

    Faults (all :class:`SecurityError`): no header, no assertion, more than one assertion, an
    assertion not directly inside the header, more than one Timestamp or an unreadable one →
    ``wsse:InvalidSecurity``; a SAML 1.x assertion → ``wsse:UnsupportedSecurityToken``; Timestamp
    Expires passed (beyond ``policy.clock_skew``) → ``wsse:MessageExpired``; Created in the future →
    ``wsse:InvalidSecurity``; then whatever the assertion verification raises.
    """
    moment = utc_now(now)
    if security_el is None:
        raise SecurityError(WSSE_INVALID_SECURITY,
                            "no WS-Security header: the SOAP Header must carry a wsse:Security element "
                            f"({ns.WSSE}) with a signed SAML 2.0 assertion (ITI TF-2 3.40.4.1.2)")
    if security_el.tag != _wsse("Security"):
        raise SecurityError(WSSE_INVALID_SECURITY, f"expected a wsse:Security header ({ns.WSSE}), "
                                                   f"got {security_el.tag!r}")
    assertion = _single_assertion(security_el)
    _check_timestamp(security_el, policy, moment)
    return verify_assertion(assertion, policy, now=moment)


def _top_level(security: etree._Element, tag: str) -> list[etree._Element]:
    """Elements ``tag`` anywhere in the header except inside another assertion (e.g. CONNECT's Evidence)."""
    found = []
    for element in security.iter(tag):
        ancestor = element.getparent()
        while ancestor is not None and ancestor is not security and \
                etree.QName(ancestor).localname != "Assertion":
            ancestor = ancestor.getparent()
        if ancestor is security:
            found.append(element)
    return found


def _single_assertion(security: etree._Element) -> etree._Element:
    assertions = _top_level(security, ns.q(ns.SAML2, "Assertion"))
    if not assertions:
        if _top_level(security, ns.q(SAML1, "Assertion")):
            raise SecurityError(WSSE_UNSUPPORTED_SECURITY_TOKEN, "SAML 1.x assertions are not supported; send a "
                                                                 f"SAML 2.0 assertion ({ns.SAML2})")
        raise SecurityError(WSSE_INVALID_SECURITY, "the wsse:Security header carries no saml2:Assertion; expected "
                                                   "one signed SAML 2.0 assertion (ITI TF-2 3.40.4.1.2)")
    if len(assertions) > 1:
        raise SecurityError(WSSE_INVALID_SECURITY, f"the wsse:Security header carries {len(assertions)} SAML "
                                                   "assertions; expected exactly one")
    assertion = assertions[0]
    if assertion.getparent() is not security:
        raise SecurityError(WSSE_INVALID_SECURITY, "the saml2:Assertion must be a direct child of wsse:Security, "
                                                   f"found inside {assertion.getparent().tag!r}")
    return assertion


def _check_timestamp(security: etree._Element, policy: VerificationPolicy, moment: datetime) -> None:
    """WSS 1.0 §10: optional, at most one; Expires beyond the skew → MessageExpired."""
    timestamps = security.findall(_wsu("Timestamp"))
    if len(timestamps) > 1:
        raise SecurityError(WSSE_INVALID_SECURITY, f"the wsse:Security header has {len(timestamps)} "
                                                   "wsu:Timestamp elements; at most one is allowed (WSS 1.0 §10)")
    if not timestamps:
        return
    created, expires = (_timestamp_value(timestamps[0], part) for part in ("Created", "Expires"))
    skew = policy.clock_skew
    if expires is not None and moment - skew >= expires:
        raise SecurityError(WSSE_MESSAGE_EXPIRED, f"the message expired: wsu:Timestamp Expires is "
                                                  f"{format_instant(expires)}, now {format_instant(moment)} "
                                                  f"(clock skew allowed {skew.total_seconds():.0f} s)")
    if created is not None and moment + skew < created:
        raise SecurityError(WSSE_INVALID_SECURITY, f"the message is not yet valid: wsu:Timestamp Created is "
                                                   f"{format_instant(created)}, now {format_instant(moment)} "
                                                   f"(clock skew allowed {skew.total_seconds():.0f} s)")


def _timestamp_value(timestamp: etree._Element, part: str) -> datetime | None:
    text = timestamp.findtext(_wsu(part))
    if text is None:
        return None
    try:
        return parse_instant(text)
    except ValueError:
        raise SecurityError(WSSE_INVALID_SECURITY, f"wsu:Timestamp/wsu:{part} {text.strip()!r} is not a UTC "
                                                   "xs:dateTime (expected e.g. 2024-01-31T12:00:00.000Z)") from None
