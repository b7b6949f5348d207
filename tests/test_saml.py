"""XUA SAML assertions: build/sign/verify round trips, every rejection with its WS-Security subcode,
signature-wrapping defences, xmlsec1 as an independent verifier, and the real peers' assertions."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from gateway.errors import (
    WSSE_FAILED_AUTHENTICATION,
    WSSE_FAILED_CHECK,
    WSSE_INVALID_SECURITY_TOKEN,
    WSSE_MESSAGE_EXPIRED,
    WSSE_UNSUPPORTED_ALGORITHM,
    QName,
    SecurityError,
)
from gateway.security.certs import make_ca, make_leaf, write_pem
from gateway.security.saml import (
    ATTR_HOME_COMMUNITY_ID,
    ATTR_ORGANIZATION_ID,
    ATTR_PURPOSE_OF_USE,
    ATTR_ROLE,
    ATTRIBUTE_NAMES,
    AUTHN_CONTEXT_X509,
    CM_BEARER,
    CM_HOLDER_OF_KEY,
    DEFAULT_REQUIRED_ATTRIBUTES,
    NAMEID_X509_SUBJECT,
    NHIN_PURPOSE_OID,
    NOT_PROVIDED,
    SIG_RSA_SHA1,
    SIG_RSA_SHA256,
    SNOMED_CT_OID,
    CodedValue,
    SigningCredentials,
    VerificationPolicy,
    build_assertion,
    extract_identity,
    format_instant,
    load_signing_credentials,
    load_trusted,
    normalize_oid_urn,
    parse_instant,
    sign_assertion,
    verify_assertion,
)
from gateway.soap import ns

from ._saml_fixtures import (
    CONNECT_39,
    CONNECT_AUTH_FRAMEWORK,
    CONNECT_COMPLETE,
    DS_SIGNATURE,
    EPIC_38,
    EPIC_39,
    EPIC_55,
    IDENTITY,
    IPF_XUA,
    IPF_XUA_CH,
    METRIPORT_VALID,
    SamlPki,
    first_assertion,
    make_intermediate,
    make_pki,
    read_xml,
    remove_attribute,
    reparse,
    resign,
    set_attribute_value,
)

ISSUER = "xig@2.999.1"
AUDIENCE = "https://gateway.example.org/xca/query"


def S(local: str) -> str:
    return ns.q(ns.SAML2, local)


def D(local: str) -> str:
    return ns.q(ns.DS, local)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SamlPki:
    return make_pki(tmp_path_factory.mktemp("saml-pki"))


def build(pki: SamlPki, **kwargs: object) -> etree._Element:
    options: dict[str, object] = {"issuer": ISSUER, "audience": AUDIENCE}
    options.update(kwargs)
    identity = options.pop("identity", IDENTITY)
    creds = options.pop("creds", pki.creds)
    return build_assertion(identity, creds, **options)  # type: ignore[arg-type]


def rejected(assertion: etree._Element, policy: VerificationPolicy, subcode: QName,
             now: dt.datetime | None = None) -> SecurityError:
    with pytest.raises(SecurityError) as info:
        verify_assertion(assertion, policy, now=now)
    assert info.value.subcode == subcode, info.value.reason
    assert info.value.code == "Sender"
    return info.value


# --------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("confirmation", ["holder-of-key", "bearer"])
def test_round_trip_sha256(pki: SamlPki, confirmation: str) -> None:
    assertion = build(pki, confirmation=confirmation)
    identity = verify_assertion(reparse(assertion), pki.policy(audience=AUDIENCE))
    assert identity.subject_id == "Dr. Alice Example"
    assert identity.organization == "XIG Community A"
    assert identity.organization_id == "urn:oid:2.999.1"
    assert identity.home_community_id == "urn:oid:2.999.1"
    assert identity.role == IDENTITY.role
    assert identity.purpose_of_use == IDENTITY.purpose_of_use
    assert identity.npi == "1234567890"
    assert identity.resource_id == "PAT-1^^^&2.999.1.1&ISO"
    assert identity.issuer == ISSUER
    assert identity.name_id == pki.creds.certificate.subject.rfc4514_string()
    assert identity.assertion_id == assertion.get("ID")
    assert identity.signature_algorithm == SIG_RSA_SHA256
    assert identity.signer_subject == pki.creds.certificate.subject.rfc4514_string()
    assert identity.confirmation_methods == ((CM_HOLDER_OF_KEY,) if confirmation == "holder-of-key" else (CM_BEARER,))
    assert identity.audit_user_name == f"<{identity.name_id}@{ISSUER}>"


def test_sha1_rejected_unless_policy_allows_it(pki: SamlPki) -> None:
    assertion = build(pki, signature_algorithm="rsa-sha1")
    error = rejected(assertion, pki.policy(), WSSE_UNSUPPORTED_ALGORITHM)
    assert SIG_RSA_SHA1 in error.reason and SIG_RSA_SHA256 in error.reason
    identity = verify_assertion(reparse(assertion), pki.policy(allow_sha1=True))
    assert identity.signature_algorithm == SIG_RSA_SHA1
    assert identity.subject_id == IDENTITY.subject_id


def test_sha1_digest_alone_is_also_refused(pki: SamlPki) -> None:
    assertion = build(pki)
    assertion.find(f".//{D('DigestMethod')}").set("Algorithm", "http://www.w3.org/2000/09/xmldsig#sha1")
    error = rejected(assertion, pki.policy(), WSSE_UNSUPPORTED_ALGORITHM)
    assert "DigestMethod" in error.reason
    # with SHA-1 allowed the (now inconsistent) digest is checked, and fails
    rejected(assertion, pki.policy(allow_sha1=True), WSSE_FAILED_CHECK)


def test_built_assertion_has_the_profiled_shape(pki: SamlPki) -> None:
    now = dt.datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    assertion = build(pki, now=now, lifetime=dt.timedelta(minutes=7))
    assert re.fullmatch(r"_[0-9a-f]{32}", assertion.get("ID"))
    assert assertion.get("Version") == "2.0"
    assert assertion.get("IssueInstant") == "2030-01-02T03:04:05.678Z"
    children = [etree.QName(c).localname for c in assertion]
    assert children == ["Issuer", "Signature", "Subject", "Conditions", "AuthnStatement", "AttributeStatement"]
    signature = assertion.find(DS_SIGNATURE)
    assert signature.find(f"{D('SignedInfo')}/{D('Reference')}").get("URI") == "#" + assertion.get("ID")
    assert [t.get("Algorithm") for t in signature.iter(D("Transform"))] == [
        "http://www.w3.org/2000/09/xmldsig#enveloped-signature", "http://www.w3.org/2001/10/xml-exc-c14n#"]
    assert signature.find(f"{D('SignedInfo')}/{D('CanonicalizationMethod')}").get("Algorithm") == ns.EXC_C14N
    der = base64.b64decode(signature.findtext(f"{D('KeyInfo')}/{D('X509Data')}/{D('X509Certificate')}"))
    assert x509.load_der_x509_certificate(der) == pki.creds.certificate
    name_id = assertion.find(f"{S('Subject')}/{S('NameID')}")
    assert name_id.get("Format") == NAMEID_X509_SUBJECT
    confirmation_cert = assertion.findtext(f".//{S('SubjectConfirmationData')}//{D('X509Certificate')}")
    assert base64.b64decode(confirmation_cert) == der
    conditions = assertion.find(S("Conditions"))
    assert conditions.get("NotBefore") == assertion.get("IssueInstant")
    assert conditions.get("NotOnOrAfter") == "2030-01-02T03:11:05.678Z"
    assert conditions.findtext(f"{S('AudienceRestriction')}/{S('Audience')}") == AUDIENCE
    assert assertion.findtext(f".//{S('AuthnContextClassRef')}") == AUTHN_CONTEXT_X509
    attributes = {a.get("Name"): a for a in assertion.iter(S("Attribute"))}
    assert all(a.get("NameFormat") == "urn:oasis:names:tc:SAML:2.0:attrname-format:uri" for a in attributes.values())
    assert attributes[ATTR_HOME_COMMUNITY_ID].findtext(S("AttributeValue")) == "urn:oid:2.999.1"
    role = attributes[ATTR_ROLE].find(f"{S('AttributeValue')}/{{{ns.HL7}}}Role")
    assert role.get(f"{{{ns.XSI}}}type") == "hl7:CE"
    assert (role.get("code"), role.get("codeSystem")) == ("224608005", SNOMED_CT_OID)
    purpose = attributes[ATTR_PURPOSE_OF_USE].find(f"{S('AttributeValue')}/{{{ns.HL7}}}PurposeOfUse")
    assert (purpose.get("code"), purpose.get("codeSystem")) == ("TREATMENT", NHIN_PURPOSE_OID)
    assert set(attributes) == {uris[0] for uris in ATTRIBUTE_NAMES.values()}


def test_build_refuses_identities_it_cannot_emit_strictly(pki: SamlPki) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="home_community_id"):
        build(pki, identity=replace(IDENTITY, home_community_id="Community A"))
    with pytest.raises(ValueError, match="organization_id"):
        build(pki, identity=replace(IDENTITY, organization_id="XIG Org"))
    with pytest.raises(ValueError, match="code"):
        build(pki, identity=replace(IDENTITY, role=CodedValue("", SNOMED_CT_OID)))


def test_sign_assertion_refuses_a_signed_assertion(pki: SamlPki) -> None:
    with pytest.raises(ValueError, match="already signed"):
        sign_assertion(build(pki), pki.creds)


def test_credentials_and_trust_files(pki: SamlPki, tmp_path: Path) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.certs.gateway_cert.read_bytes() + pki.certs.ca_cert.read_bytes())
    creds = load_signing_credentials(chain, pki.certs.gateway_key)
    assert [c.subject for c in creds.certificate_chain] == [pki.creds.certificate.subject, pki.trusted[0].subject]
    # the whole chain travels in X509Data and the receiver still finds the leaf as signer
    identity = verify_assertion(build(pki, creds=creds), pki.policy())
    assert identity.signer_subject == pki.creds.certificate.subject.rfc4514_string()
    with pytest.raises(ValueError, match="does not belong"):
        load_signing_credentials(pki.certs.partner_cert, pki.certs.gateway_key)
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    with pytest.raises(ValueError):
        load_trusted(empty)
    with pytest.raises(ValueError, match="unknown required attribute"):
        pki.policy(required_attributes=frozenset({"favourite_colour"}))


# ------------------------------------------------------------------- our signer against the libraries

def _unsigned(pki: SamlPki, **kw: object) -> etree._Element:
    assertion = build(pki, **kw)  # type: ignore[arg-type]
    assertion.remove(assertion.find(DS_SIGNATURE))
    return assertion


def _signxml_signature(assertion: etree._Element, pki: SamlPki) -> bytes:
    """signxml's enveloped RSA-SHA256 signature of a standalone copy of ``assertion``, serialised."""
    from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureConstructionMethod, SignatureMethod
    from signxml.signer import XMLSigner

    work = etree.fromstring(etree.tostring(assertion))
    placeholder = etree.Element(DS_SIGNATURE, nsmap={"ds": ns.DS})
    placeholder.set("Id", "placeholder")
    work.find(S("Issuer")).addnext(placeholder)
    signer = XMLSigner(method=SignatureConstructionMethod.enveloped, signature_algorithm=SignatureMethod.RSA_SHA256,
                       digest_algorithm=DigestAlgorithm.SHA256,
                       c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0)
    signer.namespaces = {"ds": ns.DS}
    key_info = copy.deepcopy(build(pki).find(f"{DS_SIGNATURE}/{D('KeyInfo')}"))
    signed = signer.sign(work, key=pki.creds.private_key, key_info=key_info)
    return etree.tostring(signed.find(DS_SIGNATURE), method="c14n", exclusive=True)


