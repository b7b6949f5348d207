"""Helpers shared by test_saml.py and test_wssecurity.py: a real test PKI, identities, sample files,
and re-signing of real (expired, pretty-printed) sample assertions with a test key."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree

from gateway.security.certs import CertSet, init_certs
from gateway.security.saml import (
    NHIN_PURPOSE_OID,
    SNOMED_CT_OID,
    CodedValue,
    SigningCredentials,
    UserIdentity,
    VerificationPolicy,
    format_instant,
    load_signing_credentials,
    load_trusted,
    sign_assertion,
)
from gateway.soap import ns
from tests.conftest import SAMPLES

MESSAGES = SAMPLES / "messages"
EPIC_55 = MESSAGES / "iti55-xcpd/metriport-carequality/epic-iti-55-request.xml"
EPIC_38 = MESSAGES / "iti38-xca-query/metriport-carequality/epic-iti-38-request.xml"
EPIC_39 = MESSAGES / "iti39-xca-retrieve/metriport-carequality/epic-iti-39-request.xml"
CONNECT_39 = MESSAGES / "iti39-xca-retrieve/connect/saml_header_diff_order.xml"
CONNECT_COMPLETE = MESSAGES / "saml/connect/complete_saml.xml"
CONNECT_AUTH_FRAMEWORK = MESSAGES / "saml/connect/authFrameworkAssertion.xml"
METRIPORT_VALID = MESSAGES / "saml/metriport-carequality/valid-saml.xml"
IPF_XUA = MESSAGES / "saml/ipf/saml2-assertion-for-xua.xml"
IPF_XUA_CH = MESSAGES / "saml/ipf/xua-assertion.xml"

SAML2_ASSERTION = ns.q(ns.SAML2, "Assertion")
DS_SIGNATURE = ns.q(ns.DS, "Signature")
WSSE_SECURITY = ns.q(ns.WSSE, "Security")

IDENTITY = UserIdentity(
    subject_id="Dr. Alice Example",
    organization="XIG Community A",
    organization_id="urn:oid:2.999.1",
    home_community_id="2.999.1",  # bare on purpose: the builder emits urn:oid:
    role=CodedValue("224608005", SNOMED_CT_OID, "SNOMED_CT", "Administrator"),
    purpose_of_use=CodedValue("TREATMENT", NHIN_PURPOSE_OID, "nhin-purpose", "Treatment"),
    npi="1234567890",
    resource_id="PAT-1^^^&2.999.1.1&ISO",
)


@dataclass(frozen=True)
class SamlPki:
    certs: CertSet  #: trusted CA, gateway and partner certificates
    rogue: CertSet  #: an independent CA nobody trusts
    creds: SigningCredentials  #: gateway certificate, issued by the trusted CA
    rogue_creds: SigningCredentials
    trusted: list[x509.Certificate]

    def policy(self, **overrides: object) -> VerificationPolicy:
        return VerificationPolicy(trusted=self.trusted, **overrides)  # type: ignore[arg-type]


def make_pki(directory: Path) -> SamlPki:
    certs = init_certs(directory / "trusted")
    rogue = init_certs(directory / "rogue", ca_name="Rogue CA")
    return SamlPki(certs, rogue, load_signing_credentials(certs.gateway_cert, certs.gateway_key),
                   load_signing_credentials(rogue.gateway_cert, rogue.gateway_key), load_trusted(certs.ca_cert))


def make_intermediate(root_cert: x509.Certificate, root_key: rsa.RSAPrivateKey,
                      ) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """An intermediate CA under ``root`` (make_ca only makes self-signed roots)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "XIG Test Intermediate")]))
        .issuer_name(root_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return cert, key


# ------------------------------------------------------------------------------------- XML helpers

def read_xml(path: Path) -> etree._Element:
    from gateway.soap.xml import parse

    return parse(path.read_bytes())


def reparse(element: etree._Element) -> etree._Element:
    """Serialise the whole document and parse it again, as a receiver would."""
    from gateway.soap.xml import parse, tostring

    return parse(tostring(element.getroottree().getroot()))


def first_assertion(root: etree._Element) -> etree._Element:
    """The outermost saml2:Assertion (skipping those nested as Evidence)."""
    if root.tag == SAML2_ASSERTION:
        return root
    for element in root.iter(SAML2_ASSERTION):
        return element
    raise AssertionError("no saml2:Assertion")


def security_header(root: etree._Element) -> etree._Element:
    found = root.find(f".//{WSSE_SECURITY}")
    assert found is not None
    return found


def strip_signature(assertion: etree._Element) -> None:
    for signature in assertion.findall(DS_SIGNATURE):
        assertion.remove(signature)


def set_attribute_value(assertion: etree._Element, name: str, value: str) -> None:
    for attribute in assertion.iter(ns.q(ns.SAML2, "Attribute")):
        if attribute.get("Name") == name:
            attribute.find(ns.q(ns.SAML2, "AttributeValue")).text = value
            return
    raise AssertionError(f"no attribute {name}")


def remove_attribute(assertion: etree._Element, name: str) -> None:
    for attribute in list(assertion.iter(ns.q(ns.SAML2, "Attribute"))):
        if attribute.get("Name") == name:
            attribute.getparent().remove(attribute)


def resign(assertion: etree._Element, creds: SigningCredentials, *, algorithm: str = "rsa-sha256",
           now: dt.datetime | None = None, lifetime: dt.timedelta = dt.timedelta(minutes=5),
           change: Callable[[etree._Element], None] | None = None) -> etree._Element:
    """Drop the old signature, apply ``change``, move the time window to ``now`` and sign in place."""
    strip_signature(assertion)
    if change is not None:
        change(assertion)
    if now is not None:
        set_window(assertion, now, lifetime)
    return sign_assertion(assertion, creds, signature_algorithm=algorithm)  # type: ignore[arg-type]


def set_window(assertion: etree._Element, now: dt.datetime, lifetime: dt.timedelta) -> None:
    """IssueInstant/NotBefore = now, NotOnOrAfter = now + lifetime; adds Conditions after Subject if absent."""
    assertion.set("IssueInstant", format_instant(now))
    conditions = assertion.find(ns.q(ns.SAML2, "Conditions"))
    if conditions is None:
        conditions = etree.Element(ns.q(ns.SAML2, "Conditions"))
        assertion.find(ns.q(ns.SAML2, "Subject")).addnext(conditions)
    conditions.set("NotBefore", format_instant(now))
    conditions.set("NotOnOrAfter", format_instant(now + lifetime))


def set_timestamp(security: etree._Element, created: dt.datetime, expires: dt.datetime) -> None:
    timestamp = security.find(ns.q(ns.WSU, "Timestamp"))
    assert timestamp is not None
    timestamp.find(ns.q(ns.WSU, "Created")).text = format_instant(created)
    timestamp.find(ns.q(ns.WSU, "Expires")).text = format_instant(expires)
