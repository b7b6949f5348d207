"""The whole inbound pipeline over real mutual TLS on loopback, with real signed assertions.

Each bad case gets a specific, clear fault (or a refused handshake) and the gateway keeps serving:
after every bad request the same server answers a good one.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from lxml import etree

from gateway.config import Config, load_config
from gateway.errors import (
    WSA_ACTION_NOT_SUPPORTED,
    WSSE_FAILED_AUTHENTICATION,
    WSSE_FAILED_CHECK,
    WSSE_INVALID_SECURITY,
    WSSE_INVALID_SECURITY_TOKEN,
    WSSE_MESSAGE_EXPIRED,
    WSSE_UNSUPPORTED_ALGORITHM,
    XIG_FORBIDDEN_XML,
    XIG_INTERNAL,
    XIG_MALFORMED,
    XIG_NOT_IMPLEMENTED,
    XIG_SCHEMA_INVALID,
    XIG_TOO_LARGE,
    XIG_UNSUPPORTED_MEDIA,
    QName,
)
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom, ns, xml
from gateway.web import server as web_server
from gateway.web.app import RequestContext, SoapResponse
from gateway.web.client import SoapClient, SoapReply, TransportError
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD
from tests.conftest import write_config

RS_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


def find_documents() -> etree._Element:
    from gateway.demo import find_documents_request

    return find_documents_request("PAT-1^^^&2.999.1.1&ISO")


def retrieve_request(*doc_ids: str) -> etree._Element:
    req = etree.Element(ns.q(ns.XDSB, "RetrieveDocumentSetRequest"), nsmap={"xdsb": ns.XDSB})
    for d in doc_ids:
        dr = etree.SubElement(req, ns.q(ns.XDSB, "DocumentRequest"))
        etree.SubElement(dr, ns.q(ns.XDSB, "HomeCommunityId")).text = "urn:oid:2.999.1"
        etree.SubElement(dr, ns.q(ns.XDSB, "RepositoryUniqueId")).text = "2.999.1.2"
        etree.SubElement(dr, ns.q(ns.XDSB, "DocumentUniqueId")).text = d
    return req


def imaging_request() -> etree._Element:
    """A RAD-75 request for one instance (the stand-in handler streams its four big parts whatever is asked)."""
    body = etree.Element(ns.q(ns.XDSI, "RetrieveImagingDocumentSetRequest"), nsmap={"xdsi": ns.XDSI, "xdsb": ns.XDSB})
    study = etree.SubElement(body, ns.q(ns.XDSI, "StudyRequest"), studyInstanceUID="1.2.3")
    series = etree.SubElement(study, ns.q(ns.XDSI, "SeriesRequest"), seriesInstanceUID="1.2.3.1")
    series.append(retrieve_request("1.2.3.0")[0])
    tsl = etree.SubElement(body, ns.q(ns.XDSI, "TransferSyntaxUIDList"))
    etree.SubElement(tsl, ns.q(ns.XDSI, "TransferSyntaxUID")).text = "1.2.840.10008.1.2.1"
    return body


def retrieve_response(docs: list[tuple[str, str | None]]) -> etree._Element:
    """RetrieveDocumentSetResponse; each doc is (uid, cid) — cid None means inline base64 'x'."""
    resp = etree.Element(ns.q(ns.XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": ns.XDSB, "rs": ns.RS})
    etree.SubElement(resp, ns.q(ns.RS, "RegistryResponse"), status=RS_SUCCESS)
    for uid, cid in docs:
        dr = etree.SubElement(resp, ns.q(ns.XDSB, "DocumentResponse"))
        etree.SubElement(dr, ns.q(ns.XDSB, "HomeCommunityId")).text = "urn:oid:2.999.1"
        etree.SubElement(dr, ns.q(ns.XDSB, "RepositoryUniqueId")).text = "2.999.1.2"
        etree.SubElement(dr, ns.q(ns.XDSB, "DocumentUniqueId")).text = uid
        etree.SubElement(dr, ns.q(ns.XDSB, "mimeType")).text = "application/octet-stream"
        doc = etree.SubElement(dr, ns.q(ns.XDSB, "Document"))
        if cid is None:
            doc.text = base64.b64encode(b"x").decode()
        else:
            etree.SubElement(doc, ns.q(ns.XOP, "Include"), href=f"cid:{cid}", nsmap={"xop": ns.XOP})
    return resp


# -- handlers standing in for the transactions (the plug-in point the next issues fill) -----------
async def query_handler(ctx: RequestContext) -> SoapResponse:
    """Answers ITI-38 with an empty success whose requestId carries the verified identity."""
    ident = ctx.identity
    resp = etree.Element(ns.q(ns.QUERY, "AdhocQueryResponse"), nsmap={"query": ns.QUERY, "rim": ns.RIM},
                         status=RS_SUCCESS,
                         requestId=json.dumps([ident.subject_id, ident.organization, ident.home_community_id,
                                               ident.role.code, ident.purpose_of_use.code,
                                               ctx.client_certificate.subject.rfc4514_string()
                                               if ctx.client_certificate else None]))
    etree.SubElement(resp, ns.q(ns.RIM, "RegistryObjectList"))
    return SoapResponse(resp)


async def retrieve_handler(ctx: RequestContext) -> SoapResponse:
    """ITI-39: returns each requested uid's bytes = the uid itself, as MTOM parts."""
    uids = [el.text or "" for el in ctx.body.iter(ns.q(ns.XDSB, "DocumentUniqueId"))]
    if "boom" in uids:
        raise RuntimeError("handler bug with a secret inside: /etc/shadow")
    cids = [mtom.normalize_content_id(mtom.new_content_id(f"doc{i}")) for i in range(len(uids))]
    parts = [mtom.Part(cid, "application/octet-stream", uid.encode()) for uid, cid in zip(uids, cids)]
    return SoapResponse(retrieve_response(list(zip(uids, cids))), parts)


