"""XUA SAML 2.0 assertions with the Carequality / NHIN attribute set: build, sign, parse, verify.

The Initiating Gateway builds and signs the assertion it puts in ``wsse:Security``; the Responding
Gateway parses and verifies the one it receives. Pure codec: no network; files are read only by
:func:`load_signing_credentials` and :func:`load_trusted`.

References (spec digest §7.2 summarises them):

* ITI TF-2 3.40.4.1.2 — assertion profile: Subject with SubjectConfirmation, Conditions (NotBefore =
  IssueInstant, AudienceRestriction), AuthnStatement, XSPA attributes, Subject-Role and PurposeOfUse
  options (HL7 CE); 3.40.4.1.3 — validation, failures are WS-Security faults (WSS 1.0 §12);
  3.40.4.2 — ATNA ``UserName`` encoding ``alias<user@issuer>``.
* SAML Core 2.0 (saml-core-2.0-os) §2.3.3 (Assertion; element order Issuer, Signature, Subject,
  Conditions, statements), §2.5.1 (Conditions, AudienceRestriction), §5.4 (XML Signature profile:
  enveloped signature, exclusive c14n, one Reference with ``URI="#" + ID``).

Libraries: signatures (RSA-SHA256, and RSA-SHA1 for the legacy partners that still use it: CONNECT's
default, Epic-bound traffic) are made with lxml's exclusive c14n and cryptography's RSA — the few steps
of XML-DSig an enveloped assertion signature needs, written out in :func:`_sign_enveloped` because
signxml's signer costs ~0.4 ms of Python per assertion and refuses SHA-1; its RSA-SHA256 output is
byte-identical to signxml's (tested against signxml). Verification of every algorithm uses python-xmlsec
(libxmlsec1), on a private copy of the assertion — see :func:`_xmlsec_document` for why.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import xmlsec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from lxml import etree

from gateway.errors import (
    WSSE_FAILED_AUTHENTICATION,
    WSSE_FAILED_CHECK,
    WSSE_INVALID_SECURITY_TOKEN,
    WSSE_MESSAGE_EXPIRED,
    WSSE_UNSUPPORTED_ALGORITHM,
    WSSE_UNSUPPORTED_SECURITY_TOKEN,
    QName,
    SecurityError,
)
from gateway.soap import ns

# ---------------------------------------------------------------------------------------- constants

NAMEID_EMAIL: Final = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
NAMEID_X509_SUBJECT: Final = "urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName"
CM_BEARER: Final = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
CM_HOLDER_OF_KEY: Final = "urn:oasis:names:tc:SAML:2.0:cm:holder-of-key"
AUTHN_CONTEXT_X509: Final = "urn:oasis:names:tc:SAML:2.0:ac:classes:X509"
ATTRNAME_FORMAT_URI: Final = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"

ATTR_SUBJECT_ID: Final = "urn:oasis:names:tc:xspa:1.0:subject:subject-id"
ATTR_ORGANIZATION: Final = "urn:oasis:names:tc:xspa:1.0:subject:organization"
ATTR_ORGANIZATION_ID: Final = "urn:oasis:names:tc:xspa:1.0:subject:organization-id"
ATTR_HOME_COMMUNITY_ID: Final = "urn:nhin:names:saml:homeCommunityId"  # NHIN / Carequality name (emitted)
ATTR_HOME_COMMUNITY_ID_IHE: Final = "urn:ihe:iti:xca:2010:homeCommunityId"  # ITI TF-2 3.40.4.1.2 name
ATTR_ROLE: Final = "urn:oasis:names:tc:xacml:2.0:subject:role"
ATTR_PURPOSE_OF_USE: Final = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"
ATTR_NPI: Final = "urn:oasis:names:tc:xspa:1.0:subject:npi"
ATTR_NPI_XSPA2: Final = "urn:oasis:names:tc:xspa:2.0:subject:npi"  # CONNECT
ATTR_RESOURCE_ID: Final = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"

SNOMED_CT_OID: Final = "2.16.840.1.113883.6.96"
NHIN_PURPOSE_OID: Final = "2.16.840.1.113883.3.18.7.1"

SIG_RSA_SHA1: Final = "http://www.w3.org/2000/09/xmldsig#rsa-sha1"
SIG_RSA_SHA256: Final = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
SIG_RSA_SHA384: Final = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384"
SIG_RSA_SHA512: Final = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512"
DIGEST_SHA1: Final = "http://www.w3.org/2000/09/xmldsig#sha1"
DIGEST_SHA256: Final = "http://www.w3.org/2001/04/xmlenc#sha256"
DIGEST_SHA384: Final = "http://www.w3.org/2001/04/xmldsig-more#sha384"
DIGEST_SHA512: Final = "http://www.w3.org/2001/04/xmlenc#sha512"
TRANSFORM_ENVELOPED: Final = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
C14N_EXCLUSIVE: Final = ns.EXC_C14N

_XC = xmlsec.constants
#: python-xmlsec's transform constants (its stubs name the type privately)
_Transform: TypeAlias = Any
#: Accepted SignatureMethod URIs → (xmlsec transform, uses SHA-1).
_SIGNATURE_METHODS: Final[dict[str, tuple[_Transform, bool]]] = {
    SIG_RSA_SHA1: (_XC.TransformRsaSha1, True),
    SIG_RSA_SHA256: (_XC.TransformRsaSha256, False),
    SIG_RSA_SHA384: (_XC.TransformRsaSha384, False),
    SIG_RSA_SHA512: (_XC.TransformRsaSha512, False),
}
#: Accepted DigestMethod URIs → (xmlsec transform, is SHA-1).
_DIGEST_METHODS: Final[dict[str, tuple[_Transform, bool]]] = {
    DIGEST_SHA1: (_XC.TransformSha1, True),
    DIGEST_SHA256: (_XC.TransformSha256, False),
    DIGEST_SHA384: (_XC.TransformSha384, False),
    DIGEST_SHA512: (_XC.TransformSha512, False),
}
_REFERENCE_TRANSFORMS: Final = {TRANSFORM_ENVELOPED: _XC.TransformEnveloped, C14N_EXCLUSIVE: _XC.TransformExclC14N}

#: Logical attribute names (as used in :attr:`VerificationPolicy.required_attributes`) → accepted
#: SAML attribute Names, the one we emit first.
ATTRIBUTE_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "subject_id": (ATTR_SUBJECT_ID,),
    "organization": (ATTR_ORGANIZATION,),
    "organization_id": (ATTR_ORGANIZATION_ID,),
    "home_community_id": (ATTR_HOME_COMMUNITY_ID, ATTR_HOME_COMMUNITY_ID_IHE),
    "role": (ATTR_ROLE,),
    "purpose_of_use": (ATTR_PURPOSE_OF_USE,),
    "npi": (ATTR_NPI, ATTR_NPI_XSPA2),
    "resource_id": (ATTR_RESOURCE_ID,),
}
DEFAULT_REQUIRED_ATTRIBUTES: Final = frozenset(
    {"subject_id", "organization", "organization_id", "home_community_id", "role", "purpose_of_use"})

_MAX_CHAIN_LENGTH: Final = 6
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_XS_DATETIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?$")


def _parser(*, collect_ids: bool = False) -> etree.XMLParser:
    """A fresh parser per use (parsers are not shared across worker threads) for re-reading XML that lxml
    itself serialised. ``collect_ids`` only for :func:`_xmlsec_document`, whose internal subset we write."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                           collect_ids=collect_ids)


