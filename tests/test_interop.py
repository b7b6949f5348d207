"""Interoperability: a stock SOAP toolkit and real partner messages against a running XIG.

1. zeep builds its client from nothing but the WSDL XIG serves (``GET /ihe/xca/query?wsdl``, whose
   schemas it fetches from ``/ihe/schemas/``), talks SOAP 1.2 over mutual TLS with zeep's own
   WS-Addressing plugin and our signed assertion as a header, and parses XIG's ITI-38 answer.
2. Real requests captured from NIST, Epic-bound Metriport, CONNECT and IPF traffic are replayed as sent
   (envelope and body bytes, namespace quirks, pretty-printed header values, ``mustUnderstand``); only the
   expired ``wsse:Security`` content is swapped for a freshly signed assertion and Timestamp, and the
   body-only samples get a fresh envelope. Each must get a schema-valid, specific answer: never a fault.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import zeep
import zeep.exceptions
from lxml import etree
from zeep.plugins import HistoryPlugin
from zeep.transports import Transport
from zeep.wsa import WsAddressingPlugin
from zeep.wsdl.bindings.soap import Soap12Binding

from gateway.config import Config, load_config
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.ihe import ebrim, iti38, iti39, iti55
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom, ns, xml
from gateway.soap.envelope import build_envelope, new_message_id
from gateway.soap.schema import default_schemas
from gateway.web.client import SoapClient, SoapReply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCPD, Endpoint
from gateway.web.server import BackgroundServer
from tests.conftest import IHE_TEST_IDS, write_config

HCID = IHE_TEST_IDS["home_community_id"]
AA = IHE_TEST_IDS["assigning_authority"]
REPO = IHE_TEST_IDS["repository_unique_id"]
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
STUDY_REF = "urn:ihe:iti:xds:2016:studyInstanceUID"


@pytest.fixture(scope="module")
def community(tmp_path_factory: pytest.TempPathFactory, pki: CertSet) -> Iterator[tuple[Config, BackgroundServer,
                                                                                        list[SyntheticStudy]]]:
    """One responding gateway for the module: PAT-1 with two studies, PAT-2, and IPF's Jimmy Jones."""
    tmp = tmp_path_factory.mktemp("interop")
    cfg = load_config(write_config(tmp / "gw", pki, ids=IHE_TEST_IDS))
    server = BackgroundServer(cfg).start()
    try:
        studies = [
            make_study(tmp / "in" / "s1", patient_id="PAT-1", patient_name="Doe^Jane", birth_date="19700405", sex="F",
                       accession="ACC1", series=(("CT", 2, "CHEST"),), seed="interop-1"),
            make_study(tmp / "in" / "s2", patient_id="PAT-1", patient_name="Doe^Jane", birth_date="19700405", sex="F",
                       accession="ACC2", study_date="20230301", series=(("MR", 1, "BRAIN"),), seed="interop-2"),
            make_study(tmp / "in" / "s3", patient_id="PAT-2", patient_name="Other^Olga", birth_date="19811111",
                       sex="F", series=(("US", 1, "ABDOMEN"),), seed="interop-3"),
            # the IPF ITI-55 sample asks for Jimmy Jones, M, born 1963-08-05
            make_study(tmp / "in" / "s4", patient_id="JJ-1", patient_name="Jones^Jimmy", birth_date="19630805",
                       sex="M", series=(("CR", 1, "CHEST"),), seed="interop-4"),
        ]
        assert server.services.community.backends[0].index_directory(tmp / "in").ok
        yield cfg, server, studies
    finally:
        server.stop()


# ------------------------------------------------------------------------------------ 1. zeep from our WSDL

def _zeep_client(pki: CertSet, wsdl_url: str, *plugins: Any) -> tuple[zeep.Client, requests.Session]:
    session = requests.Session()
    session.cert = (str(pki.partner_cert), str(pki.partner_key))
    session.verify = str(pki.ca_cert)
    # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment would otherwise replace session.verify
    session.trust_env = False
    transport = Transport(session=session, timeout=15, operation_timeout=15)
    # strict=False: zeep has no xsd:substitutionGroup support (python-zeep #321), so the rim:ExtrinsicObject
    # members of rim:RegistryObjectList (declared as rim:Identifiable) come back as _raw_elements
    client = zeep.Client(wsdl_url, transport=transport, plugins=list(plugins), settings=zeep.Settings(strict=False))
    return client, session


