"""Test data and gateways for the conformance suite's own tests.

* :func:`seed` loads the conformance test data into the (real) Orthanc: the test patient CONFORMITY^Cora
  with a two-series CT study and an MR study, and her namesake CONFORMITY^Cecilia (same family name, birth
  date and gender) whom the ``xcpd-multiple`` scenario needs.
* :func:`responder_config` is a real XIG responding gateway on that Orthanc (DICOMweb), :func:`runner_config`
  the initiating side's configuration whose ``[[partners]]`` entry points at it.
* :func:`start_responder` starts such a gateway — the real one, or one with *one thing deliberately broken*
  (the negative tests): a wrapped transaction handler that spoils its answer (:data:`BREAKAGES`), an ASGI
  middleware that rewrites the SOAP framing on the wire (:func:`rewrite_action`, :func:`drop_relates_to`),
  or a front end that accepts any assertion (:func:`accept_any_assertion`). Everything else is XIG as shipped.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pydicom
from lxml import etree

from gateway.config import Config, load_config
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.errors import SoapFault
from gateway.ihe import ebrim
from gateway.responding.assembly import RespondingServices
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.soap import mtom, ns, xml
from gateway.web.app import Handler, RequestContext, SoapResponse
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD, Endpoint
from gateway.web.handlers import responding_handlers
from gateway.web.server import BackgroundServer
from tests.conftest import IHE_TEST_IDS, write_config
from tests.orthanc import OrthancServer

#: the test patient of the [conformance] section
FAMILY, GIVEN, BIRTH_DATE, GENDER = "CONFORMITY", "Cora", "19310611", "F"
PATIENT_ID, SIBLING_ID = "CONF-P1", "CONF-P2"
RUNNER_HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.202"


def seed(orthanc: OrthancServer, directory: Path) -> list[SyntheticStudy]:
    """Write and upload the conformance test data (idempotent: same UIDs every time)."""
    name = f"{FAMILY}^{GIVEN}"
    studies = [
        make_study(directory / "ct", patient_id=PATIENT_ID, patient_name=name, birth_date=BIRTH_DATE, sex=GENDER,
                   accession="CONFACC1", study_description="CT chest", study_date="20230105",
                   series=(("CT", 3, "CHEST"), ("CT", 2, "CHEST")), seed="conformance"),
        make_study(directory / "mr", patient_id=PATIENT_ID, patient_name=name, birth_date=BIRTH_DATE, sex=GENDER,
                   accession="CONFACC2", study_description="MR head", study_date="20240210",
                   series=(("MR", 2, "HEAD"),), seed="conformance"),
        make_study(directory / "sibling", patient_id=SIBLING_ID, patient_name=f"{FAMILY}^Cecilia",
                   birth_date=BIRTH_DATE, sex=GENDER, accession="CONFACC3", study_description="CR chest",
                   series=(("CR", 1, "CHEST"),), seed="conformance"),
    ]
    for s in studies:
        orthanc.upload(s.paths)
    return studies


def responder_config(directory: Path, pki: CertSet, orthanc: OrthancServer, extra: str = "") -> Config:
    """A responding gateway with the IHE test OIDs on Orthanc's DICOMweb."""
    path = write_config(directory, pki, ids=IHE_TEST_IDS)
    text = path.read_text().replace('[pacs]\nkind = "filesystem"\npath = "pacs"\n',
                                    f'[pacs]\nkind = "dicomweb"\nurl = "{orthanc.dicomweb_url}"\n')
    path.write_text(text + extra)
    return load_config(path)


def runner_config(directory: Path, pki: CertSet, responder: BackgroundServer, *, family: str = FAMILY,
                  partner_name: str = "Community under test", extra: str = "") -> Path:
    """The tester's configuration: its own community, the responder as its only ``[[partners]]``."""
    base = responder.url
    conformance = (f'\n[conformance]\nfamily = "{family}"\ngiven = "{GIVEN}"\nbirth_date = "{BIRTH_DATE}"\n'
                   f'gender = "{GENDER}"\n')
    partners = (f'\n[[partners]]\nname = "{partner_name}"\n'
                f'home_community_id = "{responder.config.gateway.home_community_id}"\n'
                f'xcpd_url = "{base}{XCPD.path}"\nxca_query_url = "{base}{XCA_QUERY.path}"\n'
                f'xca_retrieve_url = "{base}{XCA_RETRIEVE.path}"\nxcai_retrieve_url = "{base}{XCAI_RETRIEVE.path}"\n'
                "timeout_seconds = 30\n")
    return write_config(directory, pki, ids={"home_community_id": RUNNER_HCID},
                        extra=conformance + partners + extra)


# --------------------------------------------------------------------------------------------------
# Breaking one thing
# --------------------------------------------------------------------------------------------------

Transform = Callable[[RequestContext, SoapResponse], Awaitable[SoapResponse]]