@pytest.mark.parametrize("nested", [False, True], ids=["standalone", "inside-an-envelope"])
def test_rsa_sha256_signature_is_byte_identical_to_signxml(pki: SamlPki, nested: bool) -> None:
    """Our signer writes XML-DSig out by hand (lxml c14n + cryptography); signxml, the library it replaces,
    must produce exactly the same signature — PKCS#1 v1.5 is deterministic, so any difference in the
    digested or signed bytes would show."""
    assertion = _unsigned(pki)
    expected = _signxml_signature(assertion, pki)
    if nested:  # re-signing in place inside a larger document that declares other namespaces
        envelope = etree.Element(f"{{{ns.SOAP12}}}Envelope", nsmap={"s": ns.SOAP12, "x": "urn:example:other"})
        etree.SubElement(envelope, f"{{{ns.SOAP12}}}Header").append(assertion)
    sign_assertion(assertion, pki.creds)
    assert etree.tostring(assertion.find(DS_SIGNATURE), method="c14n", exclusive=True) == expected
    received = reparse(assertion)
    received = received if received.tag == S("Assertion") else received.find(f".//{S('Assertion')}")
    assert verify_assertion(received, pki.policy()).signature_algorithm == SIG_RSA_SHA256


def test_rsa_sha1_signature_matches_libxmlsec(pki: SamlPki) -> None:
    """RSA-SHA1 (legacy peers): the digest and signature values libxmlsec1 computes from the same template."""
    import xmlsec

    assertion = _unsigned(pki, signature_algorithm="rsa-sha1")
    assertion_id = assertion.get("ID")
    name = "saml2:Assertion"
    doc = etree.fromstring(f"<!DOCTYPE {name} [<!ATTLIST {name} ID ID #IMPLIED>]>".encode() + etree.tostring(assertion),
                           etree.XMLParser(collect_ids=True))
    template = xmlsec.template.create(doc, xmlsec.constants.TransformExclC14N, xmlsec.constants.TransformRsaSha1,
                                      ns="ds")
    doc.find(S("Issuer")).addnext(template)
    reference = xmlsec.template.add_reference(template, xmlsec.constants.TransformSha1, uri="#" + assertion_id)
    xmlsec.template.add_transform(reference, xmlsec.constants.TransformEnveloped)
    xmlsec.template.add_transform(reference, xmlsec.constants.TransformExclC14N)
    for element in template.iter():  # libxmlsec1 indents its template; ours has no whitespace between elements
        element.text = element.text if (element.text or "").strip() else None
        element.tail = None
    context = xmlsec.SignatureContext()
    context.key = xmlsec.Key.from_file(str(pki.certs.gateway_key), xmlsec.constants.KeyDataFormatPem)
    context.sign(template)
    sign_assertion(assertion, pki.creds, signature_algorithm="rsa-sha1")
    ours = assertion.find(DS_SIGNATURE)
    for path in (f".//{D('DigestValue')}", D("SignatureValue")):
        assert base64.b64decode(ours.findtext(path)) == base64.b64decode(template.findtext(path))
    assert ours.find(f"{D('SignedInfo')}/{D('SignatureMethod')}").get("Algorithm") == SIG_RSA_SHA1


