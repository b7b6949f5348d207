"""The wsse:Security header: build, verify, Timestamp handling, header-level wrapping attacks, and the
real Epic-bound and CONNECT requests re-signed in place inside their original SOAP envelopes."""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path

import pytest
from lxml import etree

from gateway.errors import (
    WSSE_FAILED_CHECK,
    WSSE_INVALID_SECURITY,
    WSSE_INVALID_SECURITY_TOKEN,
    WSSE_MESSAGE_EXPIRED,
    WSSE_UNSUPPORTED_ALGORITHM,
    WSSE_UNSUPPORTED_SECURITY_TOKEN,
    QName,
    SecurityError,
)
from gateway.security.saml import (
    SIG_RSA_SHA1,
    SIG_RSA_SHA256,
    VerificationPolicy,
    VerifiedIdentity,
    build_assertion,
    parse_instant,
)
from gateway.security.wssecurity import build_security_header, verify_security_header
from gateway.soap import ns

from ._saml_fixtures import (
    CONNECT_39,
    DS_SIGNATURE,
    EPIC_38,
    EPIC_39,
    EPIC_55,
    IDENTITY,
    SAML2_ASSERTION,
    SamlPki,
    first_assertion,
    make_pki,
    read_xml,
    reparse,
    resign,
    security_header,
    set_attribute_value,
    set_timestamp,
)

WSU_TIMESTAMP = ns.q(ns.WSU, "Timestamp")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SamlPki:
    return make_pki(tmp_path_factory.mktemp("wss-pki"))


def header(pki: SamlPki, now: dt.datetime | None = None, ttl: dt.timedelta = dt.timedelta(minutes=5),
           **kwargs: object) -> etree._Element:
    assertion = build_assertion(IDENTITY, pki.creds, issuer="xig@2.999.1", now=now, **kwargs)  # type: ignore[arg-type]
    return build_security_header(assertion, now=now, ttl=ttl)


def envelope(security: etree._Element) -> etree._Element:
    """A SOAP 1.2 envelope around ``security``, serialised and parsed back as a receiver sees it."""
    env = etree.fromstring(f'<soap:Envelope xmlns:soap="{ns.SOAP12}"><soap:Header/><soap:Body>'
                           '<Ping xmlns="urn:example"/></soap:Body></soap:Envelope>'.encode())
    env[0].append(security)
    return reparse(env)


def rejected(security: etree._Element | None, policy: VerificationPolicy, subcode: QName,
             now: dt.datetime | None = None) -> SecurityError:
    with pytest.raises(SecurityError) as info:
        verify_security_header(security, policy, now=now)
    assert info.value.subcode == subcode, info.value.reason
    return info.value


def test_header_layout(pki: SamlPki) -> None:
    now = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    security = header(pki, now=now, ttl=dt.timedelta(minutes=3))
    assert security.tag == ns.q(ns.WSSE, "Security")
    assert security.get(ns.q(ns.SOAP12, "mustUnderstand")) == "true"
    assert [c.tag for c in security] == [WSU_TIMESTAMP, SAML2_ASSERTION]
    timestamp = security.find(WSU_TIMESTAMP)
    assert re.fullmatch(r"TS-[0-9a-f-]{36}", timestamp.get(ns.q(ns.WSU, "Id")))
    created = timestamp.findtext(ns.q(ns.WSU, "Created"))
    expires = timestamp.findtext(ns.q(ns.WSU, "Expires"))
    assert (created, expires) == ("2031-05-06T07:08:09.123Z", "2031-05-06T07:11:09.123Z")
    assert parse_instant(expires) - parse_instant(created) == dt.timedelta(minutes=3)


def test_round_trip_inside_an_envelope(pki: SamlPki) -> None:
    security = security_header(envelope(header(pki)))
    identity = verify_security_header(security, pki.policy())
    assert isinstance(identity, VerifiedIdentity)
    assert (identity.subject_id, identity.home_community_id) == (IDENTITY.subject_id, "urn:oid:2.999.1")
    assert identity.signature_algorithm == SIG_RSA_SHA256


def test_no_header(pki: SamlPki) -> None:
    error = rejected(None, pki.policy(), WSSE_INVALID_SECURITY)
    assert "no WS-Security header" in error.reason


def test_not_a_security_element(pki: SamlPki) -> None:
    rejected(etree.Element(ns.q(ns.WSA, "Action")), pki.policy(), WSSE_INVALID_SECURITY)


def test_header_without_assertion(pki: SamlPki) -> None:
    security = header(pki)
    security.remove(security.find(SAML2_ASSERTION))
    error = rejected(security, pki.policy(), WSSE_INVALID_SECURITY)
    assert "no saml2:Assertion" in error.reason


def test_saml1_assertion_is_unsupported(pki: SamlPki) -> None:
    security = header(pki)
    security.remove(security.find(SAML2_ASSERTION))
    etree.SubElement(security, "{urn:oasis:names:tc:SAML:1.0:assertion}Assertion", MajorVersion="1")
    rejected(security, pki.policy(), WSSE_UNSUPPORTED_SECURITY_TOKEN)