def _saml(local: str) -> str:
    return ns.q(ns.SAML2, local)


def _ds(local: str) -> str:
    return ns.q(ns.DS, local)


# ------------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class CodedValue:
    """An HL7 V3 CE value (code, codeSystem OID, codeSystemName, displayName)."""

    code: str
    code_system: str
    code_system_name: str | None = None
    display_name: str | None = None


#: The value of a coded attribute the sender omitted and the policy did not require.
NOT_PROVIDED: Final = CodedValue("", "")


@dataclass(frozen=True)
class UserIdentity:
    """Who we assert the request is made by (ITI TF-2 3.40.4.1.2 XSPA attributes)."""

    subject_id: str  #: the user's name in plain text, not a login
    organization: str
    organization_id: str  #: ``urn:oid:...`` (a bare OID is prefixed) or an http(s) URL
    home_community_id: str  #: ``urn:oid:...`` (a bare OID is prefixed)
    role: CodedValue  #: SNOMED CT, codeSystem 2.16.840.1.113883.6.96
    purpose_of_use: CodedValue  #: NHIN purpose, codeSystem 2.16.840.1.113883.3.18.7.1, e.g. TREATMENT
    npi: str | None = None
    resource_id: str | None = None  #: patient id in CX form


@dataclass(frozen=True)
class SigningCredentials:
    """The signer's certificate chain (leaf first) and the leaf's private key."""

    certificate_chain: list[x509.Certificate]
    private_key: rsa.RSAPrivateKey

    def __post_init__(self) -> None:
        if not self.certificate_chain:
            raise ValueError("signing credentials need at least the signer's certificate")
        if self.certificate_chain[0].public_key() != self.private_key.public_key():
            raise ValueError("the private key does not belong to the first certificate of the chain")

    @property
    def certificate(self) -> x509.Certificate:
        return self.certificate_chain[0]


@dataclass(frozen=True)
class AssertionClaims:
    """What an assertion says, read without any signature or policy check (see :func:`extract_identity`).

    Attribute values are normalised (whitespace collapsed, OIDs as ``urn:oid:<oid>``); ``None`` means
    absent. ``attribute_errors`` lists (logical name, problem) for values present but unusable.
    """

    assertion_id: str
    issuer: str
    issue_instant: datetime
    issuer_format: str | None = None
    name_id: str = ""
    name_id_format: str | None = None
    sp_provided_id: str | None = None
    not_before: datetime | None = None
    not_on_or_after: datetime | None = None
    audience_restrictions: tuple[tuple[str, ...], ...] = ()
    confirmation_methods: tuple[str, ...] = ()
    subject_id: str | None = None
    organization: str | None = None
    organization_id: str | None = None
    home_community_id: str | None = None
    role: CodedValue | None = None
    purpose_of_use: CodedValue | None = None
    npi: str | None = None
    resource_id: str | None = None
    attribute_errors: tuple[tuple[str, str], ...] = ()

    @property
    def audit_user_name(self) -> str:
        return audit_user_name(self.sp_provided_id, self.name_id, self.issuer)


@dataclass(frozen=True)
class VerifiedIdentity:
    """The identity of a verified assertion: signature, trust chain, time window and policy all passed.

    Every attribute the policy requires is set. With a policy that does not require an attribute and an
    assertion that omits it, a text attribute is ``""`` and a coded one :data:`NOT_PROVIDED` (empty code).
    """

    subject_id: str
    organization: str
    organization_id: str  #: ``urn:oid:<oid>`` or an http(s) URL
    home_community_id: str  #: normalised ``urn:oid:<oid>``
    role: CodedValue
    purpose_of_use: CodedValue
    npi: str | None
    issuer: str
    name_id: str
    assertion_id: str
    not_on_or_after: datetime | None
    signature_algorithm: str  #: SignatureMethod URI
    signer_subject: str  #: RFC 4514 subject of the certificate that signed the assertion
    resource_id: str | None = None
    sp_provided_id: str | None = None
    issuer_format: str | None = None
    confirmation_methods: tuple[str, ...] = ()

    @property
    def audit_user_name(self) -> str:
        """ATNA ``UserName`` per ITI TF-2 3.40.4.2."""
        return audit_user_name(self.sp_provided_id, self.name_id, self.issuer)


def audit_user_name(alias: str | None, user: str, issuer: str) -> str:
    """``alias<user@issuer>`` (ITI TF-2 3.40.4.2): alias is the optional NameID/@SPProvidedID, user
    the Subject's NameID, issuer the assertion's Issuer — e.g. ``JD<John.Doe@example.com>``."""
    return f"{alias or ''}<{user}@{issuer}>"


@dataclass(frozen=True)
class VerificationPolicy:
    """What a received assertion must satisfy (see :func:`verify_assertion`)."""

    trusted: list[x509.Certificate]  #: CA certificates and/or pinned signer certificates
    allow_sha1: bool = False
    clock_skew: timedelta = timedelta(minutes=2)
    permitted_purposes: frozenset[str] = frozenset({"TREATMENT"})
    required_attributes: frozenset[str] = DEFAULT_REQUIRED_ATTRIBUTES
    #: when set, every AudienceRestriction present must list it (SAML Core §2.5.1.4)
    audience: str | None = None
    #: refuse assertions without Conditions/@NotOnOrAfter (they would never expire)
    require_expiry: bool = True

    def __post_init__(self) -> None:
        if not self.trusted:
            raise ValueError("a verification policy needs at least one trusted certificate")
        unknown = set(self.required_attributes) - set(ATTRIBUTE_NAMES)
        if unknown:
            raise ValueError(f"unknown required attribute(s) {sorted(unknown)}; known: {sorted(ATTRIBUTE_NAMES)}")


# --------------------------------------------------------------------------------------- key files

def load_signing_credentials(cert_path: str | Path, key_path: str | Path,
                             password: bytes | None = None) -> SigningCredentials:
    """Read a PEM certificate chain (leaf first) and the leaf's PEM private key (RSA)."""
    chain = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=password)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{key_path}: SAML signing needs an RSA private key, got {type(key).__name__}")
    return SigningCredentials(chain, key)


def load_trusted(path: str | Path) -> list[x509.Certificate]:
    """Read a PEM bundle of trusted CA and/or pinned signer certificates."""
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    if not certs:
        raise ValueError(f"{path}: no PEM certificates found")
    return certs


# ------------------------------------------------------------------------------------ time & values

def utc_now(moment: datetime | None = None) -> datetime:
    """``moment`` (or the current time) as an aware UTC datetime; naive values are taken as UTC."""
    if moment is None:
        return datetime.now(UTC)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def format_instant(moment: datetime) -> str:
    """xs:dateTime in UTC with milliseconds and ``Z`` (SAML Core §1.3.3 requires UTC)."""
    m = utc_now(moment)  # formatted by hand: strftime costs ~3 µs, six instants per outbound request
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
            f".{m.microsecond // 1000:03d}Z")