# ------------------------------------------------------------------------------- xmlsec1 (independent)

@pytest.mark.parametrize("algorithm", ["rsa-sha256", "rsa-sha1"])
def test_xmlsec1_command_line_verifies_our_signature(pki: SamlPki, tmp_path: Path, algorithm: str) -> None:
    assertion = build(pki, signature_algorithm=algorithm)
    good = tmp_path / "assertion.xml"
    good.write_bytes(etree.tostring(assertion))
    command = ["xmlsec1", "--verify", "--trusted-pem", str(pki.certs.ca_cert),
               "--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion"]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    set_attribute_value(assertion, "urn:oasis:names:tc:xspa:1.0:subject:subject-id", "Mallory")
    bad = tmp_path / "tampered.xml"
    bad.write_bytes(etree.tostring(assertion))
    tampered = subprocess.run([*command, str(bad)], capture_output=True, text=True, check=False)
    assert tampered.returncode != 0
    untrusted = subprocess.run([*command[:2], "--trusted-pem", str(pki.rogue.ca_cert), *command[4:], str(good)],
                               capture_output=True, text=True, check=False)
    assert untrusted.returncode != 0


# ------------------------------------------------------------------------------------------ failures

def test_unsigned_assertion(pki: SamlPki) -> None:
    assertion = build(pki)
    assertion.remove(assertion.find(DS_SIGNATURE))
    error = rejected(assertion, pki.policy(), WSSE_INVALID_SECURITY_TOKEN)
    assert "assertion is not signed" in error.reason