def _find_documents(client: zeep.Client, patient: str) -> dict[str, Any]:
    rim = client.type_factory(RIM)

    def slot(name: str, value: str) -> Any:
        return rim.SlotType1(name=name, ValueList=rim.ValueListType(_value_1=[{"Value": value}]))

    kos = ebrim.KOS_FORMAT_CODE
    query = rim.AdhocQueryType(id=iti38.StoredQueryId.FindDocuments.value, Slot=[
        slot("$XDSDocumentEntryPatientId", f"'{patient}^^^&{AA}&ISO'"),
        slot("$XDSDocumentEntryStatus", "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')"),
        slot("$XDSDocumentEntryFormatCode", f"('{kos.code}^^{kos.scheme}')"),
        slot("$XDSDocumentEntryType", f"('{ebrim.STABLE}','{ebrim.ON_DEMAND}')"),
    ])
    return {"ResponseOption": {"returnType": "LeafClass", "returnComposedObjects": True}, "AdhocQuery": query}


def _slot_values(obj: Any, name: str) -> list[str]:
    for s in obj.Slot or []:
        if s.name == name:
            return [v["Value"] for v in s.ValueList._value_1]
    return []


def test_zeep_client_from_served_wsdl(community: Any, pki: CertSet) -> None:
    """A stock zeep client, built only from ``?wsdl``, finds PAT-1's KOS manifests over SOAP 1.2 + mTLS."""
    cfg, server, studies = community
    url = server.url + XCA_QUERY.path
    history = HistoryPlugin()
    client, session = _zeep_client(pki, url + "?wsdl", history)
    try:
        # the served WSDL points zeep at this very endpoint, over its SOAP 1.2 binding
        port = client.wsdl.services["RespondingGateway_Service"].ports["RespondingGateway_Port_Soap12"]
        assert port.binding_options["address"] == url
        assert isinstance(port.binding, Soap12Binding)

        res = client.service.RespondingGateway_CrossGatewayQuery(
            **_find_documents(client, "PAT-1"), _soapheaders=[security_header(cfg, url)])

        # what zeep put on the wire: a SOAP 1.2 envelope and content type, one set of WS-Addressing headers
        # (zeep applies its WsAddressingPlugin itself because the WSDL declares wsam:Action)
        sent = history.last_sent
        assert sent["envelope"].tag == f"{{{ns.SOAP12}}}Envelope"
        assert sent["http_headers"]["Content-Type"].startswith("application/soap+xml")
        headers = [h.tag for h in sent["envelope"].find(f"{{{ns.SOAP12}}}Header")]
        assert headers.count(f"{{{ns.WSA}}}Action") == 1 and f"{{{ns.WSSE}}}Security" in headers
        assert sent["envelope"].findtext(f".//{{{ns.WSA}}}Action") == XCA_QUERY.request_action
        assert sent["envelope"].findtext(f".//{{{ns.WSA}}}To") == url
        received = history.last_received["envelope"]
        assert received.findtext(f".//{{{ns.WSA}}}Action") == XCA_QUERY.response_action
        assert received.findtext(f".//{{{ns.WSA}}}RelatesTo") == sent["envelope"].findtext(f".//{{{ns.WSA}}}MessageID")

        # the response as zeep parsed it: Success, one On-Demand KOS entry per study of PAT-1, home = us
        assert res.status == "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
        assert res.RegistryErrorList is None
        extrinsic = client.get_element(f"{{{RIM}}}ExtrinsicObject")
        raw = res.RegistryObjectList._raw_elements
        entries = [extrinsic.parse(el, client.wsdl.types) for el in raw]
        assert len(entries) == 2
        assert {e.home for e in entries} == {HCID}
        assert {e.objectType for e in entries} == {ebrim.ON_DEMAND}
        assert {e.mimeType for e in entries} == {"application/dicom"}
        study_refs = {r for e in entries for r in _slot_values(e, "urn:ihe:iti:xds:2013:referenceIdList")
                      if r.endswith(STUDY_REF)}
        assert study_refs == {f"{s.StudyInstanceUID}^^^^{STUDY_REF}" for s in studies[:2]}
        assert {v for e in entries for v in _slot_values(e, "repositoryUniqueId")} == {REPO}
    finally:
        session.close()


