"""RAD-75 end to end: a partner retrieves a study's images through XIG from a real Orthanc.

ITI-38 → ITI-39 (the KOS; its delivery authorises the instances) → RAD-75 over mutual TLS with a
signed assertion, for the DICOMweb and the DIMSE backends and both MTOM layouts. Every instance
comes back as the PACS's own Part 10 object (same UIDs, same pixels, same transfer syntax).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.config import Config, load_config
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.ihe import ebrim, iti38, iti39, rad75
from gateway.ihe.iti39 import DocumentRequest
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom
from gateway.soap.schema import default_schemas
from gateway.web.client import SoapClient, SoapReply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE
from gateway.web.server import BackgroundServer
from tests.conftest import IHE_TEST_IDS, write_config
from tests.orthanc import OrthancServer

HCID = IHE_TEST_IDS["home_community_id"]
AA = IHE_TEST_IDS["assigning_authority"]
REPO = IHE_TEST_IDS["repository_unique_id"]
SOURCE = IHE_TEST_IDS["imaging_source_id"]
EVRLE = "1.2.840.10008.1.2.1"
JPIP = "1.2.840.10008.1.2.4.94"


@pytest.fixture(scope="module")
def seeded(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    study = make_study(tmp_path_factory.mktemp("rad75-study"), patient_id="RAD75-P1", patient_name="Imaging^Ida",
                       birth_date="19650302", sex="F", accession="RADACC1", study_description="CT abdomen",
                       series=(("CT", 4, "ABDOMEN"), ("CT", 3, "ABDOMEN")), seed="rad75")
    orthanc.upload(study.paths)
    return study


def pacs_section(kind: str, orthanc: OrthancServer) -> str:
    if kind == "dicomweb":
        return f'[pacs]\nkind = "dicomweb"\nurl = "{orthanc.dicomweb_url}"\n'
    return (f'[pacs]\nkind = "dimse"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
            f'called_ae = "{orthanc.aet}"\ncalling_ae = "XIG"\n')


@pytest.fixture(params=[("dicomweb", "first"), ("dimse", "first"), ("dicomweb", "last")],
                ids=["dicomweb-root-first", "dimse-root-first", "dicomweb-root-last"])
def gateway(request: pytest.FixtureRequest, orthanc: OrthancServer, pki: CertSet, tmp_path: Path,
            seeded: SyntheticStudy) -> Any:
    kind, root = request.param
    path = write_config(tmp_path / "gw", pki, ids=IHE_TEST_IDS)
    text = path.read_text().replace('[pacs]\nkind = "filesystem"\npath = "pacs"\n', pacs_section(kind, orthanc))
    path.write_text(text + f'\n[responder]\nrad75_root_part = "{root}"\n')
    cfg = load_config(path)
    server = BackgroundServer(cfg).start()
    yield cfg, server
    server.stop()


async def call(cfg: Config, pki: CertSet, url: str, body: Any, action: str, **kw: Any) -> SoapReply:
    async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
        reply = await c.call(url, body, action, security=security_header(cfg, url), **kw)
    assert reply.fault is None, reply.fault
    assert default_schemas().errors(reply.body) == []
    return reply


async def manifest(cfg: Config, pki: CertSet, base: str) -> Any:
    q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("RAD75-P1", AA)))
    entries = iti38.parse_response((await call(cfg, pki, base + XCA_QUERY.path, q, XCA_QUERY.request_action)).body)
    assert len(entries.entries) == 1
    req = iti39.build_request([DocumentRequest(HCID, REPO, entries.entries[0].unique_id)])
    reply = await call(cfg, pki, base + XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action, use_mtom=True)
    doc = iti39.parse_response(reply.body, reply.attachments).documents[0]
    return parse_kos(doc.data if doc.data is not None else doc.attachment)


def imaging_request(items: list[tuple[str, str, str, str]], syntaxes: list[str]) -> Any:
    return rad75.build_request(rad75.imaging_request(
        [(st, se, DocumentRequest(HCID, repo, sop)) for st, se, sop, repo in items], syntaxes))


async def test_retrieve_whole_study(gateway: Any, pki: CertSet, seeded: SyntheticStudy, tmp_path: Path) -> None:
    cfg, server = gateway
    kos = await manifest(cfg, pki, server.url)
    items = [(r.study_uid, r.series_uid, r.sop_instance_uid, r.retrieve_location_uid) for r in kos.references]
    assert {i[3] for i in items} == {SOURCE} and len(items) == 7
    out = tmp_path / "images"
    out.mkdir()
    reply = await call(cfg, pki, server.url + XCAI_RETRIEVE.path, imaging_request(items, [EVRLE]),
                       XCAI_RETRIEVE.request_action, use_mtom=True, sink_factory=lambda _: mtom.FileSink(out))
    assert reply.action == XCAI_RETRIEVE.response_action
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":Success") and not res.errors
    expected = {i.SOPInstanceUID: i for i in seeded.instances}
    assert {d.document_unique_id for d in res.documents} == set(expected)
    for d in res.documents:
        assert d.mime_type == "application/dicom" and d.home_community_id == HCID and d.repository_unique_id == SOURCE
        ds = pydicom.dcmread(Path(d.attachment))
        assert ds.SOPInstanceUID == d.document_unique_id
        assert ds.file_meta.TransferSyntaxUID == EVRLE
        assert hashlib.sha256(ds.PixelData).hexdigest() == expected[d.document_unique_id].pixel_sha256


async def test_refusals_and_partial_success(gateway: Any, pki: CertSet, seeded: SyntheticStudy) -> None:
    cfg, server = gateway
    kos = await manifest(cfg, pki, server.url)
    good = kos.references[0]
    st, se = good.study_uid, good.series_uid
    items = [(st, se, good.sop_instance_uid, SOURCE),
             (st, se, "1.2.3.999.404", SOURCE),            # never delivered in a KOS: refused like a guess
             (st, se, kos.references[1].sop_instance_uid, "1.2.3.4.5")]  # unknown repository
    reply = await call(cfg, pki, server.url + XCAI_RETRIEVE.path, imaging_request(items, [EVRLE]),
                       XCAI_RETRIEVE.request_action, use_mtom=True)
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":PartialSuccess")
    assert [d.document_unique_id for d in res.documents] == [good.sop_instance_uid]
    assert [e.code for e in res.errors] == ["XDSDocumentUniqueIdError", "XDSUnknownRepositoryId"]
    assert all(HCID in (e.location or "") for e in res.errors)
    # only a syntax nobody can produce: a per-instance XDSRepositoryError explaining the encoding problem
    reply = await call(cfg, pki, server.url + XCAI_RETRIEVE.path, imaging_request(items[:1], [JPIP]),
                       XCAI_RETRIEVE.request_action, use_mtom=True)
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":Failure") and [e.code for e in res.errors] == ["XDSRepositoryError"]
    assert "transfer syntax" in res.errors[0].context.lower()


async def test_other_community_cannot_use_our_manifest(gateway: Any, pki: CertSet, tmp_path: Path) -> None:
    """A second community (another HCID in its assertion) has not retrieved the KOS: refused."""
    cfg, server = gateway
    kos = await manifest(cfg, pki, server.url)
    other = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"home_community_id": "urn:oid:2.999.77"})})
    r = kos.references[0]
    url = server.url + XCAI_RETRIEVE.path
    async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
        reply = await c.call(url, imaging_request([(r.study_uid, r.series_uid, r.sop_instance_uid, SOURCE)], [EVRLE]),
                             XCAI_RETRIEVE.request_action, use_mtom=True, security=security_header(other, url))
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.documents == [] and [e.code for e in res.errors] == ["XDSDocumentUniqueIdError"]


async def test_pacs_gone_mid_flight(pki: CertSet, tmp_path: Path, seeded: SyntheticStudy) -> None:
    """The PACS dies after the manifest was delivered: every instance gets an error, the response stays
    well-formed and schema-valid, and the gateway keeps serving."""
    own = OrthancServer(tmp_path / "orthanc").start()
    try:
        own.upload(seeded.paths)
        path = write_config(tmp_path / "gw", pki, ids=IHE_TEST_IDS)
        path.write_text(path.read_text().replace('[pacs]\nkind = "filesystem"\npath = "pacs"\n',
                                                 pacs_section("dicomweb", own)))
        cfg = load_config(path)
        server = BackgroundServer(cfg).start()
        try:
            kos = await manifest(cfg, pki, server.url)
            own.kill()
            items = [(r.study_uid, r.series_uid, r.sop_instance_uid, SOURCE) for r in kos.references]
            reply = await call(cfg, pki, server.url + XCAI_RETRIEVE.path, imaging_request(items, [EVRLE]),
                               XCAI_RETRIEVE.request_action, use_mtom=True)
            res = rad75.parse_response(reply.body, reply.attachments)
            assert res.status.endswith(":Failure") and res.documents == []
            assert len(res.errors) == len(items)
            assert {e.code for e in res.errors} == {"XDSRepositoryError"}  # could not deliver, not "unknown"
            # still serving: the query answers (with a registry error: the archive is gone)
            q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("RAD75-P1", AA)))
            reply = await call(cfg, pki, server.url + XCA_QUERY.path, q, XCA_QUERY.request_action)
            assert [e.code for e in iti38.parse_response(reply.body).errors] == ["XDSRegistryError"]
        finally:
            server.stop()
    finally:
        own.stop()


async def test_repeated_document_request_answered_once_each(gateway: Any, pki: CertSet) -> None:
    """The same instance asked twice: fetched once, two DocumentResponses (sharing one attachment)."""
    cfg, server = gateway
    kos = await manifest(cfg, pki, server.url)
    r = kos.references[0]
    item = (r.study_uid, r.series_uid, r.sop_instance_uid, SOURCE)
    reply = await call(cfg, pki, server.url + XCAI_RETRIEVE.path, imaging_request([item, item], [EVRLE]),
                       XCAI_RETRIEVE.request_action, use_mtom=True)
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":Success") and not res.errors
    assert [d.document_unique_id for d in res.documents] == [r.sop_instance_uid] * 2
    assert len(reply.attachments) == 1