@pytest.mark.parametrize("tamper", [
    lambda a: set_attribute_value(a, "urn:oasis:names:tc:xspa:1.0:subject:subject-id", "Mallory"),
    lambda a: a.find(f".//{{{ns.HL7}}}PurposeOfUse").set("code", "OPERATIONS"),
    lambda a: a.find(f"{S('Subject')}/{S('NameID')}").__setattr__("text", "CN=Someone Else"),
    lambda a: a.find(S("Conditions")).set("NotOnOrAfter", "2099-01-01T00:00:00.000Z"),
], ids=["attribute-value", "purpose-code", "name-id", "not-on-or-after"])
def test_tampered_after_signing(pki: SamlPki, tamper: object) -> None:
    assertion = reparse(build(pki))
    tamper(assertion)  # type: ignore[operator]
    error = rejected(assertion, pki.policy(permitted_purposes=frozenset({"TREATMENT", "OPERATIONS"})),
                     WSSE_FAILED_CHECK)
    assert "changed after signing" in error.reason


def test_expired_assertion(pki: SamlPki) -> None:
    now = dt.datetime.now(dt.UTC)
    assertion = build(pki, now=now - dt.timedelta(minutes=10), lifetime=dt.timedelta(minutes=5))
    error = rejected(assertion, pki.policy(), WSSE_MESSAGE_EXPIRED, now=now)
    assert "expired" in error.reason and "NotOnOrAfter" in error.reason
    # one minute past NotOnOrAfter is inside the default two-minute skew
    recent = build(pki, now=now - dt.timedelta(minutes=6), lifetime=dt.timedelta(minutes=5))
    assert verify_assertion(recent, pki.policy(), now=now).subject_id == IDENTITY.subject_id
    rejected(recent, pki.policy(clock_skew=dt.timedelta(seconds=30)), WSSE_MESSAGE_EXPIRED, now=now)


def test_not_yet_valid_assertion(pki: SamlPki) -> None:
    now = dt.datetime.now(dt.UTC)
    assertion = build(pki, now=now + dt.timedelta(minutes=10))
    error = rejected(assertion, pki.policy(), WSSE_INVALID_SECURITY_TOKEN, now=now)
    assert "not yet valid" in error.reason
    assert verify_assertion(assertion, pki.policy(), now=now + dt.timedelta(minutes=9)).assertion_id


def test_assertion_without_expiry(pki: SamlPki) -> None:
    assertion = resign(build(pki), pki.creds, change=lambda a: a.find(S("Conditions")).attrib.pop("NotOnOrAfter"))
    error = rejected(assertion, pki.policy(), WSSE_INVALID_SECURITY_TOKEN)
    assert "NotOnOrAfter" in error.reason
    assert verify_assertion(assertion, pki.policy(require_expiry=False)).not_on_or_after is None


def test_signed_by_untrusted_key(pki: SamlPki) -> None:
    assertion = build(pki, creds=pki.rogue_creds)
    error = rejected(assertion, pki.policy(), WSSE_FAILED_AUTHENTICATION)
    assert "does not chain to a trusted CA" in error.reason and "Rogue CA" in error.reason


def test_untrusted_ca_certificate_supplied_in_x509data_does_not_help(pki: SamlPki) -> None:
    rogue_chain = SigningCredentials([pki.rogue_creds.certificate, *load_trusted(pki.rogue.ca_cert)],
                                     pki.rogue_creds.private_key)
    rejected(build(pki, creds=rogue_chain), pki.policy(), WSSE_FAILED_AUTHENTICATION)


def test_pinned_signer_certificate(pki: SamlPki) -> None:
    assertion = build(pki)
    pinned = VerificationPolicy(trusted=[pki.creds.certificate])
    assert verify_assertion(assertion, pinned).subject_id == IDENTITY.subject_id
    other_pin = VerificationPolicy(trusted=load_trusted(pki.certs.partner_cert))
    rejected(assertion, other_pin, WSSE_FAILED_AUTHENTICATION)


def test_chain_through_a_supplied_intermediate(pki: SamlPki, tmp_path: Path) -> None:
    root, root_key = make_ca("XIG Root With Intermediates")
    # make_ca sets pathLen 0, so an intermediate under this root breaks the root's constraint
    intermediate, intermediate_key = make_intermediate(root, root_key)
    leaf, leaf_key = make_leaf(intermediate, intermediate_key, "Deep Signer", "XIG Community C")
    creds = SigningCredentials([leaf, intermediate], leaf_key)
    error = rejected(build(pki, creds=creds), VerificationPolicy(trusted=[root]), WSSE_FAILED_AUTHENTICATION)
    assert "allows 0 intermediate" in error.reason
    # trusting the intermediate itself works; omitting it from X509Data does not
    assert verify_assertion(build(pki, creds=creds), VerificationPolicy(trusted=[intermediate])).subject_id
    leaf_only = SigningCredentials([leaf], leaf_key)
    rejected(build(pki, creds=leaf_only), VerificationPolicy(trusted=[root]), WSSE_FAILED_AUTHENTICATION)