def _fault_of(call: Callable[[], object]) -> zeep.exceptions.Fault:
    """The SOAP fault zeep raises for ``call``, without its traceback: the traceback's frames hold the
    requests Response, whose socket would stay open after ``session.close()`` and hold up the gateway's
    graceful shutdown for its full timeout (30 s)."""
    try:
        call()
    except zeep.exceptions.Fault as exc:
        exc.__traceback__ = None
        return exc
    raise AssertionError("expected a SOAP fault")


def test_zeep_with_explicit_wsa_plugin_gets_a_specific_fault(community: Any, pki: CertSet) -> None:
    """Adding ``WsAddressingPlugin`` on top of the automatic one doubles every WS-Addressing header:
    XIG must answer with the WS-Addressing fault that names the problem, not a generic one."""
    cfg, server, _ = community
    url = server.url + XCA_QUERY.path
    history = HistoryPlugin()
    client, session = _zeep_client(pki, url + "?wsdl", history, WsAddressingPlugin())
    try:
        fault = _fault_of(lambda: client.service.RespondingGateway_CrossGatewayQuery(
            **_find_documents(client, "PAT-1"), _soapheaders=[security_header(cfg, url)]))
        headers = [h.tag for h in history.last_sent["envelope"].find(f"{{{ns.SOAP12}}}Header")]
        assert headers.count(f"{{{ns.WSA}}}Action") == 2
        assert fault.code == "soap:Sender"  # the text of Code/Value, as zeep reports it
        assert [(q.namespace, q.localname) for q in fault.subcodes] == [(ns.WSA, "InvalidAddressingHeader")]
        assert "wsa:Action" in fault.message
    finally:
        session.close()


# ------------------------------------------------------------------------- 2. real samples, replayed raw

MESSAGES = "messages"
_SECURITY = re.compile(rb"(<(?:[\w.-]+:)?Security\b[^>]*>)(.*?)(</(?:[\w.-]+:)?Security\s*>)", re.S)
_MESSAGE_ID = re.compile(rb"<(?:[\w.-]+:)?MessageID\b[^>]*>(.*?)</(?:[\w.-]+:)?MessageID\s*>", re.S)
_DECLARATION = re.compile(rb"^\s*<\?xml[^>]*\?>")
_PLACEHOLDER_NS = "urn:xig:test:placeholder"


def _fresh_security(cfg: Config, url: str) -> bytes:
    """The children of a new ``wsse:Security`` header (Timestamp, signed assertion), each self-contained."""
    header = security_header(cfg, url)
    return b"".join(etree.tostring(child, with_tail=False) for child in header)


def with_fresh_security(raw: bytes, cfg: Config, url: str) -> tuple[bytes, str]:
    """The sample's own envelope, byte for byte, with new ``wsse:Security`` content; and its MessageID."""
    matches = list(_SECURITY.finditer(raw))
    assert len(matches) == 1, "expected one wsse:Security header in the sample"
    m = matches[0]
    data = raw[:m.start(2)] + _fresh_security(cfg, url) + raw[m.end(2):]
    mid = _MESSAGE_ID.search(raw)
    assert mid is not None
    return data, mid.group(1).decode()


def in_fresh_envelope(body: bytes, cfg: Config, url: str, action: str) -> tuple[bytes, str]:
    """A body-only sample inside a new envelope (Action, MessageID, ReplyTo, To, Security): the body bytes
    are inserted unchanged."""
    mid = new_message_id()
    placeholder = etree.Element(f"{{{_PLACEHOLDER_NS}}}placeholder", nsmap={"ph": _PLACEHOLDER_NS})
    env = build_envelope(placeholder, action=action, message_id=mid, to=url, reply_to_anonymous=True,
                         extra_headers=[security_header(cfg, url)])
    data = xml.tostring(env, declaration=True)
    marker = b'<ph:placeholder xmlns:ph="' + _PLACEHOLDER_NS.encode() + b'"/>'
    assert data.count(marker) == 1
    return data.replace(marker, _DECLARATION.sub(b"", body)), mid


def soap_body_content(raw: bytes) -> bytes:
    """What is inside the sample's ``<prefix:Body>``, as written."""
    m = re.search(rb"<([\w.-]+:)?Body\b[^>]*>(.*)</\1?Body\s*>", raw, re.S)
    assert m is not None
    return m.group(2)