def test_unsigned_assertion_in_header(pki: SamlPki) -> None:
    security = header(pki)
    assertion = security.find(SAML2_ASSERTION)
    assertion.remove(assertion.find(DS_SIGNATURE))
    error = rejected(security, pki.policy(), WSSE_INVALID_SECURITY_TOKEN)
    assert "assertion is not signed" in error.reason


# -------------------------------------------------------------------------------------- Timestamp

def test_expired_timestamp(pki: SamlPki) -> None:
    now = dt.datetime.now(dt.UTC)
    # assertion still valid for an hour, Timestamp expired 3 minutes ago
    security = header(pki, now=now - dt.timedelta(minutes=4), ttl=dt.timedelta(minutes=1),
                      lifetime=dt.timedelta(hours=1))
    error = rejected(security, pki.policy(), WSSE_MESSAGE_EXPIRED, now=now)
    assert "wsu:Timestamp" in error.reason
    assert verify_security_header(security, pki.policy(clock_skew=dt.timedelta(minutes=4)), now=now).subject_id


def test_timestamp_from_the_future(pki: SamlPki) -> None:
    now = dt.datetime.now(dt.UTC)
    security = header(pki, now=now)
    set_timestamp(security, now + dt.timedelta(minutes=10), now + dt.timedelta(minutes=15))
    error = rejected(security, pki.policy(), WSSE_INVALID_SECURITY, now=now)
    assert "not yet valid" in error.reason


def test_timestamp_optional_and_unique(pki: SamlPki) -> None:
    security = header(pki)
    timestamp = security.find(WSU_TIMESTAMP)
    security.append(copy.deepcopy(timestamp))
    rejected(security, pki.policy(), WSSE_INVALID_SECURITY)
    security.remove(timestamp)
    security.remove(security.find(WSU_TIMESTAMP))
    assert verify_security_header(security, pki.policy()).subject_id == IDENTITY.subject_id


def test_malformed_timestamp(pki: SamlPki) -> None:
    security = header(pki)
    security.find(f"{WSU_TIMESTAMP}/{ns.q(ns.WSU, 'Expires')}").text = "tomorrow"
    error = rejected(security, pki.policy(), WSSE_INVALID_SECURITY)
    assert "tomorrow" in error.reason


def test_assertion_before_timestamp(pki: SamlPki) -> None:
    security = header(pki)
    security.append(security.find(WSU_TIMESTAMP))  # Epic-bound order: Assertion, Timestamp
    assert [c.tag for c in security] == [SAML2_ASSERTION, WSU_TIMESTAMP]
    assert verify_security_header(security_header(envelope(security)), pki.policy()).subject_id


def test_expired_assertion_in_fresh_header(pki: SamlPki) -> None:
    now = dt.datetime.now(dt.UTC)
    assertion = build_assertion(IDENTITY, pki.creds, issuer="x@y", now=now - dt.timedelta(hours=1))
    security = build_security_header(assertion, now=now)
    rejected(security, pki.policy(), WSSE_MESSAGE_EXPIRED, now=now)


# -------------------------------------------------------------------------- header-level wrapping

def _evil(signed: etree._Element) -> etree._Element:
    evil = copy.deepcopy(signed)
    set_attribute_value(evil, "urn:oasis:names:tc:xspa:1.0:subject:subject-id", "Mallory")
    return evil


def test_wrapping_second_assertion_before_the_signed_one(pki: SamlPki) -> None:
    security = header(pki)
    signed = security.find(SAML2_ASSERTION)
    evil = _evil(signed)
    evil.remove(evil.find(DS_SIGNATURE))
    evil.set("ID", "_evil")
    signed.addprevious(evil)
    error = rejected(security_header(envelope(security)), pki.policy(), WSSE_INVALID_SECURITY)
    assert "2 SAML assertions" in error.reason


def test_wrapping_signed_assertion_moved_into_a_wrapper_inside_the_header(pki: SamlPki) -> None:
    security = header(pki)
    signed = security.find(SAML2_ASSERTION)
    signed.addprevious(_evil(signed))  # same ID, original signature, changed content
    wrapper = etree.SubElement(security, "{urn:example:ext}Wrapper")
    wrapper.append(signed)
    rejected(security_header(envelope(security)), pki.policy(), WSSE_INVALID_SECURITY)


def test_wrapping_signed_assertion_moved_out_of_the_header(pki: SamlPki) -> None:
    """Only the evil copy remains in wsse:Security; the signed original hides in another header."""
    env = envelope(header(pki))
    security = security_header(env)
    signed = security.find(SAML2_ASSERTION)
    signed.addprevious(_evil(signed))
    etree.SubElement(env[0], "{urn:example:ext}Extension").append(signed)
    error = rejected(security_header(reparse(env)), pki.policy(), WSSE_FAILED_CHECK)
    assert "occurs 2 times" in error.reason