def _after(handlers: dict[str, Handler], endpoint: Endpoint, transform: Transform) -> dict[str, Handler]:
    """``handlers`` with ``endpoint``'s answer passed through ``transform`` before it is sent."""
    inner = handlers[endpoint.transaction]

    async def wrapped(ctx: RequestContext) -> SoapResponse:
        return await transform(ctx, await inner(ctx))

    return {**handlers, endpoint.transaction: wrapped}


def _rim(local: str) -> str:
    return ns.q(ns.RIM, local)


async def _drop_format_code(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    assert r.body is not None
    for cl in list(r.body.iter(_rim("Classification"))):
        if cl.get("classificationScheme") == ebrim.FORMAT_CODE_SCHEME:
            cl.getparent().remove(cl)
    return r


async def _drop_home(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    assert r.body is not None
    for el in list(r.body.iter(_rim("ObjectRef"))) + list(r.body.iter(_rim("ExtrinsicObject"))):
        el.attrib.pop("home", None)
    return r


async def _schema_invalid(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    assert r.body is not None
    etree.SubElement(r.body, "{urn:xig:broken}Unexpected").text = "not allowed by query.xsd"
    return r


async def _case_contradiction(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    """A match reported with queryResponseCode NF (XSD-valid, but no ITI-55 case)."""
    assert r.body is not None
    hl7 = {"h": ns.HL7}
    if r.body.findall(".//h:registrationEvent", namespaces=hl7):
        for code in r.body.findall(".//h:queryAck/h:queryResponseCode", namespaces=hl7):
            code.set("code", "NF")
    return r


async def _drop_new_document_id(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    assert r.body is not None
    for el in list(r.body.iter(ns.q(ns.XDSB, "NewDocumentUniqueId"))):
        el.getparent().remove(el)
    return r


def _replace_parts(r: SoapResponse, change: Callable[[bytes], bytes]) -> SoapResponse:
    parts = r.attachments
    assert isinstance(parts, list | tuple), "ITI-39 answers carry their parts as a list"
    fixed = []
    for p in parts:
        assert isinstance(p.body, bytes)
        fixed.append(mtom.Part(p.content_id, p.content_type, change(p.body), p.headers))
    return SoapResponse(r.body, fixed, r.body_after)


async def _garbage_kos(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    return _replace_parts(r, lambda data: b"\x00" * 128 + b"this is not a DICOM object" + data[200:260])


def _without_content_date(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.ContentDate
    del ds.ContentTime
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


async def _kos_missing_type1(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    """Readable, but Content Date/Time (Type 1 in the SR Document Content module) are gone."""
    return _replace_parts(r, _without_content_date)


async def _silent_registry(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    """Errors swallowed: Success and no RegistryErrorList, whatever happened."""
    assert r.body is not None
    for rr in r.body.iter(ns.q(ns.RS, "RegistryResponse")):
        rr.set("status", "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success")
        for lst in list(rr.iter(ns.q(ns.RS, "RegistryErrorList"))):
            rr.remove(lst)
    return r


async def _corrupt_first_instance(ctx: RequestContext, r: SoapResponse) -> SoapResponse:
    parts = r.attachments
    assert not isinstance(parts, list | tuple)

    async def corrupted() -> AsyncIterator[mtom.Part]:
        first = True
        async for part in parts:  # type: ignore[union-attr]
            if first:
                if not isinstance(part.body, bytes):
                    async for _ in part.body:  # drain the spooled instance
                        pass
                part = mtom.Part(part.content_id, part.content_type, b"\x00" * 132 + b"truncated garbage")
                first = False
            yield part

    return SoapResponse(r.body, corrupted(), r.body_after)


def _ignore_transfer_syntaxes(handlers: dict[str, Handler]) -> dict[str, Handler]:
    """RAD-75 as if every request asked for Explicit VR Little Endian: the TransferSyntaxUIDList is ignored."""
    inner = handlers[XCAI_RETRIEVE.transaction]

    async def wrapped(ctx: RequestContext) -> SoapResponse:
        for lst in ctx.body.iter(ns.q(ns.XDSI, "TransferSyntaxUIDList")):
            for child in list(lst):
                lst.remove(child)
            etree.SubElement(lst, ns.q(ns.XDSI, "TransferSyntaxUID")).text = "1.2.840.10008.1.2.1"
        return await inner(ctx)

    return {**handlers, XCAI_RETRIEVE.transaction: wrapped}


Breakage = Callable[[dict[str, Handler]], dict[str, Handler]]

#: name → how the handlers are broken
BREAKAGES: Mapping[str, Breakage] = {
    "drop-format-code": lambda h: _after(h, XCA_QUERY, _drop_format_code),
    "drop-home": lambda h: _after(h, XCA_QUERY, _drop_home),
    "schema-invalid-query-response": lambda h: _after(h, XCA_QUERY, _schema_invalid),
    "xcpd-case-contradiction": lambda h: _after(h, XCPD, _case_contradiction),
    "drop-new-document-id": lambda h: _after(h, XCA_RETRIEVE, _drop_new_document_id),
    "garbage-kos": lambda h: _after(h, XCA_RETRIEVE, _garbage_kos),
    "kos-missing-type1": lambda h: _after(h, XCA_RETRIEVE, _kos_missing_type1),
    "silent-retrieve-errors": lambda h: _after(h, XCA_RETRIEVE, _silent_registry),
    "corrupt-instance": lambda h: _after(h, XCAI_RETRIEVE, _corrupt_first_instance),
    "ignore-transfer-syntax": _ignore_transfer_syntaxes,
}


# --------------------------------------------------------------------------------------------------
# Breaking the wire: ASGI middleware on the response
# --------------------------------------------------------------------------------------------------

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def _rewrite_response(app: ASGIApp, change: Callable[[bytes], bytes]) -> ASGIApp:
    """Buffer each plain-SOAP response and rewrite its bytes (Content-Length recomputed); MTOM passes."""

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                types = [v for k, v in message.get("headers", []) if k.lower() == b"content-type"]
                if any(b"multipart/related" in v for v in types):
                    start["passthrough"] = True
                    await send(message)
                    return
                start.update(message)
                return
            if start.get("passthrough"):
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = change(b"".join(chunks))
                kept = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                kept.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": kept})
                await send({"type": "http.response.body", "body": body})

        await app(scope, receive, capture)

    return middleware


def rewrite_action(app: ASGIApp) -> ASGIApp:
    """ITI-38 responses announce the ITI-18 (local registry) Action instead of the XCA one."""
    return _rewrite_response(app, lambda b: b.replace(b"urn:ihe:iti:2007:CrossGatewayQueryResponse",
                                                      b"urn:ihe:iti:2007:RegistryStoredQueryResponse"))


_RELATES_TO = re.compile(rb"<(?:[A-Za-z0-9_]+:)?RelatesTo\b[^>]*>[^<]*</(?:[A-Za-z0-9_]+:)?RelatesTo>")


def drop_relates_to(app: ASGIApp) -> ASGIApp:
    """Responses without wsa:RelatesTo."""
    return _rewrite_response(app, lambda b: _RELATES_TO.sub(b"", b))


# --------------------------------------------------------------------------------------------------
# Breaking the security check
# --------------------------------------------------------------------------------------------------


def accept_any_assertion(config: Config) -> Callable[[ASGIApp], ASGIApp]:
    """A front end that vouches for every caller: whatever ``wsse:Security`` header a request carries (none,
    unsigned, expired, forged), it is replaced by a freshly signed, valid one before the gateway sees it — the
    "accepts any assertion" misconfiguration of a security proxy. The gateway behind it is unmodified."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
            content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-type"),
                                "")
            try:
                body, content_type = _vouch(config, scope, content_type, body)
            except SoapFault:
                pass  # not SOAP: let the gateway refuse it as usual
            headers += [(b"content-type", content_type.encode("latin-1")),
                        (b"content-length", str(len(body)).encode())]
            sent = False

            async def replay() -> Any:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await app({**scope, "headers": headers}, replay, send)

        return middleware

    return wrap


def _vouch(config: Config, scope: Any, content_type: str, body: bytes) -> tuple[bytes, str]:
    root, _ = mtom.decode_soap_body(content_type, body)
    env = xml.parse(root)
    header = env.find(ns.q(ns.SOAP12, "Header"))
    if header is None:
        header = etree.Element(ns.q(ns.SOAP12, "Header"))
        env.insert(0, header)
    for old in header.findall(ns.q(ns.WSSE, "Security")):
        header.remove(old)
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"), "localhost")
    header.append(security_header(config, f"https://{host}{scope['path']}"))
    data = xml.tostring(env, declaration=True)
    if mtom.parse_content_type(content_type).media_type != mtom.MULTIPART_RELATED:
        return data, content_type
    boundary, cid = mtom.new_boundary(), mtom.new_content_id("root")
    package = mtom.encode_mtom_bytes([mtom.Part(cid, mtom.ROOT_PART_CONTENT_TYPE, data)], boundary)
    return package, mtom.mtom_content_type(boundary, cid)


def start_responder(config: Config, *, breakage: str | None = None,
                    middleware: Callable[[ASGIApp], ASGIApp] | None = None) -> BackgroundServer:
    """A started XIG responding gateway for ``config`` with at most one thing broken; stop() it after use."""
    services = RespondingServices.open(config)
    handlers = responding_handlers(services)
    if breakage is not None:
        handlers = BREAKAGES[breakage](handlers)
    server = BackgroundServer(config, handlers)
    server.gateway_server.services = services  # closed by the server when it stops, in its own loop
    if middleware is not None:
        server.server.config.app = middleware(server.app)
    return server.start()