PART_SIZE = 50 * 1024 * 1024
CHUNK = 1024 * 1024


def _pattern(i: int) -> bytes:
    return bytes([(i * 7 + j) % 251 for j in range(256)]) * (CHUNK // 256)


async def big_parts(n: int) -> AsyncIterator[mtom.Part]:
    for i in range(n):
        async def body(i: int = i) -> AsyncIterator[bytes]:
            chunk = _pattern(i)
            for _ in range(PART_SIZE // CHUNK):
                yield chunk
        yield mtom.Part(f"part{i}@xig", "application/dicom", body())


async def imaging_handler(ctx: RequestContext) -> SoapResponse:
    """RAD-75 stand-in streaming 4 × 50 MB parts generated on the fly."""
    return SoapResponse(retrieve_response([(f"1.2.3.{i}", f"part{i}@xig") for i in range(4)]), big_parts(4))


HANDLERS = {XCA_QUERY.transaction: query_handler, XCA_RETRIEVE.transaction: retrieve_handler,
            XCAI_RETRIEVE.transaction: imaging_handler}


@pytest.fixture
def gw(config: Config, start_gateway: Any) -> Any:
    return start_gateway(config, HANDLERS)


def partner_ctx(pki: CertSet) -> ssl.SSLContext:
    return client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)


async def call(url: str, body: etree._Element, action: str, config: Config, pki: CertSet, *,
               security: etree._Element | None | bool = True, **kw: Any) -> SoapReply:
    if security is True:
        security = security_header(config, url)
    async with SoapClient(partner_ctx(pki)) as c:
        return await c.call(url, body, action, security=security if security is not False else None, **kw)


async def post_raw(url: str, data: bytes, pki: CertSet,
                   content_type: str = "application/soap+xml; charset=UTF-8") -> SoapReply:
    async with SoapClient(partner_ctx(pki)) as c:
        return await c.post(url, data, content_type, "urn:uuid:raw")


def assert_fault(reply: SoapReply, subcode: QName, *, fragment: str = "", status: int | None = None) -> None:
    assert reply.fault is not None, f"expected a fault, got {etree.QName(reply.body).localname}"
    assert reply.fault.subcode is not None and reply.fault.subcode.clark == subcode.clark, reply.fault
    assert fragment.lower() in reply.fault.reason.lower(), reply.fault.reason
    assert reply.action == ns.WSA_FAULT_ACTION
    if status is not None:
        assert reply.http_status == status


async def assert_still_serving(gw: Any, config: Config, pki: CertSet) -> None:
    reply = await call(gw.url + XCA_QUERY.path, find_documents(), XCA_QUERY.request_action, config, pki)
    assert reply.fault is None, reply.fault
    assert reply.body.get("status") == RS_SUCCESS


# -- the good path ---------------------------------------------------------------------------------
async def test_signed_query_reaches_service_with_verified_identity(gw: Any, config: Config, pki: CertSet) -> None:
    url = gw.url + XCA_QUERY.path
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki)
    assert reply.fault is None and reply.http_status == 200
    assert reply.action == XCA_QUERY.response_action
    assert reply.relates_to == reply.message_id  # RelatesTo echoes our MessageID
    user, org, hcid, role, purpose, peer = json.loads(reply.body.get("requestId"))
    assert (user, org, hcid, role, purpose) == ("XIG import station", "XIG Community", "urn:oid:2.999.1",
                                                "224608005", "TREATMENT")
    assert "XIG Partner (test)" in peer  # the TLS client certificate is handed to the service too
    assert not reply.is_mtom  # ITI-38 answers plain SOAP to a plain request