def test_wrapping_only_assertion_nested_in_a_wrapper(pki: SamlPki) -> None:
    security = header(pki)
    signed = security.find(SAML2_ASSERTION)
    etree.SubElement(security, "{urn:example:ext}Wrapper").append(signed)
    error = rejected(security, pki.policy(), WSSE_INVALID_SECURITY)
    assert "direct child" in error.reason


def test_duplicate_id_in_the_body(pki: SamlPki) -> None:
    env = envelope(header(pki))
    assertion_id = security_header(env).find(SAML2_ASSERTION).get("ID")
    etree.SubElement(env[1][0], "{urn:example}Item", ID=assertion_id)
    rejected(security_header(reparse(env)), pki.policy(), WSSE_FAILED_CHECK)


# ----------------------------------------------------------------------- real envelopes re-signed

@pytest.mark.parametrize(("path", "algorithm", "purpose", "order"), [
    pytest.param(EPIC_55, "rsa-sha1", "TREATMENT", ["Assertion", "Signature", "Timestamp"], id="epic-iti55-sha1"),
    pytest.param(EPIC_38, "rsa-sha1", "TREATMENT", ["Assertion", "Signature", "Timestamp"], id="epic-iti38-sha1"),
    pytest.param(EPIC_39, "rsa-sha256", "TREATMENT", ["Assertion", "Signature", "Timestamp"], id="epic-iti39-sha256"),
    pytest.param(CONNECT_39, "rsa-sha256", "PUBLICHEALTH", ["Timestamp", "Assertion", "Signature"],
                 id="connect-iti39-sha256"),
])
def test_real_request_resigned_in_its_envelope(pki: SamlPki, path: Path, algorithm: str, purpose: str,
                                               order: list[str]) -> None:
    root = read_xml(path)
    security = security_header(root)
    # the peers' layouts, including a message-level ds:Signature over the Timestamp (not verified by XIG)
    assert [etree.QName(c).localname for c in security] == order
    now = dt.datetime.now(dt.UTC)
    resign(first_assertion(root), pki.creds, algorithm=algorithm, now=now)
    set_timestamp(security, now, now + dt.timedelta(minutes=5))
    wire = reparse(root)
    policy = pki.policy(allow_sha1=True, permitted_purposes=frozenset({purpose}))
    identity = verify_security_header(security_header(wire), policy, now=now + dt.timedelta(seconds=20))
    assert identity.signature_algorithm == (SIG_RSA_SHA1 if algorithm == "rsa-sha1" else SIG_RSA_SHA256)
    assert identity.purpose_of_use.code == purpose
    assert identity.home_community_id in ("urn:oid:2.16.840.1.113883.3.9621", "urn:oid:1.1")
    assert identity.signer_subject == pki.creds.certificate.subject.rfc4514_string()
    # the same message an hour later: the Timestamp has expired
    rejected(security_header(wire), policy, WSSE_MESSAGE_EXPIRED, now=now + dt.timedelta(hours=1))
    # SHA-1 peers need the policy switch
    if algorithm == "rsa-sha1":
        rejected(security_header(wire), pki.policy(permitted_purposes=frozenset({purpose})),
                 WSSE_UNSUPPORTED_ALGORITHM, now=now)


def test_real_request_tampered_after_resigning(pki: SamlPki) -> None:
    root = read_xml(EPIC_55)
    now = dt.datetime.now(dt.UTC)
    assertion = resign(first_assertion(root), pki.creds, algorithm="rsa-sha1", now=now)
    set_timestamp(security_header(root), now, now + dt.timedelta(minutes=5))
    set_attribute_value(assertion, "urn:nhin:names:saml:homeCommunityId", "urn:oid:2.16.840.1.113883.3.666")
    rejected(security_header(reparse(root)), pki.policy(allow_sha1=True), WSSE_FAILED_CHECK, now=now)


def test_signing_in_an_envelope_that_binds_the_namespaces_to_other_prefixes(pki: SamlPki) -> None:
    """lxml rebinds moved elements to prefixes already in scope; the signature must survive that."""
    env = etree.fromstring(
        f'<S:Envelope xmlns:S="{ns.SOAP12}" xmlns:dsig="{ns.DS}" xmlns:v3="{ns.HL7}"><S:Header>'
        f'<wsse:Security xmlns:wsse="{ns.WSSE}"/></S:Header><S:Body/></S:Envelope>'.encode())
    for algorithm in ("rsa-sha256", "rsa-sha1"):
        unsigned = build_assertion(IDENTITY, pki.creds, issuer="x@y")
        unsigned.remove(unsigned.find(DS_SIGNATURE))
        security = security_header(env)
        for old in security.findall(SAML2_ASSERTION):
            security.remove(old)
        security.append(unsigned)  # hl7:Role becomes v3:Role here — before signing, so harmless
        resign(security.find(SAML2_ASSERTION), pki.creds, algorithm=algorithm)
        signature = security.find(f"{SAML2_ASSERTION}/{DS_SIGNATURE}")
        assert signature.prefix == "dsig"
        identity = verify_security_header(security_header(reparse(env)), pki.policy(allow_sha1=True))
        assert identity.role == IDENTITY.role