def parse_instant(value: str) -> datetime:
    """Parse an xs:dateTime; any number of fraction digits; no zone is read as UTC (SAML Core §1.3.3)."""
    match = _XS_DATETIME.match(value.strip())
    if match is None:
        raise ValueError(f"{value.strip()!r} is not an xs:dateTime")
    base, fraction, zone = match.groups()
    moment = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S")
    if fraction:
        moment = moment.replace(microsecond=int(fraction[:6].ljust(6, "0")))
    offset = timedelta(0)
    if zone and zone != "Z":
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])) * (1 if zone[0] == "+" else -1)
    return moment.replace(tzinfo=timezone(offset)).astimezone(UTC)


def normalize_oid_urn(value: str) -> str | None:
    """``urn:oid:1.2.3``, ``1.2.3`` or ``urn:oid:1.2.3}`` (stray brace seen from a real peer) →
    ``urn:oid:1.2.3``; ``None`` when the value is not an OID."""
    text = value.strip().strip("{}").strip()
    if text.lower().startswith("urn:oid:"):
        text = text[len("urn:oid:"):]
    return f"urn:oid:{text}" if _OID.match(text) else None


def _normalize_organization_id(value: str) -> str | None:
    """ITI TF-2 3.40.4.1.2: an OID in urn form, or a URL assigned to the organization."""
    oid = normalize_oid_urn(value)
    if oid is not None:
        return oid
    text = value.strip()
    return text if re.match(r"^https?://[^\s/]+", text) else None


def _collapse(text: str | None) -> str:
    return " ".join((text or "").split())


# ----------------------------------------------------------------------------------------- building

def build_assertion(identity: UserIdentity, creds: SigningCredentials, *, issuer: str,
                    issuer_format: str = NAMEID_EMAIL, audience: str | None = None,
                    lifetime: timedelta = timedelta(minutes=5), now: datetime | None = None,
                    confirmation: Literal["bearer", "holder-of-key"] = "holder-of-key",
                    signature_algorithm: Literal["rsa-sha256", "rsa-sha1"] = "rsa-sha256") -> etree._Element:
    """A signed ``saml2:Assertion`` asserting ``identity`` (ITI TF-2 3.40.4.1.2, Carequality practice).

    NameID is the signer certificate's subject DN (Format X509SubjectName); NotBefore = IssueInstant;
    the AttributeStatement carries the XSPA / NHIN attribute set with NameFormat uri. Raises
    ``ValueError`` for an identity that cannot be emitted in the strict forms (e.g. a non-OID HCID).
    """
    if lifetime <= timedelta(0):
        raise ValueError("assertion lifetime must be positive")
    issued = utc_now(now)
    assertion = etree.Element(_saml("Assertion"),
                              nsmap={"saml2": ns.SAML2, "ds": ns.DS, "xsi": ns.XSI, "hl7": ns.HL7})
    assertion.set("ID", "_" + uuid.uuid4().hex)  # an NCName: starts with "_"
    assertion.set("IssueInstant", format_instant(issued))
    assertion.set("Version", "2.0")
    _text_child(assertion, "Issuer", issuer, Format=issuer_format)
    _append_subject(assertion, creds.certificate, confirmation)
    _append_conditions(assertion, issued, issued + lifetime, audience)
    _append_authn_statement(assertion, issued)
    _append_attribute_statement(assertion, identity)
    return sign_assertion(assertion, creds, signature_algorithm=signature_algorithm)


def _text_child(parent: etree._Element, local: str, text: str, **attrs: str) -> etree._Element:
    child = etree.SubElement(parent, _saml(local), attrs)
    child.text = text
    return child


def _key_info(chain: Sequence[x509.Certificate], prefix: str = "ds") -> etree._Element:
    key_info = etree.Element(_ds("KeyInfo"), nsmap={prefix: ns.DS})
    data = etree.SubElement(key_info, _ds("X509Data"))
    for cert in chain:
        etree.SubElement(data, _ds("X509Certificate")).text = _base64_der(cert)
    return key_info


@functools.lru_cache(maxsize=64)
def _base64_der(cert: x509.Certificate) -> str:
    """The certificate's DER in base64 (our own few signing certificates, two per assertion we sign)."""
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")


def _append_subject(assertion: etree._Element, cert: x509.Certificate,
                    confirmation: Literal["bearer", "holder-of-key"]) -> None:
    subject = etree.SubElement(assertion, _saml("Subject"))
    _text_child(subject, "NameID", cert.subject.rfc4514_string(), Format=NAMEID_X509_SUBJECT)
    if confirmation == "bearer":
        etree.SubElement(subject, _saml("SubjectConfirmation"), Method=CM_BEARER)
        return
    if confirmation != "holder-of-key":
        raise ValueError(f"unknown subject confirmation {confirmation!r}")
    sc = etree.SubElement(subject, _saml("SubjectConfirmation"), Method=CM_HOLDER_OF_KEY)
    # SAML 2.0 Holder-of-Key profile: KeyInfoConfirmationDataType with the key the subject proves.
    data = etree.SubElement(sc, _saml("SubjectConfirmationData"))
    data.set(ns.q(ns.XSI, "type"), "saml2:KeyInfoConfirmationDataType")
    data.append(_key_info([cert]))


def _append_conditions(assertion: etree._Element, not_before: datetime, not_on_or_after: datetime,
                       audience: str | None) -> None:
    conditions = etree.SubElement(assertion, _saml("Conditions"), NotBefore=format_instant(not_before),
                                  NotOnOrAfter=format_instant(not_on_or_after))
    if audience:
        restriction = etree.SubElement(conditions, _saml("AudienceRestriction"))
        _text_child(restriction, "Audience", audience)


def _append_authn_statement(assertion: etree._Element, instant: datetime) -> None:
    statement = etree.SubElement(assertion, _saml("AuthnStatement"), AuthnInstant=format_instant(instant))
    context = etree.SubElement(statement, _saml("AuthnContext"))
    _text_child(context, "AuthnContextClassRef", AUTHN_CONTEXT_X509)


def _append_attribute_statement(assertion: etree._Element, identity: UserIdentity) -> None:
    organization_id = _normalize_organization_id(identity.organization_id)
    if organization_id is None:
        raise ValueError(f"organization_id {identity.organization_id!r} is neither an OID nor an http(s) URL")
    home_community_id = normalize_oid_urn(identity.home_community_id)
    if home_community_id is None:
        raise ValueError(f"home_community_id {identity.home_community_id!r} is not an OID")
    statement = etree.SubElement(assertion, _saml("AttributeStatement"))
    _text_attribute(statement, ATTR_SUBJECT_ID, identity.subject_id)
    _text_attribute(statement, ATTR_ORGANIZATION, identity.organization)
    _text_attribute(statement, ATTR_ORGANIZATION_ID, organization_id)
    _text_attribute(statement, ATTR_HOME_COMMUNITY_ID, home_community_id)
    _coded_attribute(statement, ATTR_ROLE, "Role", identity.role)
    _coded_attribute(statement, ATTR_PURPOSE_OF_USE, "PurposeOfUse", identity.purpose_of_use)
    if identity.npi:
        _text_attribute(statement, ATTR_NPI, identity.npi)
    if identity.resource_id:
        _text_attribute(statement, ATTR_RESOURCE_ID, identity.resource_id)