def mtom_package(data: bytes, action: str, *, metro: bool = False) -> tuple[bytes, str]:
    """Wrap a SOAP envelope as the root of an MTOM package, the way peers send ITI-39 requests.

    ``metro``: JAX-WS (CONNECT) framing: ``uuid:`` boundary, ``rootpart*`` Content-ID, the action inside
    ``start-info`` and the root part's ``type`` with escaped quotes.
    """
    if not metro:
        boundary, cid = mtom.new_boundary(), mtom.new_content_id("root")
        part = mtom.Part(cid, mtom.ROOT_PART_CONTENT_TYPE, data)
        return mtom.encode_mtom_bytes([part], boundary), mtom.mtom_content_type(boundary, cid, action=action)
    u = uuid.uuid4()
    boundary, cid = f"uuid:{u}", f"rootpart*{u}@example.jaxws.sun.com"
    part = mtom.Part(cid, f'application/xop+xml;charset=utf-8;type="application/soap+xml;action=\\"{action}\\""',
                     data)
    content_type = (f'multipart/related;start="<{cid}>";type="application/xop+xml";boundary="{boundary}";'
                    f'start-info="application/soap+xml;action=\\"{action}\\""')
    return mtom.encode_mtom_bytes([part], boundary), content_type


async def post(pki: CertSet, url: str, data: bytes, content_type: str, mid: str) -> SoapReply:
    async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
        return await c.post(url, data, content_type, mid)


def check_reply(reply: SoapReply, endpoint: Endpoint, request_mid: str) -> None:
    """A real answer: HTTP 200, no fault, the response Action, RelatesTo = the request's (trimmed)
    MessageID, a body valid against the IHE schemas."""
    assert reply.fault is None, reply.fault
    assert reply.http_status == 200
    assert reply.action == endpoint.response_action
    assert reply.relates_to == request_mid.strip()
    assert default_schemas().errors(reply.body) == []


def soap_type(action: str) -> str:
    return f'application/soap+xml; charset=utf-8; action="{action}"'


async def test_epic_iti55_request_no_match(community: Any, pki: CertSet, samples: Path) -> None:
    """Metriport → Epic: un-namespaced receiver/sender, mustUnderstand="1" on wsa:To / wsa:Action,
    Assertion–Signature–Timestamp order. Demographics we do not hold → AA / NF."""
    cfg, server, _ = community
    url = server.url + XCPD.path
    raw = (samples / MESSAGES / "iti55-xcpd/metriport-carequality/epic-iti-55-request.xml").read_bytes()
    data, mid = with_fresh_security(raw, cfg, url)
    reply = await post(pki, url, data, soap_type(XCPD.request_action), mid)
    check_reply(reply, XCPD, mid)
    assert reply.body.tag == f"{{{iti55.HL7}}}PRPA_IN201306UV02"
    result = iti55.parse_response(reply.body)
    assert (result.ack_code, result.query_response_code, result.patients) == ("AA", "NF", ())
    assert result.target_message_id == iti55.II("2.16.840.1.113883.3.9621", "2e304916-539f-4a0e-8c13-07347b38609a")
    assert result.query_id == iti55.II("2.16.840.1.113883.3.9621", "2e304916-539f-4a0e-8c13-07347b38609a")


async def test_ipf_iti55_request_matches_seeded_patient(community: Any, pki: CertSet, samples: Path) -> None:
    """The IPF sample body (no XML declaration, leading blanks, ``matchCriterionList``) in a fresh envelope:
    it finds the seeded Jimmy Jones, and the link to IPF's community is remembered."""
    cfg, server, _ = community
    url = server.url + XCPD.path
    body = (samples / MESSAGES / "iti55-xcpd/ipf/iti55-sample-request.xml").read_bytes()
    data, mid = in_fresh_envelope(body, cfg, url, XCPD.request_action)
    reply = await post(pki, url, data, soap_type(XCPD.request_action), mid)
    check_reply(reply, XCPD, mid)
    result = iti55.parse_response(reply.body)
    assert result.status == "match" and result.query_response_code == "OK"
    assert len(result.patients) == 1
    patient = result.patients[0]
    assert (patient.patient_id.root, patient.patient_id.extension) == (AA, "JJ-1")
    assert patient.home_community_id == HCID
    assert result.target_message_id == iti55.II("1.2.840.114350.1.13.0.1.7.1.1", "35423")
    assert result.query_id == iti55.II("1.2.840.114350.1.13.28.1.18.5.999", "18204")
    assert server.services.links.communities_for("JJ-1", AA) == ["urn:oid:1.2.3.928.955"]


