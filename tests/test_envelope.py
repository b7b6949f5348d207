"""SOAP 1.2 envelope and WS-Addressing codec, on real partner messages and hostile variants."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from gateway.errors import WSA_MISSING_HEADER, XIG_MALFORMED, SoapFault
from gateway.soap import ns, xml
from gateway.soap.envelope import WSA_ONLY_ANONYMOUS, build_envelope, parse_envelope
from gateway.soap.fault import build_fault_envelope, parse_fault

REAL_REQUESTS = [
    "iti55-xcpd/metriport-carequality/epic-iti-55-request.xml",
    "iti38-xca-query/metriport-carequality/epic-iti-38-request.xml",
    "iti39-xca-retrieve/metriport-carequality/epic-iti-39-request.xml",
    "iti39-xca-retrieve/connect/saml_header_diff_order.xml",
]


def env(headers: str, body: str = "<x:Q xmlns:x='urn:x'/>") -> bytes:
    return (f"<s:Envelope xmlns:s='{ns.SOAP12}' xmlns:a='{ns.WSA}'><s:Header>{headers}</s:Header>"
            f"<s:Body>{body}</s:Body></s:Envelope>").encode()


GOOD = "<a:Action s:mustUnderstand='1'>urn:act</a:Action><a:MessageID>urn:uuid:1</a:MessageID>"


@pytest.mark.parametrize("name", REAL_REQUESTS)
def test_real_requests_parse(samples: Path, name: str) -> None:
    e = parse_envelope(xml.parse((samples / "messages" / name).read_bytes()))
    assert e.addressing.action.startswith(("urn:ihe:", "urn:hl7-org:v3:"))
    assert e.addressing.action == e.addressing.action.strip()  # pretty-printed values are trimmed
    assert e.addressing.message_id
    assert e.security is not None
    assert e.body.tag.startswith("{")


def test_values_are_trimmed_and_mustunderstand_true_accepted() -> None:
    e = parse_envelope(xml.parse(env(
        "<a:Action s:mustUnderstand='true'>\n   urn:act \n</a:Action><a:MessageID>\n 1234 </a:MessageID>"
        "<a:ReplyTo><a:Address> http://www.w3.org/2005/08/addressing/anonymous </a:Address></a:ReplyTo>")))
    assert e.addressing.action == "urn:act"
    assert e.addressing.message_id == "1234"  # no urn:uuid: prefix: accepted verbatim


def test_soap11_is_version_mismatch() -> None:
    doc = f"<e:Envelope xmlns:e='{ns.SOAP11}'><e:Body><x/></e:Body></e:Envelope>".encode()
    with pytest.raises(SoapFault) as exc:
        parse_envelope(xml.parse(doc))
    assert exc.value.code == "VersionMismatch"


def test_unknown_mandatory_header_is_must_understand_fault() -> None:
    with pytest.raises(SoapFault) as exc:
        parse_envelope(xml.parse(env(GOOD + "<z:Secret xmlns:z='urn:zz' s:mustUnderstand='1'/>")))
    assert exc.value.code == "MustUnderstand"
    fault_env = build_fault_envelope(exc.value, relates_to="urn:uuid:1")
    nu = fault_env.find(f"{{{ns.SOAP12}}}Header/{{{ns.SOAP12}}}NotUnderstood")
    assert nu is not None and nu.get("qname") == "nu:Secret" and nu.nsmap["nu"] == "urn:zz"


def test_unknown_optional_header_and_unnamespaced_mustunderstand_ignored() -> None:
    e = parse_envelope(xml.parse(env(GOOD + "<z:Info xmlns:z='urn:zz' mustUnderstand='1'/>")))
    assert e.addressing.action == "urn:act"


@pytest.mark.parametrize("headers,missing", [
    ("<a:MessageID>urn:uuid:1</a:MessageID>", "Action"),
    ("<a:Action>urn:act</a:Action>", "MessageID"),
])
def test_missing_addressing_headers(headers: str, missing: str) -> None:
    with pytest.raises(SoapFault) as exc:
        parse_envelope(xml.parse(env(headers)))
    assert exc.value.subcode == WSA_MISSING_HEADER
    assert missing in exc.value.reason


def test_non_anonymous_reply_to_refused() -> None:
    with pytest.raises(SoapFault) as exc:
        parse_envelope(xml.parse(env(GOOD + "<a:ReplyTo><a:Address>https://evil/cb</a:Address></a:ReplyTo>")))
    assert exc.value.subcode == WSA_ONLY_ANONYMOUS


@pytest.mark.parametrize("body", ["", "<a/><b/>"])
def test_body_must_hold_one_element(body: str) -> None:
    with pytest.raises(SoapFault) as exc:
        parse_envelope(xml.parse(env(GOOD, body)))
    assert exc.value.subcode == XIG_MALFORMED


def test_build_request_and_response_strict_form() -> None:
    body = etree.Element("{urn:x}Q")
    req = build_envelope(body, action="urn:act", to="https://p/x", reply_to_anonymous=True)
    parsed = parse_envelope(xml.parse(xml.tostring(req)))
    assert parsed.addressing.message_id.startswith("urn:uuid:")
    assert parsed.addressing.to == "https://p/x"
    assert parsed.addressing.reply_to == ns.WSA_ANONYMOUS
    h = req.find(f"{{{ns.SOAP12}}}Header")
    assert h.find(f"{{{ns.WSA}}}Action").get(f"{{{ns.SOAP12}}}mustUnderstand") == "true"
    assert h.find(f"{{{ns.WSA}}}ReplyTo").get(f"{{{ns.SOAP12}}}mustUnderstand") is None
    resp = build_envelope(etree.Element("{urn:x}R"), action="urn:actResponse", relates_to="abc")
    assert resp.find(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}RelatesTo").text == "abc"


def test_fault_round_trip() -> None:
    from gateway.errors import WSSE_FAILED_AUTHENTICATION

    f = SoapFault("Sender", "signer not trusted", WSSE_FAILED_AUTHENTICATION, detail="CN=x")
    e = build_fault_envelope(f, relates_to="urn:uuid:9")
    back = parse_fault(e.find(f"{{{ns.SOAP12}}}Body")[0])
    assert back is not None
    assert (back.code, back.reason, back.detail) == ("Sender", "signer not trusted", "CN=x")
    assert back.subcode is not None and back.subcode.clark == WSSE_FAILED_AUTHENTICATION.clark
    assert e.find(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}Action").text == ns.WSA_FAULT_ACTION


def test_real_fault_sample_parses(samples: Path) -> None:
    root = xml.parse((samples / "messages/iti39-xca-retrieve/metriport-carequality/dr_soap_error.xml").read_bytes())
    body = root.find(f"{{{ns.SOAP12}}}Body")
    fault = parse_fault(body[0])
    assert fault is not None and fault.code in ("Sender", "Receiver") and fault.reason
