"""The responding gateway end to end over mutual TLS with signed assertions, on the embedded store.

XCPD finds the patient, ITI-38 lists one on-demand KOS entry per study, ITI-39 returns a KOS that
`dciodvfy` accepts and that references every instance; unchanged content gives the same uid and
bytes, a study that gained an image gives a new manifest.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import Config, load_config
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import make_instance, make_study
from gateway.ihe import ebrim, iti38, iti39, iti55
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap.schema import default_schemas
from gateway.web.client import SoapClient, SoapReply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCPD
from gateway.web.server import BackgroundServer
from tests.conftest import IHE_TEST_IDS, write_config

HCID = IHE_TEST_IDS["home_community_id"]
AA = IHE_TEST_IDS["assigning_authority"]
REPO = IHE_TEST_IDS["repository_unique_id"]
SOURCE = IHE_TEST_IDS["imaging_source_id"]


@pytest.fixture
def community(tmp_path: Path, pki: CertSet) -> Any:
    cfg = load_config(write_config(tmp_path / "gw", pki, extra='[database]\nurl = "sqlite:///xig.db"',
                                   ids=IHE_TEST_IDS))
    server = BackgroundServer(cfg).start()
    store = server.services.community.backends[0]
    studies = [
        make_study(tmp_path / "in" / "s1", patient_id="PAT-1", patient_name="Müller^José", birth_date="19700405",
                   sex="M", accession="ACC1", study_description="CT chest", study_date="20240115",
                   series=(("CT", 3, "CHEST"), ("CT", 2, "CHEST"), ("PR", 1, "")), seed=1),
        make_study(tmp_path / "in" / "s2", patient_id="PAT-1", patient_name="Müller^José", birth_date="19700405",
                   sex="M", accession="ACC2", study_description="MR brain", study_date="20230301",
                   series=(("MR", 2, "BRAIN"),), seed=2),
        make_study(tmp_path / "in" / "s3", patient_id="PAT-2", patient_name="Other^Olga", birth_date="19811111",
                   sex="F", series=(("US", 1, "ABDOMEN"),), seed=3),
    ]
    report = store.index_directory(tmp_path / "in")
    assert report.ok
    yield cfg, server, store, studies
    server.stop()


async def call(cfg: Config, pki: CertSet, url: str, body: etree._Element, action: str, **kw: Any) -> SoapReply:
    async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
        reply = await c.call(url, body, action, security=security_header(cfg, url), **kw)
    assert reply.fault is None, reply.fault
    assert default_schemas().errors(reply.body) == []
    return reply


async def discover(cfg: Config, pki: CertSet, url: str, family: str, given: str, birth: str,
                   gender: str) -> iti55.PatientDiscoveryResult:
    body, _ = iti55.build_request(
        PatientDemographics(names=(PersonName(family=(family,), given=(given,)),), gender=gender, birth_time=birth),
        sender_device_id="2.999.2", home_community_id="urn:oid:2.999.2", receiver_device_id=HCID[8:],
        assigning_authority="2.999.2.1", local_patient_id="REMOTE-9")
    reply = await call(cfg, pki, url + XCPD.path, body, XCPD.request_action)
    assert reply.action == XCPD.response_action
    return iti55.parse_response(reply.body)


async def test_xcpd_then_query_then_kos(community: Any, pki: CertSet, tmp_path: Path) -> None:
    cfg, server, store, studies = community
    # ITI-55: accent- and case-insensitive match; the patient id is in our assigning authority
    result = await discover(cfg, pki, server.url, "MULLER", "jose", "19700405", "M")
    assert result.status == "match" and result.query_response_code == "OK" and len(result.patients) == 1
    patient = result.patients[0]
    assert (patient.patient_id.root, patient.patient_id.extension) == (AA, "PAT-1")
    assert patient.home_community_id == HCID
    links = server.services.links.communities_for("PAT-1", AA)
    assert links == ["urn:oid:2.999.2"]
    assert (await discover(cfg, pki, server.url, "Nobody", "No", "19000101", "F")).query_response_code == "NF"

    # ITI-38: one on-demand KOS entry per study, newest first, full RAD TF-3 4.68 metadata
    q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("PAT-1", AA)))
    reply = await call(cfg, pki, server.url + XCA_QUERY.path, q, XCA_QUERY.request_action)
    res = iti38.parse_response(reply.body)
    assert res.status.endswith("Success") and len(res.entries) == 2
    e = res.entries[0]
    assert e.is_on_demand and e.mime_type == "application/dicom" and e.home_community_id == HCID
    assert e.format_code is not None and e.format_code.code == "1.2.840.10008.5.1.4.1.1.88.59"
    assert e.repository_unique_id == REPO
    assert {c.code for c in e.event_codes} == {"CT", "51185008"}  # PR is not an acquisition modality
    assert f"{studies[0].StudyInstanceUID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID" in e.reference_ids
    assert any(r.startswith("ACC1^") for r in e.reference_ids)
    assert e.service_start_time and e.service_start_time.startswith("20240115")
    assert e.source_patient_info is not None and e.source_patient_info.birth_date == "19700405"
    # without $XDSDocumentEntryType only Stable entries are asked for: none here
    stable_only = iti38.build_query(iti38.FindDocumentsParams(patient_id=ebrim.CX("PAT-1", AA)))
    reply = await call(cfg, pki, server.url + XCA_QUERY.path, stable_only, XCA_QUERY.request_action)
    assert iti38.parse_response(reply.body).entries == []

    # ITI-39: the KOS, generated now, references every instance and passes dciodvfy
    req = iti39.build_request([iti39.DocumentRequest(HCID, REPO, e.unique_id)])
    reply = await call(cfg, pki, server.url + XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action, use_mtom=True)
    got = iti39.parse_response(reply.body, reply.attachments)
    assert got.status.endswith("Success") and len(got.documents) == 1
    doc = got.documents[0]
    kos_bytes = doc.data if doc.data is not None else doc.attachment
    assert doc.new_document_unique_id and doc.new_document_unique_id != e.unique_id
    kos = parse_kos(kos_bytes)
    assert kos.sop_instance_uid == doc.new_document_unique_id
    assert {r.sop_instance_uid for r in kos.references} == {i.SOPInstanceUID for i in studies[0].instances}
    assert {r.retrieve_location_uid for r in kos.references} == {SOURCE}
    path = tmp_path / "kos.dcm"
    path.write_bytes(kos_bytes)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert "Error" not in out.stdout + out.stderr, out.stdout + out.stderr
    # the delivery is in the ledger: those instances are now retrievable by that community only
    allowed = server.services.ledger.authorized([i.SOPInstanceUID for i in studies[0].instances],
                                                HCID, dt.timedelta(hours=1))
    assert len(allowed) == len(studies[0].instances)

    # unchanged study → same new uid, byte-identical KOS
    reply2 = await call(cfg, pki, server.url + XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action, use_mtom=True)
    doc2 = iti39.parse_response(reply2.body, reply2.attachments).documents[0]
    assert doc2.new_document_unique_id == doc.new_document_unique_id
    data2 = doc2.data if doc2.data is not None else doc2.attachment
    assert data2 == kos_bytes
    # a study that gained an image → a new manifest
    series = studies[0].series[0]
    make_instance(tmp_path / "more" / "x.dcm", patient_id="PAT-1", patient_name="Müller^José", birth_date="19700405",
                  sex="M", accession="ACC1", study_description="CT chest", study_uid=studies[0].StudyInstanceUID,
                  series_uid=series.SeriesInstanceUID, modality="CT", body_part="CHEST", instance_number=9, seed=99)
    assert store.index_directory(tmp_path / "more").ok
    reply3 = await call(cfg, pki, server.url + XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action, use_mtom=True)
    doc3 = iti39.parse_response(reply3.body, reply3.attachments).documents[0]
    assert doc3.new_document_unique_id != doc.new_document_unique_id


async def test_registry_errors(community: Any, pki: CertSet) -> None:
    cfg, server, _, _ = community
    url = server.url
    q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("PAT-1", "1.2.3.4")))
    res = iti38.parse_response((await call(cfg, pki, url + XCA_QUERY.path, q, XCA_QUERY.request_action)).body)
    assert [e.code for e in res.errors] == ["XDSUnknownPatientId"] and res.status.endswith("Failure")
    assert HCID in (res.errors[0].location or "")
    reqs = [iti39.DocumentRequest(HCID, REPO, "1.2.404"),
            iti39.DocumentRequest(HCID, "9.9.9", "1.2.405"),
            iti39.DocumentRequest("urn:oid:7.7.7", REPO, "1.2.406")]
    reply = await call(cfg, pki, url + XCA_RETRIEVE.path, iti39.build_request(reqs), XCA_RETRIEVE.request_action,
                       use_mtom=True)
    got = iti39.parse_response(reply.body, reply.attachments)
    assert [e.code for e in got.errors] == ["XDSDocumentUniqueIdError", "XDSUnknownRepositoryId",
                                            "XDSUnknownCommunity"]
    assert got.status.endswith("Failure") and reply.is_mtom


async def test_stable_entry_mode(tmp_path: Path, pki: CertSet) -> None:
    """``kos_entry_type = "stable"``: the KOS of the current content, with size and hash, as a Stable entry."""
    import hashlib

    cfg = load_config(write_config(tmp_path / "gw", pki, ids=IHE_TEST_IDS,
                                   extra='[responder]\nkos_entry_type = "stable"'))
    server = BackgroundServer(cfg).start()
    try:
        make_study(tmp_path / "in", patient_id="ST-1", patient_name="Stable^Sue", birth_date="19900101", sex="F",
                   series=(("MR", 2, "KNEE"),), seed="stable")
        assert server.services.community.backends[0].index_directory(tmp_path / "in").ok
        q = iti38.build_query(iti38.FindDocumentsParams(patient_id=ebrim.CX("ST-1", AA)))  # Stable only
        res = iti38.parse_response((await call(cfg, pki, server.url + XCA_QUERY.path, q,
                                               XCA_QUERY.request_action)).body)
        assert len(res.entries) == 1
        e = res.entries[0]
        assert not e.is_on_demand and e.size and e.hash
        req = iti39.build_request([iti39.DocumentRequest(HCID, REPO, e.unique_id)])
        reply = await call(cfg, pki, server.url + XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action,
                           use_mtom=True)
        doc = iti39.parse_response(reply.body, reply.attachments).documents[0]
        data = doc.data if doc.data is not None else doc.attachment
        assert doc.new_document_unique_id is None and doc.document_unique_id == e.unique_id
        assert len(data) == e.size and hashlib.sha1(data).hexdigest() == e.hash  # noqa: S324 - XDS hash
        assert parse_kos(data).sop_instance_uid == e.unique_id
    finally:
        server.stop()