def _attribute(statement: etree._Element, name: str) -> etree._Element:
    attribute = etree.SubElement(statement, _saml("Attribute"), Name=name, NameFormat=ATTRNAME_FORMAT_URI)
    return etree.SubElement(attribute, _saml("AttributeValue"))


def _text_attribute(statement: etree._Element, name: str, value: str) -> None:
    _attribute(statement, name).text = value


def _coded_attribute(statement: etree._Element, name: str, element: str, value: CodedValue) -> None:
    """ITI TF-2 3.40.4.1.2.1 / .3: an ``hl7:<element>`` child of xsi:type CE."""
    if not value.code or not value.code_system:
        raise ValueError(f"{element} needs a code and a codeSystem, got {value!r}")
    coded = etree.SubElement(_attribute(statement, name), ns.q(ns.HL7, element))
    coded.set(ns.q(ns.XSI, "type"), "hl7:CE")
    coded.set("code", value.code)
    coded.set("codeSystem", value.code_system.removeprefix("urn:oid:"))
    if value.code_system_name:
        coded.set("codeSystemName", value.code_system_name)
    if value.display_name:
        coded.set("displayName", value.display_name)


# ------------------------------------------------------------------------------------------ signing

def sign_assertion(assertion: etree._Element, creds: SigningCredentials, *,
                   signature_algorithm: Literal["rsa-sha256", "rsa-sha1"] = "rsa-sha256") -> etree._Element:
    """Sign an unsigned assertion in place and return it (SAML Core §5.4).

    Enveloped signature right after ``Issuer`` (schema order), exclusive c14n, one Reference
    ``URI="#" + ID``, KeyInfo/X509Data with the chain. The assertion may sit inside a larger document
    (e.g. re-signing in a SOAP envelope): it is never moved; only the new ``ds:Signature`` is inserted.

    Moving a signed assertion into another document afterwards is safe only if that document does not
    bind the assertion's namespaces (saml2, ds, xsi, hl7) to *other* prefixes: lxml then rewrites the
    moved elements to the existing prefix, which changes the exclusive c14n and breaks the signature.
    """
    assertion_id = _require_signable(assertion)
    prefix = _ds_prefix(assertion)
    if signature_algorithm not in _SIGNING:
        raise ValueError(f"unsupported signature algorithm {signature_algorithm!r}")
    signature = _sign_enveloped(assertion, assertion_id, creds, prefix, signature_algorithm)
    assertion.find(_saml("Issuer")).addnext(signature)
    return assertion


def _require_signable(assertion: etree._Element) -> str:
    if assertion.tag != _saml("Assertion"):
        raise ValueError(f"not a SAML 2.0 assertion: {assertion.tag!r}")
    assertion_id = assertion.get("ID")
    if not assertion_id:
        raise ValueError("the assertion has no ID attribute to reference")
    if assertion.find(_saml("Issuer")) is None:
        raise ValueError("the assertion has no saml2:Issuer (the signature goes right after it)")
    if _direct_signatures(assertion):
        raise ValueError("the assertion is already signed; remove its ds:Signature first")
    return str(assertion_id)


def _ds_prefix(assertion: etree._Element) -> str:
    """The prefix the signature must use so that inserting it keeps it byte-identical.

    The ``ds:Signature`` is built on its own and then inserted into ``assertion``; lxml rebinds an inserted
    element to a namespace declaration already in scope for the same URI, so the signature is made with
    that prefix from the start.
    """
    in_scope = [p for p, uri in assertion.nsmap.items() if uri == ns.DS and p]
    return str(in_scope[0]) if in_scope else "ds"


#: The algorithms we sign with → (SignatureMethod URI, DigestMethod URI, hash). RSA-SHA1 because CONNECT's
#: default and Epic-bound Carequality traffic still use it (signxml refuses SHA-1 outright).
_SIGNING: Final[dict[str, tuple[str, str, Callable[[], hashes.HashAlgorithm]]]] = {
    "rsa-sha256": (SIG_RSA_SHA256, DIGEST_SHA256, hashes.SHA256),
    "rsa-sha1": (SIG_RSA_SHA1, DIGEST_SHA1, hashes.SHA1),
}


def _sign_enveloped(assertion: etree._Element, assertion_id: str, creds: SigningCredentials, prefix: str,
                    algorithm: str) -> etree._Element:
    """The ``ds:Signature`` of an enveloped XML signature over ``assertion`` (not inserted; XML-DSig 1.0 §3.1).

    One Reference ``#ID`` with the enveloped-signature and exclusive c14n transforms: as the signature is
    not in the assertion yet, their output is the exclusive canonical form of the assertion as it stands.
    SignedInfo is canonicalised on its own — exclusive c14n emits only the namespaces a subtree uses, so the
    form is the one a verifier computes once the signature sits in the assertion. Written out here, with
    lxml's c14n and cryptography's PKCS#1 v1.5, instead of signxml's signer (byte-identical output for
    RSA-SHA256, tested): signxml spends ~0.4 ms of Python per assertion re-parsing and searching its own
    template (about a fifth of what an outbound request costs before it is sent) and refuses RSA-SHA1.
    """
    signature_method, digest_method, hash_algorithm = _SIGNING[algorithm]
    digest = hashes.Hash(hash_algorithm())
    digest.update(etree.tostring(assertion, method="c14n", exclusive=True, with_comments=False))
    signature = etree.Element(_ds("Signature"), nsmap={prefix: ns.DS})
    signed_info = etree.SubElement(signature, _ds("SignedInfo"))
    etree.SubElement(signed_info, _ds("CanonicalizationMethod"), Algorithm=C14N_EXCLUSIVE)
    etree.SubElement(signed_info, _ds("SignatureMethod"), Algorithm=signature_method)
    reference = etree.SubElement(signed_info, _ds("Reference"), URI="#" + assertion_id)
    transforms = etree.SubElement(reference, _ds("Transforms"))
    etree.SubElement(transforms, _ds("Transform"), Algorithm=TRANSFORM_ENVELOPED)
    etree.SubElement(transforms, _ds("Transform"), Algorithm=C14N_EXCLUSIVE)
    etree.SubElement(reference, _ds("DigestMethod"), Algorithm=digest_method)
    etree.SubElement(reference, _ds("DigestValue")).text = base64.b64encode(digest.finalize()).decode("ascii")
    value = creds.private_key.sign(etree.tostring(signed_info, method="c14n", exclusive=True, with_comments=False),
                                   padding.PKCS1v15(), hash_algorithm())
    etree.SubElement(signature, _ds("SignatureValue")).text = base64.b64encode(value).decode("ascii")
    signature.append(_key_info(creds.certificate_chain, prefix))
    return signature


def _xmlsec_document(assertion: etree._Element) -> etree._Element:
    """A private copy of ``assertion`` as a document root whose ``ID`` attribute libxml2 knows as an ID.

    xmlsec dereferences ``URI="#ID"`` through libxml2's ID table. python-xmlsec and lxml each link
    their own libxml2, so IDs registered with ``xmlsec.tree.add_ids`` / ``register_id`` live in a
    table the other copy frees — heap corruption, reproducible under ``PYTHONDEVMODE``. Here lxml
    itself registers the ID from an internal DTD subset we write, and the copy never leaves this
    module, so callers' documents never carry xmlsec state. The copy keeps every namespace
    declaration in scope at the original place, so exclusive c14n (including InclusiveNamespaces
    PrefixList) sees the same context as in the original document.
    """
    local = etree.QName(assertion).localname
    name = f"{assertion.prefix}:{local}" if assertion.prefix else local
    subset = f"<!DOCTYPE {name} [<!ATTLIST {name} ID ID #IMPLIED>]>".encode("ascii")
    copied: etree._Element = etree.fromstring(subset + etree.tostring(assertion, with_tail=False),
                                                _parser(collect_ids=True))
    return copied