async def test_nist_iti55_request_prefixed_and_impossible_birth_date(community: Any, pki: CertSet,
                                                                     samples: Path) -> None:
    """NIST 15500 test 1: every HL7 element under a ``tag0:`` prefix, ``semanticsText representation``,
    and a birth date (1984-97-11) that does not exist → AE with the HL7 syntax error SYN102, not a fault."""
    cfg, server, _ = community
    url = server.url + XCPD.path
    body = (samples / MESSAGES / "iti55-xcpd/nist-toolkit/tests/15500/test1_findpatient_dob_gender_name.xml"
            ).read_bytes()
    data, mid = in_fresh_envelope(body, cfg, url, XCPD.request_action)
    reply = await post(pki, url, data, "application/soap+xml;charset=UTF-8", mid)
    check_reply(reply, XCPD, mid)
    result = iti55.parse_response(reply.body)
    assert (result.ack_code, result.query_response_code, result.patients) == ("AE", "AE", ())
    assert [(d.code, d.type_code) for d in result.ack_details] == [("SYN102", "E")]
    assert "19849711" in (result.ack_details[0].text or "")
    assert result.target_message_id == iti55.II("1.2.840.114350.1.13.0.1.7.1.1", "35423")


async def test_nist_iti38_body_foreign_patient(community: Any, pki: CertSet, samples: Path) -> None:
    """NIST's ITI-38 body (default-namespace rim elements, a ClassCode filter, no entry type) in a fresh
    envelope: the patient is in NIST's assigning authority → XDSUnknownPatientId, located at us."""
    cfg, server, _ = community
    url = server.url + XCA_QUERY.path
    raw = (samples / MESSAGES / "iti38-xca-query/nist-toolkit/soap-xcq-req.xml").read_bytes()
    data, mid = in_fresh_envelope(soap_body_content(raw), cfg, url, XCA_QUERY.request_action)
    reply = await post(pki, url, data, "application/soap+xml; charset=UTF-8", mid)
    check_reply(reply, XCA_QUERY, mid)
    res = iti38.parse_response(reply.body)
    assert res.status.endswith("Failure") and res.entries == []
    assert [e.code for e in res.errors] == ["XDSUnknownPatientId"]
    assert "1.3.6.1.4.1.21367.2005.3.7" in (res.errors[0].context or "")
    assert HCID in (res.errors[0].location or "")


async def test_epic_iti38_request(community: Any, pki: CertSet, samples: Path) -> None:
    """Metriport → Epic ITI-38: ``urn``/``urn2`` prefixes, ``slotType``, ``lid``/``status`` on AdhocQuery,
    ``home`` = Epic's bare OID. As sent → XDSUnknownCommunity; addressed to us (``home`` = our HCID) →
    XDSUnknownPatientId for Epic's patient id."""
    cfg, server, _ = community
    url = server.url + XCA_QUERY.path
    raw = (samples / MESSAGES / "iti38-xca-query/metriport-carequality/epic-iti-38-request.xml").read_bytes()
    epic = b'home="1.2.840.114350.1.13.11511.3.7.3.688884.100.1000"'
    assert raw.count(epic) == 1

    data, mid = with_fresh_security(raw, cfg, url)
    reply = await post(pki, url, data, soap_type(XCA_QUERY.request_action), mid)
    check_reply(reply, XCA_QUERY, mid)
    res = iti38.parse_response(reply.body)
    assert [e.code for e in res.errors] == ["XDSUnknownCommunity"] and res.status.endswith("Failure")
    assert res.entries == []

    data, mid = with_fresh_security(raw.replace(epic, f'home="{HCID}"'.encode()), cfg, url)
    reply = await post(pki, url, data, soap_type(XCA_QUERY.request_action), mid)
    check_reply(reply, XCA_QUERY, mid)
    res = iti38.parse_response(reply.body)
    assert [e.code for e in res.errors] == ["XDSUnknownPatientId"] and res.status.endswith("Failure")
    assert "EV10045900" in (res.errors[0].context or "")


