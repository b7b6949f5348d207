"""ATNA end to end: two real XIG communities audit every exchange to a real rsyslog over mutual TLS.

Community B's responding gateway and community A's import station each send their DICOM audit messages
(RFC 5425 syslog over TLS) to one rsyslogd. After A pulls B's priors, the repository holds, from both
sides, the ITI-55 / ITI-38 / ITI-39 / RAD-75 events and the local PACS legs, each naming the SAML user,
the partner community and the patient or studies — and B's refusals (an untrusted TLS client, a bad
assertion, a RAD-75 UID guess) plus its start and stop. Every message validates against the schema.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import syslog
from gateway.audit.assembly import audit_session
from gateway.audit.model import AuditMessage
from gateway.audit.xml import parse, validate
from gateway.config import Config, load_config
from gateway.dicom.synth import make_study
from gateway.initiating.client import ImageRequest, PartnerClient, open_soap_client
from gateway.initiating.partners import PartnerDirectory
from gateway.initiating.pull import PullPriors, PullRequest
from gateway.pacs.factory import open_backends
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header, signer_name_id
from gateway.security.tls import client_context
from gateway.soap import mtom
from gateway.store.db import open_database
from gateway.store.jobs import SqlJobStore
from gateway.store.ledger import SqlPatientLinks
from gateway.web.client import SoapClient, TransportError
from gateway.web.server import BackgroundServer
from tests.conftest import write_config
from tests.rsyslog import Rsyslog
from tests.test_gateway_e2e import find_documents

B_HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.202"
A_HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.201"


def community(tmp_path: Path, pki: CertSet, name: str, hcid: str, rsyslog: Rsyslog, extra: str = "") -> Config:
    oid = hcid.removeprefix("urn:oid:")
    return load_config(write_config(tmp_path / name, pki, ids={
        "home_community_id": hcid, "assigning_authority": f"{oid}.1", "repository_unique_id": f"{oid}.2",
        "imaging_source_id": f"{oid}.3"}, extra=f"""
[database]
url = "sqlite:///xig.db"

[audit]
source_id = "XIG-{name.upper()}"

[[audit.repositories]]
name = "arr"
transport = "tls"
host = "127.0.0.1"
port = {rsyslog.tls_port}
ca = "{pki.ca_cert}"
{extra}"""))


@pytest.fixture
def rsyslog(tmp_path: Path, pki: CertSet) -> Iterator[Rsyslog]:
    rs = Rsyslog(tmp_path / "rsyslog", certificate=pki.partner_cert, private_key=pki.partner_key,
                 client_ca=pki.ca_cert).start()
    yield rs
    rs.stop()


def received(rs: Rsyslog) -> list[AuditMessage]:
    out = []
    for m in rs.audit_messages():
        assert m.pri == syslog.PRI and m.msgid == "IHE+RFC-3881"
        validate(m.msg)
        out.append(parse(m.msg))
    return out


def by_source(messages: list[AuditMessage], source: str) -> list[AuditMessage]:
    return [m for m in messages if m.source.source_id == source]


def event(m: AuditMessage) -> str:
    return next((t.code for t in m.event_types if t.system == "IHE Transactions"), m.event_id.code)


def user_names(m: AuditMessage) -> list[str]:
    return [p.user_name for p in m.participants if p.user_name]


def has(messages: list[AuditMessage], predicate: Any) -> bool:
    return any(predicate(m) for m in messages)


async def test_both_communities_audit_every_exchange_to_the_repository(
        tmp_path: Path, pki: CertSet, rogue_pki: CertSet, rsyslog: Rsyslog) -> None:
    b = community(tmp_path, pki, "b", B_HCID, rsyslog)
    server = BackgroundServer(b).start()
    study = make_study(tmp_path / "seed", patient_id="B-77", patient_name="Rivera^Ana", birth_date="19750612",
                       sex="F", accession="b1", study_description="CT chest", series=(("CT", 3, "CHEST"),),
                       seed="audit")
    assert server.services.community.backends[0].inner.index_directory(tmp_path / "seed").ok
    a = community(tmp_path, pki, "a", A_HCID, rsyslog, extra=f"""