async def test_mtom_request_without_attachments_gets_mtom_reply(gw: Any, config: Config, pki: CertSet) -> None:
    url = gw.url + XCA_RETRIEVE.path
    reply = await call(url, retrieve_request("1.2.3", "1.2.4"), XCA_RETRIEVE.request_action, config, pki,
                       use_mtom=True)
    assert reply.fault is None and reply.is_mtom
    assert reply.action == XCA_RETRIEVE.response_action
    got = {}
    for el, cid in mtom.find_xop_includes(reply.body):
        uid = el.getparent().findtext(ns.q(ns.XDSB, "DocumentUniqueId"))
        got[uid] = reply.attachments[cid]
    assert got == {"1.2.3": b"1.2.3", "1.2.4": b"1.2.4"}


async def test_plain_request_to_mtom_endpoint_still_gets_mtom(gw: Any, config: Config, pki: CertSet) -> None:
    reply = await call(gw.url + XCA_RETRIEVE.path, retrieve_request("9.9"), XCA_RETRIEVE.request_action,
                       config, pki, use_mtom=False)
    assert reply.fault is None and reply.is_mtom  # ITI TF-2 3.43.5: responses are MTOM


async def test_streaming_200mb_response_has_bounded_memory(gw: Any, config: Config, pki: CertSet,
                                                           tmp_path: Path) -> None:
    """4 × 50 MB parts: produced by an async generator, sent over TLS, consumed to files."""
    import hashlib

    url = gw.url + XCAI_RETRIEVE.path
    body = imaging_request()
    tracemalloc.start()
    try:
        reply = await call(url, body, XCAI_RETRIEVE.request_action, config, pki, use_mtom=True,
                           sink_factory=lambda info: mtom.FileSink(tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.fault is None, reply.fault
    assert len(reply.attachments) == 4
    for i in range(4):
        path = Path(reply.attachments[f"part{i}@xig"])
        assert path.stat().st_size == PART_SIZE
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK * 4):
                h.update(chunk)
        expected = hashlib.sha256()
        for _ in range(PART_SIZE // CHUNK):
            expected.update(_pattern(i))
        assert h.hexdigest() == expected.hexdigest()
    # server and client both run in this process: 200 MB went through with a few MB of Python memory
    assert peak < 32 * 1024 * 1024, f"peak Python allocation {peak / 1e6:.1f} MB"


def test_a_body_chunk_goes_to_the_transport_as_it_is() -> None:
    """The server's h11 connection hands a large chunk's data object itself to the transport (no joined copy of
    a streamed response's bytes), after its size line and the CRLF held back from the chunk before; a small
    chunk goes out whole in one write. The bytes on the wire are h11's chunked framing, exactly."""
    class Transport:
        def __init__(self) -> None:
            self.written: list[list[Any]] = []

        def writelines(self, pieces: list[Any]) -> None:
            self.written.append(list(pieces))

        def write(self, data: bytes) -> None:
            self.written.append([data])

    conn, transport = web_server._BodyPassthrough(h11.SERVER), Transport()
    conn.transport = transport  # type: ignore[assignment]
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request) and isinstance(conn.next_event(), h11.EndOfMessage)
    head = conn.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
    assert head is not None and head.startswith(b"HTTP/1.1 200") and transport.written == []
    big = memoryview(b"0123456789abcdef" * 4096)[5:70000]
    small = b"Content-Type: application/dicom\r\n\r\n"
    assert conn.send(h11.Data(data=big)) == b""
    assert conn.send(h11.Data(data=small)) == b""
    assert conn.send(h11.Data(data=big)) == b""
    assert conn.send(h11.Data(data=b"")) == b""  # nothing to frame
    end = conn.send(h11.EndOfMessage())
    first, second, third = transport.written
    assert first == [b"%x\r\n" % len(big), big] and first[1] is big
    assert second == [b"\r\n" + b"%x\r\n" % len(small) + small + b"\r\n"]
    assert third[0] == b"%x\r\n" % len(big) and third[1] is big and end == b"\r\n0\r\n\r\n"
    wire = b"".join(bytes(p) for w in transport.written for p in w) + end
    chunked = b"".join(b"%x\r\n" % len(d) + bytes(d) + b"\r\n" for d in (big, small, big)) + b"0\r\n\r\n"
    assert wire == chunked


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_streamed_chunks_reach_the_passthrough_unjoined(config: Config, pki: CertSet, start_gateway: Any,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              loop_kind: str) -> None:
    """On both event loops XIG serves on, the serving protocol really uses :class:`_BodyPassthrough` (uvicorn
    builds its own h11 connection; XIG replaces it): the chunk objects the RAD-75 stand-in yields arrive
    there as they are, and the 200 MB reach the client intact."""
    gw = start_gateway(config.model_copy(update={"server": config.server.model_copy(
        update={"event_loop": loop_kind})}), HANDLERS)
    seen: list[Any] = []
    send = web_server._BodyPassthrough.send

    def spy(self: web_server._BodyPassthrough, event: Any) -> bytes | None:
        if type(event) is h11.Data:
            seen.append(event.data)
        return send(self, event)

    monkeypatch.setattr(web_server._BodyPassthrough, "send", spy)
    url = gw.url + XCAI_RETRIEVE.path
    body = imaging_request()
    reply = await call(url, body, XCAI_RETRIEVE.request_action, config, pki, use_mtom=True,
                       sink_factory=lambda info: mtom.FileSink(tmp_path))
    assert reply.fault is None and len(reply.attachments) == 4
    big = [d for d in seen if len(d) == CHUNK]
    assert len(big) == 4 * PART_SIZE // CHUNK  # every 1 MiB chunk of the four parts, as produced
    assert {bytes(d[:256]) for d in big} == {_pattern(i)[:256] for i in range(4)}
    for i in range(4):  # and what the client wrote is what was produced
        with Path(reply.attachments[f"part{i}@xig"]).open("rb") as f:
            assert all(f.read(CHUNK) == _pattern(i) for _ in range(PART_SIZE // CHUNK)) and f.read(1) == b""


async def test_wsdl_health_and_schemas(gw: Any, pki: CertSet) -> None:
    async with httpx.AsyncClient(verify=partner_ctx(pki)) as http:
        health = (await http.get(gw.url + "/health")).json()
        assert health["status"] == "ok" and health["home_community_id"] == "urn:oid:2.999.1"
        for ep in (XCPD, XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE):
            r = await http.get(f"{gw.url}{ep.path}?wsdl")
            assert r.status_code == 200
            doc = etree.fromstring(r.content)
            locations = doc.xpath("//*[local-name()='address']/@location")
            assert locations == [gw.url + ep.path]
            for loc in doc.xpath("//*[local-name()='import']/@schemaLocation"):
                assert loc.startswith(gw.url + "/ihe/schemas/")
                assert (await http.get(loc)).status_code == 200
        assert (await http.get(gw.url + "/ihe/schemas/../../etc/passwd")).status_code == 404
        assert (await http.get(gw.url + "/ihe/schemas/%2e%2e/%2e%2e/etc/passwd")).status_code == 404


# -- TLS: callers without a trusted certificate never reach the application ----------------------
async def test_no_client_certificate_refused(gw: Any, config: Config, pki: CertSet) -> None:
    anonymous = client_context(None, None, pki.ca_cert)
    async with SoapClient(anonymous) as c:
        with pytest.raises(TransportError) as exc:
            await c.call(gw.url + XCA_QUERY.path, find_documents(), XCA_QUERY.request_action,
                         security=security_header(config, gw.url))
    assert "certificate" in str(exc.value)
    await assert_still_serving(gw, config, pki)


async def test_untrusted_client_certificate_refused(gw: Any, config: Config, pki: CertSet,
                                                    rogue_pki: CertSet) -> None:
    rogue = client_context(rogue_pki.partner_cert, rogue_pki.partner_key, pki.ca_cert)
    async with SoapClient(rogue) as c:
        with pytest.raises(TransportError):
            await c.call(gw.url + XCA_QUERY.path, find_documents(), XCA_QUERY.request_action,
                         security=security_header(config, gw.url))
    await assert_still_serving(gw, config, pki)


@pytest.mark.parametrize("args,accepted", [
    (["-tls1_2"], True),
    (["-tls1_3"], True),
    (["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], False),
    (["-tls1_2", "-cipher", "AES128-SHA"], False),  # no forward secrecy: not BCP 195
    (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"], False),  # CBC: not BCP 195's AEAD list
], ids=["tls1.2", "tls1.3", "tls1.1", "static-rsa", "cbc"])
def test_tls_versions_and_ciphers(gw: Any, pki: CertSet, args: list[str], accepted: bool) -> None:
    """An independent client (openssl s_client) checks the TLS floor and the BCP 195 cipher list."""
    import subprocess

    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}", "-cert", str(pki.partner_cert),
                        "-key", str(pki.partner_key), "-CAfile", str(pki.ca_cert), *args],
                       input=b"", capture_output=True, timeout=30)
    out = r.stdout.decode()
    assert ("Cipher is (NONE)" not in out and r.returncode == 0) is accepted, out[-500:]


# -- transport and XML faults --------------------------------------------------------------------
async def test_wrong_action(gw: Any, config: Config, pki: CertSet) -> None:
    reply = await call(gw.url + XCA_QUERY.path, find_documents(), XCA_RETRIEVE.request_action, config, pki)
    assert_fault(reply, WSA_ACTION_NOT_SUPPORTED, fragment=XCA_QUERY.request_action, status=400)
    await assert_still_serving(gw, config, pki)


@pytest.mark.parametrize("data,subcode", [
    (b"this is not XML", XIG_MALFORMED),
    (b"", XIG_MALFORMED),
    (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]><e>&x;</e>', XIG_FORBIDDEN_XML),
    (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
     b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]><l>&d;</l>',
     XIG_FORBIDDEN_XML),
], ids=["non-xml", "empty", "xxe", "billion-laughs"])
async def test_hostile_bodies(gw: Any, config: Config, pki: CertSet, data: bytes, subcode: QName) -> None:
    reply = await post_raw(gw.url + XCA_QUERY.path, data, pki)
    assert_fault(reply, subcode, status=400)
    await assert_still_serving(gw, config, pki)


async def test_oversized_body(config: Config, pki: CertSet, start_gateway: Any, tmp_path: Path) -> None:
    small = load_config(write_config(tmp_path / "small", pki, server_extra="max_request_bytes = 100000"))
    gw = start_gateway(small, HANDLERS)
    data = b"<a>" + b"x" * 200_000 + b"</a>"
    reply = await post_raw(gw.url + XCA_QUERY.path, data, pki)
    assert_fault(reply, XIG_TOO_LARGE, fragment="100000", status=413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        for _ in range(30):
            yield b"x" * 10_000

    async with httpx.AsyncClient(verify=partner_ctx(pki)) as http:
        r = await http.post(gw.url + XCA_QUERY.path, content=chunked(),
                            headers={"content-type": "application/soap+xml"})
        assert r.status_code == 413 and b"MessageTooLarge" in r.content
    await assert_still_serving(gw, small, pki)


async def test_unsupported_media_type(gw: Any, config: Config, pki: CertSet) -> None:
    reply = await post_raw(gw.url + XCA_QUERY.path, b"a=b", pki, content_type="application/x-www-form-urlencoded")
    assert_fault(reply, XIG_UNSUPPORTED_MEDIA, status=415)


async def test_schema_invalid_body_named(gw: Any, config: Config, pki: CertSet) -> None:
    body = find_documents()
    body.find(ns.q(ns.RIM, "AdhocQuery")).attrib.pop("id")
    reply = await call(gw.url + XCA_QUERY.path, body, XCA_QUERY.request_action, config, pki)
    assert_fault(reply, XIG_SCHEMA_INVALID, fragment="AdhocQuery", status=400)


async def test_handler_crash_is_receiver_fault_without_trace(gw: Any, config: Config, pki: CertSet) -> None:
    reply = await call(gw.url + XCA_RETRIEVE.path, retrieve_request("boom"), XCA_RETRIEVE.request_action,
                       config, pki, use_mtom=True)
    assert_fault(reply, XIG_INTERNAL, fragment="reference", status=500)
    assert reply.fault is not None and reply.fault.code == "Receiver"
    assert "shadow" not in reply.fault.reason and "Traceback" not in etree.tostring(reply.envelope).decode()
    await assert_still_serving(gw, config, pki)


async def test_transaction_not_enabled(gw: Any, config: Config, pki: CertSet, samples: Path) -> None:
    body = xml.parse((samples / "messages/iti55-xcpd/ipf/iti55-sample-request.xml").read_bytes())
    reply = await call(gw.url + XCPD.path, body, XCPD.request_action, config, pki)
    assert_fault(reply, XIG_NOT_IMPLEMENTED, fragment="ITI-55", status=500)


# -- XUA ------------------------------------------------------------------------------------------
async def test_no_security_header(gw: Any, config: Config, pki: CertSet) -> None:
    reply = await call(gw.url + XCA_QUERY.path, find_documents(), XCA_QUERY.request_action, config, pki,
                       security=False)
    assert_fault(reply, WSSE_INVALID_SECURITY, status=400)
    await assert_still_serving(gw, config, pki)


async def test_expired_and_future_assertions(gw: Any, config: Config, pki: CertSet) -> None:
    url = gw.url + XCA_QUERY.path
    old = security_header(config, url, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki, security=old)
    assert_fault(reply, WSSE_MESSAGE_EXPIRED)
    future = security_header(config, url, now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki, security=future)
    assert reply.fault is not None and reply.fault.subcode is not None
    assert "valid" in reply.fault.reason.lower()
    await assert_still_serving(gw, config, pki)


async def test_assertion_signed_by_untrusted_key(gw: Any, config: Config, pki: CertSet, rogue_pki: CertSet,
                                                 tmp_path: Path) -> None:
    # the caller has a trusted TLS certificate, but signs its assertion with a key from another CA
    rogue_cfg = load_config(write_config(tmp_path / "rogue", pki, saml_extra=""))
    rogue_cfg = rogue_cfg.model_copy(update={"saml": rogue_cfg.saml.model_copy(
        update={"signing_certificate": rogue_pki.partner_cert, "signing_key": rogue_pki.partner_key})})
    url = gw.url + XCA_QUERY.path
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki,
                       security=security_header(rogue_cfg, url))
    assert_fault(reply, WSSE_FAILED_AUTHENTICATION)
    await assert_still_serving(gw, config, pki)


async def test_purpose_not_honoured(gw: Any, config: Config, pki: CertSet) -> None:
    from gateway.security.outbound import default_identity
    from gateway.security.saml import CodedValue

    url = gw.url + XCA_QUERY.path
    ident = default_identity(config)
    marketing = type(ident)(**{**ident.__dict__, "purpose_of_use": CodedValue(
        "MARKETING", "2.16.840.1.113883.3.18.7.1", "nhin-purpose", "Marketing")})
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki,
                       security=security_header(config, url, identity=marketing))
    assert_fault(reply, WSSE_FAILED_AUTHENTICATION, fragment="MARKETING")


def _assertion(security: etree._Element) -> etree._Element:
    return security.find(ns.q(ns.SAML2, "Assertion"))


def _attribute(assertion: etree._Element, name: str) -> etree._Element:
    return next(a for a in assertion.iter(ns.q(ns.SAML2, "Attribute")) if a.get("Name") == name)


async def test_unsigned_assertion(gw: Any, config: Config, pki: CertSet) -> None:
    url = gw.url + XCA_QUERY.path
    sec = security_header(config, url)
    a = _assertion(sec)
    a.remove(a.find(ns.q(ns.DS, "Signature")))
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki, security=sec)
    assert_fault(reply, WSSE_INVALID_SECURITY_TOKEN, fragment="not signed")
    await assert_still_serving(gw, config, pki)