# ------------------------------------------------------------------------------------------ parsing

def extract_identity(assertion: etree._Element) -> AssertionClaims:
    """Read issuer, subject, conditions and the XSPA attributes — no signature or policy checks.

    Tolerates the variants real peers send (spec digest §7.2, samples README "Quirks"): both
    homeCommunityId attribute names, bare OIDs and a stray ``}``, ``PurposeForUse``, CE attributes on
    the AttributeValue or on a child, ``type=`` without the xsi namespace or no type, plain-text purpose,
    both NPI names, several AttributeStatements. Only the assertion's own AttributeStatements are read
    (not those of assertions nested as Evidence). Raises :class:`SecurityError` only when the
    assertion itself is unusable (not SAML 2.0, no ID/Issuer/IssueInstant, bad Conditions).
    """
    assertion_id = _check_token_shape(assertion)
    issuer = assertion.find(_saml("Issuer"))
    if issuer is None or not _collapse(issuer.text):
        raise _invalid_token("the assertion has no saml2:Issuer; expected the X-Assertion Provider's name")
    name_id = assertion.find(f"{_saml('Subject')}/{_saml('NameID')}")
    values = _attribute_values(assertion)
    errors: list[tuple[str, str]] = []
    not_before, not_on_or_after, audiences = _conditions(assertion)
    return AssertionClaims(
        assertion_id=assertion_id,
        issuer=_collapse(issuer.text),
        issuer_format=issuer.get("Format"),
        issue_instant=_issue_instant(assertion),
        name_id=_collapse(name_id.text) if name_id is not None else "",
        name_id_format=name_id.get("Format") if name_id is not None else None,
        sp_provided_id=name_id.get("SPProvidedID") if name_id is not None else None,
        not_before=not_before,
        not_on_or_after=not_on_or_after,
        audience_restrictions=audiences,
        confirmation_methods=tuple(str(sc.get("Method", "")) for sc in assertion.iterfind(
            f"{_saml('Subject')}/{_saml('SubjectConfirmation')}")),
        subject_id=_first_text(values, "subject_id"),
        organization=_first_text(values, "organization"),
        organization_id=_identifier(values, "organization_id", _normalize_organization_id, errors),
        home_community_id=_identifier(values, "home_community_id", normalize_oid_urn, errors),
        role=_coded(values, "role", ("Role",), errors),
        purpose_of_use=_coded(values, "purpose_of_use", ("PurposeOfUse", "PurposeForUse"), errors,
                              plain_text_system=NHIN_PURPOSE_OID),
        npi=_first_text(values, "npi") or _npi_code(values),
        resource_id=_first_text(values, "resource_id"),
        attribute_errors=tuple(errors),
    )


def _check_token_shape(assertion: etree._Element) -> str:
    if not isinstance(assertion.tag, str) or etree.QName(assertion).localname != "Assertion":
        raise _invalid_token(f"expected a saml2:Assertion, got {assertion.tag!r}")
    if etree.QName(assertion).namespace != ns.SAML2:
        raise SecurityError(WSSE_UNSUPPORTED_SECURITY_TOKEN,
                            f"unsupported assertion namespace {etree.QName(assertion).namespace!r}; "
                            f"expected a SAML 2.0 assertion ({ns.SAML2})")
    if assertion.get("Version") != "2.0":
        raise SecurityError(WSSE_UNSUPPORTED_SECURITY_TOKEN,
                            f"assertion Version {assertion.get('Version')!r}; expected \"2.0\"")
    assertion_id = (assertion.get("ID") or "").strip()
    if not assertion_id:
        raise _invalid_token("the assertion has no ID attribute (SAML Core §2.3.3)")
    return assertion_id


def _issue_instant(assertion: etree._Element) -> datetime:
    instant = _instant(assertion.get("IssueInstant"), "Assertion/@IssueInstant")
    if instant is None:
        raise _invalid_token("the assertion has no IssueInstant (SAML Core §2.3.3)")
    return instant