[[partners]]
name = "Community B"
home_community_id = "{B_HCID}"
xcpd_url = "{server.url}/ihe/xcpd"
xca_query_url = "{server.url}/ihe/xca/query"
xca_retrieve_url = "{server.url}/ihe/xca/retrieve"
xcai_retrieve_url = "{server.url}/ihe/xcai/retrieve"
""")
    guessed = study.instances[0]
    try:
        engine = open_database(a.database.url, a.base_dir)
        with audit_session(a, engine) as auditor:
            # 1. a RAD-75 for an instance whose manifest A never retrieved: refused, and a security alert at B
            partner = PartnerDirectory.from_config(a).resolve(B_HCID)
            assert partner is not None
            async with open_soap_client(a) as soap:
                outcome = await PartnerClient(a, partner, soap).retrieve_images(
                    [ImageRequest(B_HCID, f"{B_HCID.removeprefix('urn:oid:')}.3", guessed.StudyInstanceUID,
                                  guessed.SeriesInstanceUID, guessed.SOPInstanceUID)],
                    sink_factory=lambda _: mtom.FileSink(tmp_path / "guess"))
            assert not outcome.results[guessed.SOPInstanceUID].ok
            # 2. the whole pull
            local = open_backends(a, engine, auditor=auditor)[0]
            job = PullPriors(a, SqlJobStore(engine), SqlPatientLinks(engine), local, auditor=auditor)
            found = await job.discover(PullRequest("RIVERA", "Ana", "19750612", "F", local_id="A-1"))
            result = await job.run(found.job_id)
            assert result.complete and result.counts == {"stored": 3}
            await local.aclose()
        engine.dispose()
        # 3. refusals at B: an untrusted TLS client, then an unsigned request
        url = server.url + "/ihe/xca/query"
        async with SoapClient(client_context(rogue_pki.partner_cert, rogue_pki.partner_key, pki.ca_cert)) as c:
            with pytest.raises(TransportError):
                await c.call(url, find_documents(), "urn:ihe:iti:2007:CrossGatewayQuery",
                             security=security_header(b, url))
        async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
            reply = await c.call(url, find_documents(), "urn:ihe:iti:2007:CrossGatewayQuery", security=None)
            assert reply.fault is not None
    finally:
        server.stop()  # 4. the application stop is audited too, and B's trail drains before it closes

    rsyslog.wait_for(lambda got: has(by_source(received(rsyslog), "XIG-B"),
                                     lambda m: [t.code for t in m.event_types] == ["110121"]))
    messages = received(rsyslog)
    b_side, a_side = by_source(messages, "XIG-B"), by_source(messages, "XIG-A")
    a_user = f"<{signer_name_id(a)}@{a.saml_issuer}>"  # alias<user@issuer>, NameID = A's signer subject
    patient_at_b = f"B-77^^^&{B_HCID.removeprefix('urn:oid:')}.1&ISO"

    # B, responding: who saw which patient's images, when and why
    xcpd = [m for m in b_side if event(m) == "ITI-55"]
    assert xcpd and all(m.event_id.code == "110112" for m in xcpd)
    assert has(xcpd, lambda m: patient_at_b in [o.object_id for o in m.objects])
    assert all(a_user in user_names(m) for m in xcpd)  # both sides name the same user
    assert all([c.code for c in m.purposes_of_use] == ["TREATMENT"] for m in xcpd)
    assert has(b_side, lambda m: event(m) == "ITI-38" and patient_at_b in [o.object_id for o in m.objects])
    assert has(b_side, lambda m: event(m) == "ITI-39" and m.event_id.code == "110106" and m.outcome == 0)
    rad75 = [m for m in b_side if event(m) == "RAD-75" and m.outcome == 0]
    assert rad75 and all(m.event_id.code == "110104" for m in rad75)
    assert has(rad75, lambda m: study.StudyInstanceUID in [o.object_id for o in m.objects])
    # the PACS legs B made on A's user's behalf
    assert has(b_side, lambda m: m.event_id.code == "110112" and event(m) != "ITI-55" and event(m) != "ITI-38")
    assert has(b_side, lambda m: m.event_id.code == "110104" and event(m) == "110104" and m.action == "R")
    # refusals: the UID guess, the rogue TLS client, the unsigned request
    alert = [m for m in b_side if m.event_id.code == "110113" and [t.code for t in m.event_types] == ["110132"]]
    assert alert and any(d[1] == guessed.SOPInstanceUID.encode() for o in alert[0].objects for d in o.details)
    assert has(b_side, lambda m: m.event_id.code == "110113" and [t.code for t in m.event_types] == ["110126"])
    assert has(b_side, lambda m: m.event_id.code == "110114" and m.outcome != 0)
    assert has(b_side, lambda m: [t.code for t in m.event_types] == ["110120"])  # start

    # A, initiating: the same exchanges from the other side, with the user A asserted
    for transaction, event_id in (("ITI-55", "110112"), ("ITI-38", "110112"), ("ITI-39", "110107"),
                                  ("RAD-75", "110103")):
        mine = [m for m in a_side if event(m) == transaction]
        assert mine and all(m.event_id.code == event_id for m in mine), transaction
        assert all(a_user in user_names(m) for m in mine), (transaction, [user_names(m) for m in mine])
    assert has(a_side, lambda m: event(m) == "RAD-75" and m.outcome != 0)  # the refused guess, audited as failed
    assert has(a_side, lambda m: m.event_id.code == "110104" and m.action == "C"
               and study.StudyInstanceUID in [o.object_id for o in m.objects])  # stored into A's PACS
    hcid_details = [base64.b64encode(v) for m in a_side if event(m) == "ITI-38" for o in m.objects
                    for k, v in o.details if "homeCommunityId" in k]
    assert hcid_details and all(base64.b64decode(v).decode() == B_HCID for v in hcid_details)