def test_expired_signing_certificate(pki: SamlPki, tmp_path: Path) -> None:
    ca_cert = load_trusted(pki.certs.ca_cert)[0]
    ca_key = serialization.load_pem_private_key(pki.certs.ca_key.read_bytes(), password=None)
    old, old_key = make_leaf(ca_cert, ca_key, "Old Signer", "XIG Community A",  # type: ignore[arg-type]
                             days=30, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=60))
    write_pem(tmp_path / "old.crt", old, old_key, tmp_path / "old.key")
    creds = load_signing_credentials(tmp_path / "old.crt", tmp_path / "old.key")
    error = rejected(build(pki, creds=creds), pki.policy(), WSSE_FAILED_AUTHENTICATION)
    assert "expired" in error.reason and "Old Signer" in error.reason


@pytest.mark.parametrize("logical", sorted(DEFAULT_REQUIRED_ATTRIBUTES))
def test_required_attribute_missing(pki: SamlPki, logical: str) -> None:
    names = ATTRIBUTE_NAMES[logical]
    assertion = resign(build(pki), pki.creds, change=lambda a: remove_attribute(a, names[0]))
    error = rejected(assertion, pki.policy(), WSSE_INVALID_SECURITY_TOKEN)
    assert names[0] in error.reason and "missing" in error.reason
    relaxed = pki.policy(required_attributes=DEFAULT_REQUIRED_ATTRIBUTES - {logical})
    identity = verify_assertion(assertion, relaxed)
    assert getattr(identity, logical) == (NOT_PROVIDED if logical in ("role", "purpose_of_use") else "")


@pytest.mark.parametrize(("name", "value", "fragment"), [
    (ATTR_ORGANIZATION_ID, "Metriport Inc.", "expected urn:oid:<OID> or an http(s) URL"),
    (ATTR_ORGANIZATION_ID, "urn:oid:2.999.x", "organization-id"),
    (ATTR_HOME_COMMUNITY_ID, "https://community.example.org", "homeCommunityId"),
])
def test_malformed_identifier_attribute(pki: SamlPki, name: str, value: str, fragment: str) -> None:
    assertion = resign(build(pki), pki.creds, change=lambda a: set_attribute_value(a, name, value))
    error = rejected(assertion, pki.policy(), WSSE_INVALID_SECURITY_TOKEN)
    assert fragment in error.reason and value in error.reason


def test_uncoded_role_is_malformed(pki: SamlPki) -> None:
    def plain_role(assertion: etree._Element) -> None:
        value = assertion.find(f".//{{{ns.HL7}}}Role").getparent()
        value.remove(value[0])
        value.text = "Administrator"

    error = rejected(resign(build(pki), pki.creds, change=plain_role), pki.policy(), WSSE_INVALID_SECURITY_TOKEN)
    assert ATTR_ROLE in error.reason and "coded" in error.reason


def test_organization_id_may_be_a_url(pki: SamlPki) -> None:
    from dataclasses import replace

    assertion = build(pki, identity=replace(IDENTITY, organization_id="https://clinic.example.org"))
    assert verify_assertion(assertion, pki.policy()).organization_id == "https://clinic.example.org"


def test_purpose_not_permitted(pki: SamlPki) -> None:
    from dataclasses import replace

    marketing = CodedValue("MARKETING", NHIN_PURPOSE_OID, "nhin-purpose", "Marketing")
    assertion = build(pki, identity=replace(IDENTITY, purpose_of_use=marketing))
    error = rejected(assertion, pki.policy(), WSSE_FAILED_AUTHENTICATION)
    assert "MARKETING" in error.reason and "TREATMENT" in error.reason
    allowed = pki.policy(permitted_purposes=frozenset({"treatment", "marketing"}))
    assert verify_assertion(assertion, allowed).purpose_of_use == marketing


def test_audience_restriction(pki: SamlPki) -> None:
    assertion = build(pki)
    assert verify_assertion(assertion, pki.policy(audience=AUDIENCE + "/")).assertion_id
    error = rejected(assertion, pki.policy(audience="https://other.example.org/xca"), WSSE_FAILED_AUTHENTICATION)
    assert AUDIENCE in error.reason
    # no AudienceRestriction at all: nothing to contradict
    assert verify_assertion(build(pki, audience=None), pki.policy(audience="https://other.example.org")).issuer