def _instant(value: str | None, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError:
        raise _invalid_token(f"{where} {value.strip()!r} is not an xs:dateTime "
                             "(expected e.g. 2024-01-31T12:00:00.000Z)") from None


def _conditions(assertion: etree._Element) -> tuple[datetime | None, datetime | None, tuple[tuple[str, ...], ...]]:
    found = assertion.findall(_saml("Conditions"))
    if len(found) > 1:
        raise _invalid_token(f"the assertion has {len(found)} saml2:Conditions elements; at most one is allowed")
    if not found:
        return None, None, ()
    conditions = found[0]
    audiences = tuple(
        tuple(_collapse(a.text) for a in restriction.iterfind(_saml("Audience")))
        for restriction in conditions.iterfind(_saml("AudienceRestriction")))
    return (_instant(conditions.get("NotBefore"), "Conditions/@NotBefore"),
            _instant(conditions.get("NotOnOrAfter"), "Conditions/@NotOnOrAfter"), audiences)


def _attribute_values(assertion: etree._Element) -> dict[str, list[etree._Element]]:
    """AttributeValue elements per logical name, in document order over all AttributeStatements."""
    by_uri: dict[str, list[etree._Element]] = {}
    for attribute in assertion.iterfind(f"{_saml('AttributeStatement')}/{_saml('Attribute')}"):
        by_uri.setdefault(_collapse(attribute.get("Name")), []).extend(attribute.iterfind(_saml("AttributeValue")))
    return {logical: [v for uri in uris for v in by_uri.get(uri, [])] for logical, uris in ATTRIBUTE_NAMES.items()}


def _first_text(values: dict[str, list[etree._Element]], logical: str) -> str | None:
    for value in values[logical]:
        if len(value) == 0 and _collapse(value.text):
            return _collapse(value.text)
    return None


def _identifier(values: dict[str, list[etree._Element]], logical: str, normalise: Callable[[str], str | None],
                errors: list[tuple[str, str]]) -> str | None:
    raw = _first_text(values, logical)
    if raw is None:
        return None
    normalised = normalise(raw)
    if normalised is None:
        expected = "urn:oid:<OID> or an http(s) URL" if logical == "organization_id" else "urn:oid:<OID>"
        errors.append((logical, f"attribute {ATTRIBUTE_NAMES[logical][0]} has value {raw!r}; expected {expected}"))
        return raw
    return normalised


def _coded(values: dict[str, list[etree._Element]], logical: str, elements: tuple[str, ...],
           errors: list[tuple[str, str]], plain_text_system: str | None = None) -> CodedValue | None:
    """First usable CE among the values: attributes on an ``hl7:<element>`` child (ITI TF-2 3.40.4.1.2.1),
    on the AttributeValue itself (Metriport), or plain text when ``plain_text_system`` is given."""
    for value in values[logical]:
        carrier = value if value.get("code") is not None else _ce_child(value, elements)
        if carrier is not None:
            coded = _ce(carrier)
            if coded is not None:
                return coded
        elif plain_text_system and len(value) == 0 and _collapse(value.text):
            return CodedValue(_collapse(value.text), plain_text_system, "nhin-purpose")
    if values[logical]:
        errors.append((logical, f"attribute {ATTRIBUTE_NAMES[logical][0]} carries no coded value; expected an "
                                f"hl7:{elements[0]} element (HL7 CE) with code and codeSystem attributes"))
    return None


def _ce_child(value: etree._Element, elements: tuple[str, ...]) -> etree._Element | None:
    for child in value:
        if not isinstance(child.tag, str):
            continue
        qname = etree.QName(child)
        if qname.localname in elements and qname.namespace in (ns.HL7, None):
            return child
    return None


def _ce(element: etree._Element) -> CodedValue | None:
    code = (element.get("code") or "").strip()
    system = (element.get("codeSystem") or "").strip().removeprefix("urn:oid:")
    if not code or not system:
        return None
    return CodedValue(code, system, element.get("codeSystemName") or None, element.get("displayName") or None)


def _npi_code(values: dict[str, list[etree._Element]]) -> str | None:
    """ITI TF-2 3.40.4.1.2 allows an HL7 CE NPI for backward compatibility."""
    for value in values["npi"]:
        for carrier in (value, *[c for c in value if isinstance(c.tag, str)]):
            if (carrier.get("code") or "").strip():
                return str(carrier.get("code")).strip()
    return None


# ------------------------------------------------------------------------------------- verification

@dataclass(frozen=True)
class _SignedInfo:
    signature_method: str
    digest_method: str


def verify_assertion(assertion: etree._Element, policy: VerificationPolicy, *,
                     now: datetime | None = None) -> VerifiedIdentity:
    """Verify a received assertion and return the identity it asserts (ITI TF-2 3.40.4.1.3).

    Checks, in order, each failure a :class:`SecurityError` with a WS-Security subcode (WSS 1.0 §12):

    1. shape — SAML 2.0 assertion with an ID, signed by exactly one enveloped ``ds:Signature`` child
       (none: InvalidSecurityToken "not signed"; several: FailedCheck); the ID occurs once in the whole
       document (FailedCheck); one Reference, ``URI="#" + ID``, only enveloped-signature and exc-c14n
       transforms (FailedCheck / UnsupportedAlgorithm); exc-c14n SignedInfo, RSA with SHA-2, SHA-1 only
       if ``policy.allow_sha1`` (UnsupportedAlgorithm);
    2. signer — certificate from KeyInfo/X509Data (a KeyValue must match it); a KeyValue alone must be
       the key of a pinned trusted certificate; chain to ``policy.trusted`` with validity periods
       (FailedAuthentication);
    3. signature value and digest, by xmlsec over this assertion (FailedCheck);
    4. Conditions — NotBefore in the future: InvalidSecurityToken (a token not valid yet, most likely
       clock skew, is not an expired message); NotOnOrAfter passed: MessageExpired; missing expiry:
       InvalidSecurityToken unless ``policy.require_expiry`` is off; AudienceRestriction without
       ``policy.audience``: FailedAuthentication;
    5. Subject NameID and SubjectConfirmation present (InvalidSecurityToken);
    6. attributes — required ones present, present ones well formed (InvalidSecurityToken naming the
       attribute); purpose of use permitted (FailedAuthentication naming it and the permitted list).

    Signature-wrapping defences: the signature must be a child of this element and reference this
    element's ID, the ID must be unique in the document, and xmlsec checks the signature on a private
    copy of this very element — so the attributes returned are read from the element that was signed.
    """
    moment = utc_now(now)
    assertion_id = _check_token_shape(assertion)
    signature = _enveloped_signature(assertion)
    _check_id_unique(assertion, assertion_id)
    signed_info = _check_signed_info(signature, assertion_id, policy)
    signer, supplied = _signer_certificate(signature, policy)
    _check_trust(signer, supplied, policy, moment)
    _check_signature_value(assertion, signed_info, signer)
    claims = extract_identity(assertion)
    _check_validity_window(claims, policy, moment)
    _check_audience(claims, policy)
    _check_subject(claims)
    _check_attributes(claims, policy)
    _check_purpose(claims, policy)
    return VerifiedIdentity(
        subject_id=claims.subject_id or "",
        organization=claims.organization or "",
        organization_id=claims.organization_id or "",
        home_community_id=claims.home_community_id or "",
        role=claims.role or NOT_PROVIDED,
        purpose_of_use=claims.purpose_of_use or NOT_PROVIDED,
        npi=claims.npi,
        issuer=claims.issuer,
        name_id=claims.name_id,
        assertion_id=claims.assertion_id,
        not_on_or_after=claims.not_on_or_after,
        signature_algorithm=signed_info.signature_method,
        signer_subject=signer.subject.rfc4514_string(),
        resource_id=claims.resource_id,
        sp_provided_id=claims.sp_provided_id,
        issuer_format=claims.issuer_format,
        confirmation_methods=claims.confirmation_methods,
    )


def _invalid_token(reason: str) -> SecurityError:
    return SecurityError(WSSE_INVALID_SECURITY_TOKEN, reason)


def _fail(subcode: QName, reason: str) -> SecurityError:
    return SecurityError(subcode, reason)


def _direct_signatures(assertion: etree._Element) -> list[etree._Element]:
    return list(assertion.iterfind(_ds("Signature")))


def _enveloped_signature(assertion: etree._Element) -> etree._Element:
    signatures = _direct_signatures(assertion)
    if not signatures:
        raise _invalid_token("assertion is not signed: expected an enveloped ds:Signature as a child of "
                             "saml2:Assertion, right after saml2:Issuer (SAML Core §5.4, ITI TF-2 3.40.4.1.2)")
    if len(signatures) > 1:
        raise _fail(WSSE_FAILED_CHECK, f"the assertion has {len(signatures)} ds:Signature children; "
                                       "expected exactly one enveloped signature")
    return signatures[0]


_ID_ATTRIBUTES = frozenset({"ID", "Id", ns.q(ns.WSU, "Id"), "{http://www.w3.org/XML/1998/namespace}id"})
_ATTRIBUTES_CONTAINING = etree.XPath("//@*[contains(., $v)]")


def _check_id_unique(assertion: etree._Element, assertion_id: str) -> None:
    """The referenced ID must identify this element alone in the whole document (anti-wrapping)."""
    root = assertion.getroottree().getroot()
    # libxml2 finds the attributes that contain the ID at all (a Python walk over every element cost ~7 ms
    # per 400-instance RAD-75 request); which of them are ID attributes equal to it is decided here
    count = sum(1 for value in _ATTRIBUTES_CONTAINING(root, v=assertion_id)
                if value.attrname in _ID_ATTRIBUTES and value.strip() == assertion_id)
    if count != 1:
        raise _fail(WSSE_FAILED_CHECK, f"the assertion ID {assertion_id!r} occurs {count} times in the message; "
                                       "the signed element must be identified unambiguously")


def _algorithm(parent: etree._Element, path: str, what: str) -> str:
    element = parent.find(path)
    if element is None or not element.get("Algorithm"):
        raise _fail(WSSE_FAILED_CHECK, f"the assertion signature has no {what}")
    return str(element.get("Algorithm")).strip()


def _check_signed_info(signature: etree._Element, assertion_id: str, policy: VerificationPolicy) -> _SignedInfo:
    signed_info = signature.find(_ds("SignedInfo"))
    if signed_info is None:
        raise _fail(WSSE_FAILED_CHECK, "the assertion's ds:Signature has no ds:SignedInfo")
    c14n = _algorithm(signed_info, _ds("CanonicalizationMethod"), "ds:CanonicalizationMethod")
    if c14n != C14N_EXCLUSIVE:
        raise _fail(WSSE_UNSUPPORTED_ALGORITHM, f"CanonicalizationMethod {c14n}; expected {C14N_EXCLUSIVE}")
    method = _algorithm(signed_info, _ds("SignatureMethod"), "ds:SignatureMethod")
    _check_algorithm(method, _SIGNATURE_METHODS, "SignatureMethod", policy)
    references = signed_info.findall(_ds("Reference"))
    if len(references) != 1:
        raise _fail(WSSE_FAILED_CHECK, f"the assertion signature has {len(references)} ds:Reference elements; "
                                       f"expected exactly one, URI=\"#{assertion_id}\"")
    reference = references[0]
    if reference.get("URI") != "#" + assertion_id:
        raise _fail(WSSE_FAILED_CHECK, f"the assertion signature references {reference.get('URI')!r}; "
                                       f"expected \"#{assertion_id}\", the assertion's own ID")
    transforms = tuple(str(t.get("Algorithm", "")).strip()
                       for t in reference.iterfind(f"{_ds('Transforms')}/{_ds('Transform')}"))
    unexpected = [t for t in transforms if t not in _REFERENCE_TRANSFORMS]
    if unexpected:
        raise _fail(WSSE_UNSUPPORTED_ALGORITHM, f"unsupported Transform(s) {unexpected}; only "
                                                f"{TRANSFORM_ENVELOPED} and {C14N_EXCLUSIVE} are accepted")
    if TRANSFORM_ENVELOPED not in transforms:
        raise _fail(WSSE_FAILED_CHECK, f"the assertion signature lacks the {TRANSFORM_ENVELOPED} transform")
    digest = _algorithm(reference, _ds("DigestMethod"), "ds:DigestMethod")
    _check_algorithm(digest, _DIGEST_METHODS, "DigestMethod", policy)
    return _SignedInfo(method, digest)


def _check_algorithm(uri: str, known: dict[str, tuple[_Transform, bool]], what: str,
                     policy: VerificationPolicy) -> None:
    if uri not in known:
        raise _fail(WSSE_UNSUPPORTED_ALGORITHM, f"{what} {uri} is not supported; use one of "
                                                f"{', '.join(u for u, (_, sha1) in known.items() if not sha1)}")
    if known[uri][1] and not policy.allow_sha1:
        instead = SIG_RSA_SHA256 if what == "SignatureMethod" else DIGEST_SHA256
        raise _fail(WSSE_UNSUPPORTED_ALGORITHM, f"{what} {uri} (SHA-1) is not accepted by this gateway; "
                                                f"use {instead}")


# ----------------------------------------------------------------------------------- signer & trust

def _signer_certificate(signature: etree._Element,
                        policy: VerificationPolicy) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The signing certificate and the certificates the sender supplied with it (SAML Core §5.4.5)."""
    key_info = signature.find(_ds("KeyInfo"))
    if key_info is None:
        raise _fail(WSSE_FAILED_AUTHENTICATION, "the assertion signature has no ds:KeyInfo; expected "
                                                "ds:X509Data/ds:X509Certificate with the signing certificate")
    supplied = _x509_certificates(key_info)
    key_value = _rsa_key_value(key_info)
    if supplied:
        signer = _pick_signer(supplied, key_value)
        if key_value is not None and _rsa_numbers(signer) != key_value:
            raise _fail(WSSE_FAILED_AUTHENTICATION, "ds:KeyValue and ds:X509Certificate in the assertion signature "
                                                    "carry different keys")
        return signer, supplied
    if key_value is not None:
        for cert in policy.trusted:
            if _rsa_numbers(cert) == key_value:
                return cert, []
        raise _fail(WSSE_FAILED_AUTHENTICATION, "the assertion signature carries only a ds:KeyValue that matches no "
                                                "pinned trusted certificate; send ds:X509Data/ds:X509Certificate "
                                                "or have the signing certificate pinned")
    raise _fail(WSSE_FAILED_AUTHENTICATION, "the assertion signature's ds:KeyInfo has neither ds:X509Certificate "
                                            "nor ds:RSAKeyValue")


def _x509_certificates(key_info: etree._Element) -> list[x509.Certificate]:
    certs = []
    for element in key_info.iterfind(f"{_ds('X509Data')}/{_ds('X509Certificate')}"):
        try:
            certs.append(x509.load_der_x509_certificate(base64.b64decode("".join((element.text or "").split()),
                                                                         validate=True)))
        except (ValueError, binascii.Error):
            raise _invalid_token("ds:X509Certificate in the assertion signature is not a base64 DER "
                                 "certificate") from None
    return certs


def _rsa_key_value(key_info: etree._Element) -> rsa.RSAPublicNumbers | None:
    element = key_info.find(f"{_ds('KeyValue')}/{_ds('RSAKeyValue')}")
    if element is None:
        return None
    try:
        modulus, exponent = (int.from_bytes(base64.b64decode("".join((element.findtext(_ds(n)) or "").split()),
                                                             validate=True), "big")
                             for n in ("Modulus", "Exponent"))
    except (ValueError, binascii.Error):
        raise _invalid_token("ds:RSAKeyValue in the assertion signature is not valid base64") from None
    return rsa.RSAPublicNumbers(exponent, modulus)


def _rsa_numbers(cert: x509.Certificate) -> rsa.RSAPublicNumbers | None:
    key = cert.public_key()
    return key.public_numbers() if isinstance(key, rsa.RSAPublicKey) else None


def _pick_signer(certs: list[x509.Certificate], key_value: rsa.RSAPublicNumbers | None) -> x509.Certificate:
    """The certificate whose key matches KeyValue, else the one that issued no other, else the first."""
    if key_value is not None:
        for cert in certs:
            if _rsa_numbers(cert) == key_value:
                return cert
    leaves = [c for c in certs if not any(o is not c and o.issuer == c.subject for o in certs)]
    return leaves[0] if len(leaves) == 1 else certs[0]


def _describe(cert: x509.Certificate) -> str:
    return f"\"{cert.subject.rfc4514_string()}\""


def _check_period(cert: x509.Certificate, moment: datetime, what: str) -> None:
    if moment < cert.not_valid_before_utc:
        raise _fail(WSSE_FAILED_AUTHENTICATION, f"{what} {_describe(cert)} is not valid before "
                                                f"{format_instant(cert.not_valid_before_utc)}")
    if moment > cert.not_valid_after_utc:
        raise _fail(WSSE_FAILED_AUTHENTICATION, f"{what} {_describe(cert)} expired at "
                                                f"{format_instant(cert.not_valid_after_utc)}")


def _check_issuer(issuer: x509.Certificate, subject: x509.Certificate, intermediates_below: int) -> None:
    """RFC 5280 §4.2.1.9: an issuer must be a CA, and its pathLenConstraint bounds the CA certificates
    between it and the signing certificate."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise _fail(WSSE_FAILED_AUTHENTICATION, f"certificate {_describe(issuer)} issued {_describe(subject)} "
                                                "but is not a CA (BasicConstraints)")
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        raise _fail(WSSE_FAILED_AUTHENTICATION, f"CA certificate {_describe(issuer)} allows "
                                                f"{constraints.path_length} intermediate CA(s) below it, the "
                                                f"chain has {intermediates_below}")