async def test_tampered_after_signing(gw: Any, config: Config, pki: CertSet) -> None:
    url = gw.url + XCA_QUERY.path
    sec = security_header(config, url)
    value = _attribute(_assertion(sec), "urn:oasis:names:tc:xspa:1.0:subject:subject-id")[0]
    value.text = "Mallory"
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki, security=sec)
    assert_fault(reply, WSSE_FAILED_CHECK)
    await assert_still_serving(gw, config, pki)


@pytest.mark.parametrize("attribute", [
    "urn:oasis:names:tc:xspa:1.0:subject:subject-id",
    "urn:oasis:names:tc:xspa:1.0:subject:organization",
    "urn:oasis:names:tc:xspa:1.0:subject:organization-id",
    "urn:nhin:names:saml:homeCommunityId",
    "urn:oasis:names:tc:xacml:2.0:subject:role",
    "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse",
])
async def test_missing_required_attribute(gw: Any, config: Config, pki: CertSet, attribute: str) -> None:
    """A correctly signed assertion that lacks one Carequality attribute is refused, naming it."""
    from gateway.security.saml import load_signing_credentials, sign_assertion

    url = gw.url + XCA_QUERY.path
    sec = security_header(config, url)
    a = _assertion(sec)
    a.remove(a.find(ns.q(ns.DS, "Signature")))
    attr = _attribute(a, attribute)
    attr.getparent().remove(attr)
    sign_assertion(a, load_signing_credentials(pki.partner_cert, pki.partner_key))
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki, security=sec)
    assert_fault(reply, WSSE_INVALID_SECURITY_TOKEN)
    short = attribute.rsplit(":", 1)[-1]
    assert short.lower() in reply.fault.reason.lower().replace("_", "-").replace(" ", "")  # type: ignore[union-attr]
    await assert_still_serving(gw, config, pki)