async def test_epic_iti39_request_mtom(community: Any, pki: CertSet, samples: Path) -> None:
    """Metriport → Epic ITI-39 (three documents of Epic's community), as MTOM: one XDSUnknownCommunity per
    request; addressed to us, each request gets its own specific error."""
    cfg, server, _ = community
    url = server.url + XCA_RETRIEVE.path
    raw = (samples / MESSAGES / "iti39-xca-retrieve/metriport-carequality/epic-iti-39-request.xml").read_bytes()
    data, mid = with_fresh_security(raw, cfg, url)
    reply = await post(pki, url, *mtom_package(data, XCA_RETRIEVE.request_action), mid)
    check_reply(reply, XCA_RETRIEVE, mid)
    assert reply.is_mtom
    got = iti39.parse_response(reply.body, reply.attachments)
    assert got.status.endswith("Failure") and got.documents == []
    assert [e.code for e in got.errors] == ["XDSUnknownCommunity"] * 3

    # retarget: #1 our community and repository (unknown document), #2 our community only, #3 as sent
    epic_hcid = b"urn:oid:1.2.840.114350.1.13.11511.3.7.3.688884.100.1000</urn:HomeCommunityId>"
    epic_repo = b">1.2.840.114350.1.13.11511.3.7.3.688884.100.1000</urn:RepositoryUniqueId>"
    retargeted = (raw.replace(epic_hcid, f"{HCID}</urn:HomeCommunityId>".encode(), 2)
                  .replace(epic_repo, f">{REPO}</urn:RepositoryUniqueId>".encode(), 1))
    data, mid = with_fresh_security(retargeted, cfg, url)
    reply = await post(pki, url, *mtom_package(data, XCA_RETRIEVE.request_action), mid)
    check_reply(reply, XCA_RETRIEVE, mid)
    got = iti39.parse_response(reply.body, reply.attachments)
    assert [e.code for e in got.errors] == ["XDSDocumentUniqueIdError", "XDSUnknownRepositoryId",
                                            "XDSUnknownCommunity"]
    assert "1.2.840.114350.1.13.11511.3.7.8.688883.110924" in (got.errors[0].context or "")


async def test_connect_iti39_request_metro_mtom(community: Any, pki: CertSet, samples: Path) -> None:
    """CONNECT (Metro/JAX-WS): WS-Addressing in the default namespace with an unqualified
    ``mustUnderstand``, header values with trailing newlines, Timestamp before Assertion, SAML 1.0 bound to
    ``saml`` on the Envelope, ``uuid:`` MIME boundary. Unknown community → XDSUnknownCommunity, and
    RelatesTo is the trimmed MessageID."""
    cfg, server, _ = community
    url = server.url + XCA_RETRIEVE.path
    raw = (samples / MESSAGES / "iti39-xca-retrieve/connect/saml_header_diff_order.xml").read_bytes()
    data, mid = with_fresh_security(raw, cfg, url)
    assert mid != mid.strip()  # the sample's MessageID is pretty-printed
    reply = await post(pki, url, *mtom_package(data, XCA_RETRIEVE.request_action, metro=True), mid)
    check_reply(reply, XCA_RETRIEVE, mid)
    assert reply.relates_to == "urn:uuid:b9729ae5-7e97-46e4-9d9b-6e3879501f27"
    assert reply.is_mtom
    got = iti39.parse_response(reply.body, reply.attachments)
    assert [e.code for e in got.errors] == ["XDSUnknownCommunity"] and got.status.endswith("Failure")
    assert "urn:oid:2.2" in (got.errors[0].context or "")

    # the same request addressed to our community and repository: the document is not known here
    retargeted = (raw.replace(b"<ns5:HomeCommunityId>urn:oid:2.2<", f"<ns5:HomeCommunityId>{HCID}<".encode())
                  .replace(b"<ns5:RepositoryUniqueId>1<", f"<ns5:RepositoryUniqueId>{REPO}<".encode()))
    assert retargeted != raw
    data, mid = with_fresh_security(retargeted, cfg, url)
    reply = await post(pki, url, *mtom_package(data, XCA_RETRIEVE.request_action, metro=True), mid)
    check_reply(reply, XCA_RETRIEVE, mid)
    got = iti39.parse_response(reply.body, reply.attachments)
    assert [e.code for e in got.errors] == ["XDSDocumentUniqueIdError"]