def _check_signing_usage(cert: x509.Certificate) -> None:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not (usage.digital_signature or usage.content_commitment):
        raise _fail(WSSE_FAILED_AUTHENTICATION, f"signing certificate {_describe(cert)} does not allow digital "
                                                "signatures (KeyUsage)")


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def _check_trust(signer: x509.Certificate, supplied: Iterable[x509.Certificate], policy: VerificationPolicy,
                 moment: datetime) -> None:
    """Direct pin, or a path signer → supplied intermediates → trusted CA; every certificate within its
    validity period and every issuer a CA (ITI TF-2 3.40.4.1.3: "chains to ... configured as trusted")."""
    _check_period(signer, moment, "signing certificate")
    _check_signing_usage(signer)
    trusted = {_fingerprint(c) for c in policy.trusted}
    if _fingerprint(signer) in trusted:
        return
    pool = [c for c in supplied if _fingerprint(c) != _fingerprint(signer)] + list(policy.trusted)
    current = signer
    for intermediates_below in range(_MAX_CHAIN_LENGTH):
        issuer = _find_issuer(current, pool)
        if issuer is None:
            raise _fail(WSSE_FAILED_AUTHENTICATION,
                        f"signing certificate {_describe(signer)} does not chain to a trusted CA or pinned "
                        f"certificate (no trusted issuer found for {_describe(current)}, issued by "
                        f"\"{current.issuer.rfc4514_string()}\")")
        _check_issuer(issuer, current, intermediates_below)
        _check_period(issuer, moment, "issuing CA certificate")
        if _fingerprint(issuer) in trusted:
            return
        current = issuer
    raise _fail(WSSE_FAILED_AUTHENTICATION, f"no trusted CA within {_MAX_CHAIN_LENGTH} certificates above "
                                            f"signing certificate {_describe(signer)}")