async def test_signature_wrapping_is_refused(gw: Any, config: Config, pki: CertSet) -> None:
    """XSW: the signed assertion is hidden in a wrapper; an unsigned evil copy with the same ID is first."""
    import copy

    url = gw.url + XCA_QUERY.path
    sec = security_header(config, url)
    signed = _assertion(sec)
    evil = copy.deepcopy(signed)
    evil.remove(evil.find(ns.q(ns.DS, "Signature")))
    _attribute(evil, "urn:oasis:names:tc:xspa:1.0:subject:subject-id")[0].text = "Mallory"
    wrapper = etree.SubElement(sec, "{urn:evil}Wrapper")
    sec.replace(signed, evil)
    wrapper.append(signed)
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki, security=sec)
    assert reply.fault is not None and reply.fault.subcode is not None
    assert reply.fault.subcode.clark in {WSSE_INVALID_SECURITY.clark, WSSE_FAILED_CHECK.clark,
                                         WSSE_INVALID_SECURITY_TOKEN.clark}
    # a second evil assertion next to the genuine one is refused too
    sec2 = security_header(config, url)
    sec2.insert(0, copy.deepcopy(evil))
    reply = await call(url, find_documents(), XCA_QUERY.request_action, config, pki, security=sec2)
    assert_fault(reply, WSSE_INVALID_SECURITY)
    await assert_still_serving(gw, config, pki)


async def test_sha1_assertions_need_allow_sha1(config: Config, pki: CertSet, start_gateway: Any,
                                               tmp_path: Path) -> None:
    url_path = XCA_QUERY.path
    strict = start_gateway(config, HANDLERS)
    legacy_cfg = load_config(write_config(tmp_path / "legacy", pki, saml_extra="allow_sha1 = true"))
    legacy = start_gateway(legacy_cfg, HANDLERS)
    sha1 = config.model_copy(update={"saml": config.saml.model_copy(update={"signature_algorithm": "rsa-sha1"})})
    reply = await call(strict.url + url_path, find_documents(), XCA_QUERY.request_action, config, pki,
                       security=security_header(sha1, strict.url + url_path))
    assert_fault(reply, WSSE_UNSUPPORTED_ALGORITHM, fragment="sha1")
    reply = await call(legacy.url + url_path, find_documents(), XCA_QUERY.request_action, config, pki,
                       security=security_header(sha1, legacy.url + url_path))
    assert reply.fault is None