def _key_value(cert: x509.Certificate) -> etree._Element:
    numbers = cert.public_key().public_numbers()  # type: ignore[union-attr]
    key_value = etree.Element(D("KeyValue"))
    rsa_value = etree.SubElement(key_value, D("RSAKeyValue"))
    for local, number in (("Modulus", numbers.n), ("Exponent", numbers.e)):
        etree.SubElement(rsa_value, D(local)).text = base64.b64encode(
            number.to_bytes((number.bit_length() + 7) // 8, "big")).decode()
    return key_value


def test_key_value_only_needs_a_pinned_certificate(pki: SamlPki) -> None:
    assertion = build(pki)
    key_info = assertion.find(f"{DS_SIGNATURE}/{D('KeyInfo')}")
    key_info.remove(key_info.find(D("X509Data")))  # KeyInfo is not covered by the signature
    key_info.append(_key_value(pki.creds.certificate))
    error = rejected(assertion, pki.policy(), WSSE_FAILED_AUTHENTICATION)
    assert "KeyValue" in error.reason
    assert verify_assertion(assertion, VerificationPolicy(trusted=[pki.creds.certificate])).subject_id


def test_key_value_must_match_the_certificate(pki: SamlPki) -> None:
    assertion = build(pki)
    assertion.find(f"{DS_SIGNATURE}/{D('KeyInfo')}").insert(0, _key_value(pki.rogue_creds.certificate))
    error = rejected(assertion, pki.policy(), WSSE_FAILED_AUTHENTICATION)
    assert "different keys" in error.reason


def test_signature_without_key_info(pki: SamlPki) -> None:
    assertion = build(pki)
    signature = assertion.find(DS_SIGNATURE)
    signature.remove(signature.find(D("KeyInfo")))
    rejected(assertion, pki.policy(), WSSE_FAILED_AUTHENTICATION)


# -------------------------------------------------------------------------- signature-wrapping attacks

def _envelope(assertion: etree._Element) -> etree._Element:
    envelope = etree.fromstring(
        f'<soap:Envelope xmlns:soap="{ns.SOAP12}" xmlns:wsse="{ns.WSSE}"><soap:Header><wsse:Security/>'
        f'</soap:Header><soap:Body><Request xmlns="urn:example"/></soap:Body></soap:Envelope>'.encode())
    envelope.find(f".//{{{ns.WSSE}}}Security").append(assertion)
    return envelope


def _evil_copy(signed: etree._Element) -> etree._Element:
    evil = copy.deepcopy(signed)
    set_attribute_value(evil, "urn:oasis:names:tc:xspa:1.0:subject:subject-id", "Mallory")
    evil.find(f".//{{{ns.HL7}}}PurposeOfUse").set("code", "MARKETING")
    return evil


def test_wrapping_signed_assertion_moved_into_a_wrapper(pki: SamlPki) -> None:
    """XSW: the evil copy (same ID, original signature) sits where the assertion was; the signed
    original hides in an extension element elsewhere — xmlsec would find either by ID."""
    signed = build(pki)
    envelope = _envelope(_evil_copy(signed))
    wrapper = etree.SubElement(envelope.find(f"{{{ns.SOAP12}}}Header"), "{urn:example}Extension")
    wrapper.append(signed)
    evil = reparse(envelope).find(f".//{{{ns.WSSE}}}Security/{S('Assertion')}")
    error = rejected(evil, pki.policy(permitted_purposes=frozenset({"MARKETING"})), WSSE_FAILED_CHECK)
    assert "occurs 2 times" in error.reason


def test_wrapping_evil_copy_without_signature(pki: SamlPki) -> None:
    signed = build(pki)
    evil = _evil_copy(signed)
    evil.remove(evil.find(DS_SIGNATURE))
    envelope = _envelope(evil)
    envelope.find(f"{{{ns.SOAP12}}}Body").append(signed)
    rejected(reparse(envelope).find(f".//{S('Assertion')}"), pki.policy(), WSSE_INVALID_SECURITY_TOKEN)


@pytest.mark.parametrize("attribute", ["ID", "Id", f"{{{ns.WSU}}}Id", "{http://www.w3.org/XML/1998/namespace}id"])
@pytest.mark.parametrize("padding", ["", " \n"])
def test_wrapping_duplicate_id_elsewhere(pki: SamlPki, attribute: str, padding: str) -> None:
    signed = build(pki)
    envelope = _envelope(signed)
    decoy = etree.SubElement(envelope.find(f"{{{ns.SOAP12}}}Body")[0], "{urn:example}Decoy")
    decoy.set(attribute, padding + signed.get("ID") + padding)
    error = rejected(reparse(envelope).find(f".//{S('Assertion')}"), pki.policy(), WSSE_FAILED_CHECK)
    assert "occurs 2 times" in error.reason


def test_the_id_inside_other_values_or_other_attributes_is_no_duplicate(pki: SamlPki) -> None:
    """Only ID attributes equal to the assertion's ID count — not a longer ID containing it, not another attribute."""
    signed = build(pki)
    envelope = _envelope(signed)
    body = envelope.find(f"{{{ns.SOAP12}}}Body")[0]
    etree.SubElement(body, "{urn:example}Longer").set("ID", signed.get("ID") + "-2")
    etree.SubElement(body, "{urn:example}Other").set("ref", signed.get("ID"))
    identity = verify_assertion(reparse(envelope).find(f".//{S('Assertion')}"), pki.policy())
    assert identity.assertion_id == signed.get("ID")


def test_wrapping_reference_to_another_element(pki: SamlPki) -> None:
    signed = build(pki)
    signed.find(f".//{D('Reference')}").set("URI", "#somewhere-else")
    error = rejected(signed, pki.policy(), WSSE_FAILED_CHECK)
    assert "own ID" in error.reason


def test_wrapping_second_signature_or_reference(pki: SamlPki) -> None:
    signed = build(pki)
    twice = copy.deepcopy(signed)
    twice.append(copy.deepcopy(twice.find(DS_SIGNATURE)))
    rejected(twice, pki.policy(), WSSE_FAILED_CHECK)
    two_refs = copy.deepcopy(signed)
    reference = two_refs.find(f".//{D('Reference')}")
    reference.addnext(copy.deepcopy(reference))
    rejected(two_refs, pki.policy(), WSSE_FAILED_CHECK)


def test_only_enveloped_and_exclusive_c14n_transforms(pki: SamlPki) -> None:
    signed = build(pki)
    transforms = signed.find(f".//{D('Transforms')}")
    xpath = etree.SubElement(transforms, D("Transform"), Algorithm="http://www.w3.org/TR/1999/REC-xpath-19991116")
    etree.SubElement(xpath, D("XPath")).text = "not(ancestor-or-self::saml2:AttributeStatement)"
    rejected(signed, pki.policy(), WSSE_UNSUPPORTED_ALGORITHM)
    inclusive = build(pki)
    inclusive.find(f".//{D('CanonicalizationMethod')}").set("Algorithm",
                                                             "http://www.w3.org/TR/2001/REC-xml-c14n-20010315")
    rejected(inclusive, pki.policy(), WSSE_UNSUPPORTED_ALGORITHM)


def test_attributes_come_from_the_signed_element_only(pki: SamlPki) -> None:
    """An AttributeStatement smuggled into the signature's KeyInfo (not signed, not the assertion's own
    statement) is ignored; one added directly to the assertion breaks the signature."""
    signed = build(pki)
    key_info = signed.find(f"{DS_SIGNATURE}/{D('KeyInfo')}")
    smuggled = copy.deepcopy(signed.find(S("AttributeStatement")))
    set_attribute_value(smuggled, "urn:oasis:names:tc:xspa:1.0:subject:subject-id", "Mallory")
    key_info.append(smuggled)
    assert verify_assertion(signed, pki.policy()).subject_id == IDENTITY.subject_id
    signed.append(copy.deepcopy(smuggled))
    rejected(signed, pki.policy(), WSSE_FAILED_CHECK)


# ------------------------------------------------------------------------------------ real samples

SAMPLE_EXPECTATIONS = [
    pytest.param(EPIC_55, {
        "subject_id": "Administrator", "organization": "Metriport",
        "organization_id": "urn:oid:2.16.840.1.113883.3.9621",
        "home_community_id": "urn:oid:2.16.840.1.113883.3.9621",  # sent with a stray "}"
        "role": ("224608005", SNOMED_CT_OID, "Administrator"), "purpose": ("TREATMENT", NHIN_PURPOSE_OID),
        "issuer": "support@metriport.com", "npi": None,
        "name_id": "CN=ihe.staging.metriport.com,OU=CAREQUALITY-TEST,O=Metriport Inc.,ST=California,C=US",
    }, id="epic-iti55"),
    pytest.param(EPIC_38, {
        "subject_id": "Administrator", "organization": "Metriport",
        "organization_id": "urn:oid:2.16.840.1.113883.3.9621",
        "home_community_id": "urn:oid:2.16.840.1.113883.3.9621",
        "role": ("224608005", SNOMED_CT_OID, "Administrator"), "purpose": ("TREATMENT", NHIN_PURPOSE_OID),
        "issuer": "support@metriport.com",
    }, id="epic-iti38"),
    pytest.param(EPIC_39, {
        "subject_id": "Administrator", "home_community_id": "urn:oid:2.16.840.1.113883.3.9621",
        "purpose": ("TREATMENT", NHIN_PURPOSE_OID), "issuer": "support@metriport.com",
    }, id="epic-iti39"),
    pytest.param(CONNECT_39, {
        "subject_id": "Karl S Skagerberg", "organization": "InternalTest1", "organization_id": "urn:oid:1.1",
        "home_community_id": "urn:oid:1.1", "role": ("307969004", SNOMED_CT_OID, "Public Health"),
        "purpose": ("PUBLICHEALTH", NHIN_PURPOSE_OID), "resource_id": "500000000^^^&1.1&ISO",
        "issuer": "CN=SAML User,OU=SU,O=SAML User,L=Los Angeles,ST=CA,C=US", "name_id": "UID=kskagerb",
    }, id="connect-saml-header-diff-order"),
    pytest.param(CONNECT_COMPLETE, {
        "subject_id": "Interop IT Testcase", "organization": "2.16.840.1.113883.3.424",
        "organization_id": "urn:oid:2.16.840.1.113883.3.424", "home_community_id": "urn:oid:2.16.840.1.113883.3.424",
        "role": ("46255001", SNOMED_CT_OID, "Pharmacist"),
        "purpose": ("OPERATIONS", NHIN_PURPOSE_OID),  # legacy element name PurposeForUse
        "resource_id": "RI1.101.00043^^^&2.16.840.1.113883.3.424&ISO",
        "assertion_id": "0a7e2d9f-7990-4bee-b6ca-e5bd31aa808c",  # starts with a digit
    }, id="connect-complete-saml"),
    pytest.param(CONNECT_AUTH_FRAMEWORK, {
        "subject_id": "Karl S Skagerberg", "organization": "InternalTest2", "organization_id": "urn:oid:2.2",
        "home_community_id": "urn:oid:1.1", "role": ("307969004", SNOMED_CT_OID, "Public Health"),  # type= no ns
        "purpose": ("PUBLICHEALTHKIERAN", NHIN_PURPOSE_OID), "npi": "1234567890",  # xspa:2.0:subject:npi
    }, id="connect-auth-framework"),
    pytest.param(METRIPORT_VALID, {
        "subject_id": "Administrative AND/OR managerial worker", "organization": "Metriport",
        "organization_id": "urn:oid:1.16.840.1.113883.3.9621.5.219",
        "home_community_id": "urn:oid:1.16.840.1.113883.3.9621.5.219",
        "role": ("106331006", SNOMED_CT_OID, "Administrative AND/OR managerial worker"),
        "purpose": ("TREATMENT", NHIN_PURPOSE_OID), "issuer": "support@metriport.com",
        "assertion_id": "TS_3e57269d-075d-4d3f-9f5d-c97ad6afc009",
    }, id="metriport-valid-saml"),
    pytest.param(IPF_XUA_CH, {
        "subject_id": "Rosa Sestak", "organization": "Org 1 AG",
        "organization_id": "urn:oid:1.3.6.1.4.1.21367.2017.2.6.19.100.2",
        "home_community_id": "urn:oid:1.3.6.1.4.1.21367.2017.2.6.19",  # urn:ihe:iti:xca:2010:homeCommunityId
        "role": ("HCP", "2.16.756.5.30.1.127.3.10.6", "Healthcare professional"),
        "purpose": ("NORM", "2.16.756.5.30.1.127.3.10.5"), "name_id": "9801000050702",
        "resource_id": "761337610411353650^^^&2.16.756.5.30.1.127.3.10.3&ISO",
    }, id="ipf-swiss-xua"),
    pytest.param(IPF_XUA, {
        # the subject-id inside SubjectConfirmationData ("Hannelore Fleissig") is not an assertion attribute
        "subject_id": "Dr. Klaus-Peter Kohlrabi", "organization": None, "home_community_id": None,
        "role": ("ELE", "1.2.3.4.5.6.777.1", "Electrician"), "purpose": ("12", "1.0.14265.12"),
        "audit_user_name": "alias2<lipse@demo.com>",
    }, id="ipf-xua"),
]


@pytest.mark.parametrize(("path", "expected"), SAMPLE_EXPECTATIONS)
def test_extract_identity_from_real_samples(path: Path, expected: dict[str, object]) -> None:
    claims = extract_identity(first_assertion(read_xml(path)))
    for key, value in expected.items():
        if key == "role":
            assert claims.role is not None
            assert (claims.role.code, claims.role.code_system, claims.role.display_name) == value
        elif key == "purpose":
            assert claims.purpose_of_use is not None
            assert (claims.purpose_of_use.code, claims.purpose_of_use.code_system) == value
        else:
            assert getattr(claims, key) == value, key
    assert claims.attribute_errors == ()


def test_real_samples_do_not_verify_as_they_are(pki: SamlPki) -> None:
    """Expired, pretty-printed after signing and signed by keys we do not trust: every one is refused."""
    for path in (EPIC_55, CONNECT_39, METRIPORT_VALID, CONNECT_AUTH_FRAMEWORK):
        with pytest.raises(SecurityError) as info:
            verify_assertion(first_assertion(read_xml(path)), pki.policy(allow_sha1=True))
        assert info.value.subcode == WSSE_FAILED_AUTHENTICATION, (path.name, info.value.reason)


@pytest.mark.parametrize(("path", "algorithm", "purposes"), [
    (EPIC_55, "rsa-sha1", {"TREATMENT"}),
    (CONNECT_39, "rsa-sha256", {"PUBLICHEALTH"}),
    (CONNECT_COMPLETE, "rsa-sha256", {"OPERATIONS"}),  # ID starts with a digit, no Conditions in the sample
    (CONNECT_COMPLETE, "rsa-sha1", {"OPERATIONS"}),
    (IPF_XUA_CH, "rsa-sha1", {"NORM"}),
])
def test_resigned_real_assertions_verify(pki: SamlPki, path: Path, algorithm: str, purposes: set[str]) -> None:
    root = read_xml(path)
    now = dt.datetime.now(dt.UTC)
    resign(first_assertion(root), pki.creds, algorithm=algorithm, now=now)
    policy = pki.policy(allow_sha1=True, permitted_purposes=frozenset(purposes))
    identity = verify_assertion(first_assertion(reparse(root)), policy, now=now + dt.timedelta(seconds=30))
    claims = extract_identity(first_assertion(read_xml(path)))
    assert (identity.subject_id, identity.home_community_id) == (claims.subject_id, claims.home_community_id)
    assert identity.signature_algorithm == (SIG_RSA_SHA1 if algorithm == "rsa-sha1" else SIG_RSA_SHA256)


def test_instants_and_oids() -> None:
    assert parse_instant("2023-12-06T22:46:38.7321234Z") == dt.datetime(2023, 12, 6, 22, 46, 38, 732123, dt.UTC)
    assert parse_instant("2012-12-12T01:36:18Z") == dt.datetime(2012, 12, 12, 1, 36, 18, tzinfo=dt.UTC)
    assert parse_instant("2012-12-12T03:36:18+02:00") == dt.datetime(2012, 12, 12, 1, 36, 18, tzinfo=dt.UTC)
    with pytest.raises(ValueError):
        parse_instant("12/12/2012")
    # UTC, milliseconds, and the four-digit year xs:dateTime needs (strftime's %Y gives "999" on glibc)
    assert format_instant(dt.datetime(2012, 12, 12, 3, 36, 18, 999999, dt.timezone(dt.timedelta(hours=2)))) == (
        "2012-12-12T01:36:18.999Z")
    assert format_instant(dt.datetime(999, 1, 2, 3, 4, 5, tzinfo=dt.UTC)) == "0999-01-02T03:04:05.000Z"
    assert normalize_oid_urn("urn:oid:2.16.840.1.113883.3.9621}") == "urn:oid:2.16.840.1.113883.3.9621"
    assert normalize_oid_urn(" 1.1\n") == "urn:oid:1.1"
    assert normalize_oid_urn("urn:oid:2.16.08") is None
    assert normalize_oid_urn("Metriport") is None