def _find_issuer(cert: x509.Certificate, pool: Iterable[x509.Certificate]) -> x509.Certificate | None:
    for candidate in pool:
        if candidate.subject != cert.issuer or _fingerprint(candidate) == _fingerprint(cert):
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def _check_signature_value(assertion: etree._Element, signed_info: _SignedInfo,
                           signer: x509.Certificate) -> None:
    """xmlsec verifies SignatureValue and DigestValue on a private copy of this very element."""
    copy = _xmlsec_document(assertion)
    signature = copy.find(_ds("Signature"))
    context = xmlsec.SignatureContext()
    context.key = xmlsec.Key.from_memory(signer.public_bytes(serialization.Encoding.PEM), _XC.KeyDataFormatCertPem)
    for transform in (*_REFERENCE_TRANSFORMS.values(), _DIGEST_METHODS[signed_info.digest_method][0]):
        context.enable_reference_transform(transform)
    for transform in (_XC.TransformExclC14N, _SIGNATURE_METHODS[signed_info.signature_method][0]):
        context.enable_signature_transform(transform)
    try:
        context.verify(signature)
    except xmlsec.Error:
        raise _fail(WSSE_FAILED_CHECK, "the assertion signature does not verify: the assertion was changed after "
                                       f"signing, or not signed with the key of {_describe(signer)}") from None


# ------------------------------------------------------------------------------------ policy checks

def _check_validity_window(claims: AssertionClaims, policy: VerificationPolicy, moment: datetime) -> None:
    """SAML Core §2.5.1.2 with ``policy.clock_skew`` either way."""
    skew = policy.clock_skew
    if claims.not_before is not None and moment + skew < claims.not_before:
        raise _invalid_token(f"the assertion is not yet valid: NotBefore {format_instant(claims.not_before)} is "
                             f"after {format_instant(moment)} (clock skew allowed: {skew.total_seconds():.0f} s)")
    if moment + skew < claims.issue_instant:
        raise _invalid_token(f"the assertion is not yet valid: IssueInstant {format_instant(claims.issue_instant)} "
                             f"is after {format_instant(moment)} (clock skew allowed: {skew.total_seconds():.0f} s)")
    if claims.not_on_or_after is None:
        if policy.require_expiry:
            raise _invalid_token("the assertion has no Conditions/@NotOnOrAfter; a bounded validity window is "
                                 "required (ITI TF-2 3.40.4.1.2)")
        return
    if moment - skew >= claims.not_on_or_after:
        raise _fail(WSSE_MESSAGE_EXPIRED, f"the assertion expired at {format_instant(claims.not_on_or_after)} "
                                          f"(NotOnOrAfter); now {format_instant(moment)}, clock skew allowed "
                                          f"{skew.total_seconds():.0f} s — send a freshly issued assertion")


def _normalize_audience(value: str) -> str:
    return value.strip().rstrip("/")


def _check_audience(claims: AssertionClaims, policy: VerificationPolicy) -> None:
    if policy.audience is None:
        return
    expected = _normalize_audience(policy.audience)
    for restriction in claims.audience_restrictions:
        if expected not in {_normalize_audience(a) for a in restriction}:
            raise _fail(WSSE_FAILED_AUTHENTICATION, f"the assertion is restricted to audience(s) {list(restriction)}; "
                                                    f"this endpoint is {policy.audience!r}")


def _check_subject(claims: AssertionClaims) -> None:
    if not claims.name_id:
        raise _invalid_token("the assertion has no saml2:Subject/saml2:NameID (ITI TF-2 3.40.4.1.2)")
    if not claims.confirmation_methods:
        raise _invalid_token("the assertion Subject has no saml2:SubjectConfirmation; expected bearer or "
                             "holder-of-key (ITI TF-2 3.40.4.1.2)")


def _check_attributes(claims: AssertionClaims, policy: VerificationPolicy) -> None:
    if claims.attribute_errors:  # present but unusable: say what is wrong rather than "missing"
        raise _invalid_token(claims.attribute_errors[0][1])
    for logical in sorted(policy.required_attributes):
        if getattr(claims, logical) in (None, ""):
            names = " or ".join(ATTRIBUTE_NAMES[logical])
            raise _invalid_token(f"required SAML attribute {names} is missing from the AttributeStatement")


def _check_purpose(claims: AssertionClaims, policy: VerificationPolicy) -> None:
    purpose = claims.purpose_of_use
    if purpose is None:
        return
    permitted = {p.strip().upper() for p in policy.permitted_purposes}
    if purpose.code.strip().upper() not in permitted:
        raise _fail(WSSE_FAILED_AUTHENTICATION, f"purpose of use {purpose.code!r} is not permitted here; permitted: "
                                                f"{', '.join(sorted(permitted)) or '(none)'}")


