"""``xig demo``: two communities on loopback, everything embedded, no external server.

Community B runs a responding gateway on the embedded filesystem store seeded with two synthetic
prior studies (test certificates from ``certs-example/``). A partner self-check shows it at work
over real mutual TLS with signed assertions (XCPD, ITI-38, ITI-39; an unsigned request and a caller
without a client certificate refused). Then community A's import station runs the pull-priors job:
discover → query → manifests → RAD-75 → reconcile → store in A's own embedded PACS.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from contextlib import ExitStack
from pathlib import Path

import httpx
from lxml import etree
from rich.console import Console

from gateway.config import Config, load_config
from gateway.resources import project_root
from gateway.security.certs import init_certs
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import ns
from gateway.web.client import SoapClient, TransportError
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCPD
from gateway.web.server import BackgroundServer

FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"

DEMO_CONFIG = """\
# written by `xig demo` — a responding gateway on the embedded filesystem store
[gateway]
home_community_id = "urn:oid:2.999.1"
assigning_authority = "2.999.1.1"
repository_unique_id = "2.999.1.2"
imaging_source_id = "2.999.1.3"
name = "XIG Demo Community"

[server]
listen = "127.0.0.1:{port}"
certificate = "{certs}/gateway.crt"
private_key = "{certs}/gateway.key"
client_ca = "{certs}/ca.crt"

[saml]
trusted_issuers = "{certs}/ca.crt"
signing_certificate = "{certs}/partner.crt"
signing_key = "{certs}/partner.key"
organization = "XIG Demo Partner"

[pacs]
kind = "filesystem"
path = "pacs"

[database]
url = "sqlite:///xig.db"
"""


def find_documents_request(patient_id: str) -> etree._Element:
    """A minimal ITI-38 FindDocuments query (ITI TF-2 3.18.4.1.2.3.7.1)."""
    req = etree.Element(ns.q(ns.QUERY, "AdhocQueryRequest"), nsmap={"query": ns.QUERY, "rim": ns.RIM})
    etree.SubElement(req, ns.q(ns.QUERY, "ResponseOption"), returnComposedObjects="true", returnType="LeafClass")
    query = etree.SubElement(req, ns.q(ns.RIM, "AdhocQuery"), id=FIND_DOCUMENTS)
    for name, value in (("$XDSDocumentEntryPatientId", f"'{patient_id}'"),
                        ("$XDSDocumentEntryStatus", "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')")):
        slot = etree.SubElement(query, ns.q(ns.RIM, "Slot"), name=name)
        etree.SubElement(etree.SubElement(slot, ns.q(ns.RIM, "ValueList")), ns.q(ns.RIM, "Value")).text = value
    return req


def _certs_dir(workdir: Path) -> Path:
    example = project_root() / "certs-example"
    if (example / "ca.crt").exists():
        return example
    return init_certs(workdir / "certs").directory


def _free(port: int) -> int:
    if port == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def prepare(workdir: Path, port: int) -> Config:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "pacs").mkdir(exist_ok=True)
    certs = _certs_dir(workdir).resolve()
    cfg_path = workdir / "xig.toml"
    cfg_path.write_text(DEMO_CONFIG.format(port=_free(port), certs=certs))
    return load_config(cfg_path)




def seed(server: BackgroundServer, workdir: Path) -> None:
    """Two prior studies for the demo patient in the embedded store (once)."""
    from gateway.dicom.synth import make_study

    store = server.services.community.backends[0]
    if store.list_patients():
        return
    incoming = workdir / "incoming"
    for name, accession, description, date, series in (
            ("ct", "A1001", "CT chest", "20240115", (("CT", 4, "CHEST"),)),
            ("mr", "A1002", "MR brain", "20230302", (("MR", 3, "BRAIN"), ("MR", 2, "BRAIN")))):
        make_study(incoming / name, patient_id="DEMO-1", patient_name="Doe^Dana", birth_date="19700405", sex="F",
                   accession=accession, study_description=description, study_date=date, series=series,
                   seed=f"demo-{name}")
    store.index_directory(incoming)
    shutil.rmtree(incoming, ignore_errors=True)


def _ok(console: Console, ok: bool, text: str) -> bool:
    console.print(f"[{'green' if ok else 'red'}]{'✓' if ok else '✗'}[/] {text}")
    return ok


async def self_check(cfg: Config, url: str, console: Console) -> bool:
    from gateway.dicom.kos import parse_kos
    from gateway.ihe import ebrim, iti38, iti39, iti55

    ok = True
    partner_tls = client_context(cfg.saml.signing_certificate, cfg.saml.signing_key, cfg.server.client_ca)
    async with httpx.AsyncClient(verify=partner_tls) as http:
        health = (await http.get(f"{url}/health")).json()
        ok &= _ok(console, health["status"] == "ok",
                  f"GET {url}/health → {health['status']}, community {health['home_community_id']}")
        wsdl = await http.get(f"{url}{XCA_QUERY.path}?wsdl")
        ok &= _ok(console, wsdl.status_code == 200, f"GET {url}{XCA_QUERY.path}?wsdl → IHE WSDL with its address")
    hcid, aa = cfg.gateway.home_community_id, cfg.gateway.assigning_authority
    async with SoapClient(partner_tls) as client:
        endpoint = url + XCPD.path
        body, _ = iti55.build_request(
            iti55.PatientDemographics(names=(iti55.PersonName(family=("DOE",), given=("dana",)),), gender="F",
                                      birth_time="19700405"),
            sender_device_id="2.999.2", home_community_id="urn:oid:2.999.2", receiver_device_id=hcid[8:])
        reply = await client.call(endpoint, body, XCPD.request_action, security=security_header(cfg, endpoint))
        found = iti55.parse_response(reply.body) if reply.fault is None else None
        pid = found.patients[0].patient_id.extension if found and found.patients else None
        ok &= _ok(console, pid is not None, f"ITI-55 XCPD for DOE/dana/1970-04-05/F → patient {pid} in {aa}")
        endpoint = url + XCA_QUERY.path
        query = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX(pid or "?", aa)))
        reply = await client.call(endpoint, query, XCA_QUERY.request_action, security=security_header(cfg, endpoint))
        entries = iti38.parse_response(reply.body).entries if reply.fault is None else []
        ok &= _ok(console, len(entries) == 2, f"ITI-38 FindDocuments → {len(entries)} on-demand KOS entries: "
                  + "; ".join(e.title or "" for e in entries))
        if entries:
            endpoint = url + XCA_RETRIEVE.path
            req = iti39.build_request([iti39.DocumentRequest(hcid, cfg.gateway.repository_unique_id,
                                                             entries[0].unique_id)])
            reply = await client.call(endpoint, req, XCA_RETRIEVE.request_action, use_mtom=True,
                                      security=security_header(cfg, endpoint))
            docs = iti39.parse_response(reply.body, reply.attachments).documents if reply.fault is None else []
            kos = parse_kos(docs[0].data or docs[0].attachment) if docs else None
            ok &= _ok(console, kos is not None, "ITI-39 → KOS manifest generated now, referencing "
                      f"{len(kos.references) if kos else 0} instances (NewDocumentUniqueId "
                      f"{docs[0].new_document_unique_id if docs else '-'})")
        reply = await client.call(url + XCA_QUERY.path, query, XCA_QUERY.request_action)
        refused = reply.fault is not None and reply.fault.subcode is not None
        ok &= _ok(console, refused, "request without an assertion → "
                  + (f"{reply.fault.subcode}: {reply.fault.reason}" if reply.fault else "accepted?!"))
    anonymous = ssl.create_default_context(cafile=str(cfg.server.client_ca))
    async with SoapClient(anonymous) as client:
        try:
            await client.call(url + XCA_QUERY.path, find_documents_request("x"), XCA_QUERY.request_action)
            ok &= _ok(console, False, "a caller without a client certificate was let in")
        except TransportError as exc:
            _ok(console, True, f"caller without a client certificate refused at TLS: {exc}")
    return ok


def how_to_call(cfg: Config, url: str) -> str:
    c = cfg.saml.signing_certificate.parent
    tls = f"--cacert {c}/ca.crt --cert {c}/partner.crt --key {c}/partner.key"
    return (f"Call it (any client certificate issued by {c}/ca.crt):\n"
            f"  curl {tls} {url}/health\n"
            f"  curl {tls} '{url}/ihe/xcpd?wsdl'\n"
            f"SOAP endpoints (signed XUA assertion required): {url}/ihe/xcpd, /ihe/xca/query, "
            f"/ihe/xca/retrieve, /ihe/xcai/retrieve")


IMPORT_STATION = """\
# written by `xig demo` — community A's import station, pulling priors from community B
[gateway]
home_community_id = "urn:oid:2.999.10"
assigning_authority = "2.999.10.1"
repository_unique_id = "2.999.10.2"
imaging_source_id = "2.999.10.3"
name = "XIG Demo Import Station"

[server]
listen = "127.0.0.1:0"
certificate = "{certs}/partner.crt"
private_key = "{certs}/partner.key"
client_ca = "{certs}/ca.crt"

[saml]
trusted_issuers = "{certs}/ca.crt"
signing_certificate = "{certs}/partner.crt"
signing_key = "{certs}/partner.key"
organization = "XIG Demo Hospital A"
subject_id = "Demo Import Station"

[pacs]
kind = "filesystem"
path = "pacs"

[database]
url = "sqlite:///xig.db"

[[partners]]
name = "Community B"
home_community_id = "{hcid}"
xcpd_url = "{url}/ihe/xcpd"
xca_query_url = "{url}/ihe/xca/query"
xca_retrieve_url = "{url}/ihe/xca/retrieve"
xcai_retrieve_url = "{url}/ihe/xcai/retrieve"
"""


async def pull_from(responder: Config, url: str, workdir: Path, console: Console) -> bool:
    """Community A's import station: pull-priors for the demo patient, everything, then a summary."""
    from rich.table import Table

    from gateway.initiating.pull import PullPriors, PullRequest
    from gateway.pacs.factory import open_backends
    from gateway.store.db import open_database
    from gateway.store.jobs import SqlJobStore
    from gateway.store.ledger import SqlPatientLinks
    from gateway.store.response_times import SqlResponseTimes

    station = workdir / "import-station"
    station.mkdir(parents=True, exist_ok=True)
    (station / "xig.toml").write_text(IMPORT_STATION.format(certs=responder.saml.trusted_issuers.parent,
                                                            hcid=responder.gateway.home_community_id, url=url))
    cfg = load_config(station / "xig.toml")
    from gateway.audit.assembly import audit_session
    from gateway.store.audit import SqlAuditStore

    engine = open_database(cfg.database.url, cfg.base_dir)
    audit = ExitStack()
    auditor = audit.enter_context(audit_session(cfg, engine))
    local = open_backends(cfg, engine, auditor=auditor)[0]
    try:
        service = PullPriors(cfg, SqlJobStore(engine), SqlPatientLinks(engine), local, auditor=auditor,
                             response_times=SqlResponseTimes(engine))
        request = PullRequest("DOE", "Dana", "19700405", "F", local_id="A-555")
        found = await service.discover(request)
        table = Table("Community", "Date", "Modality", "Description", "Instances", title="prior studies found")
        for s in found.studies:
            table.add_row(s.partner, s.study_date, s.modalities, s.description, str(s.instances))
        console.print(table)
        result = await service.run(found.job_id)
        stored = result.counts.get("stored", 0)
        from gateway.pacs.base import PatientQuery

        patients = await local.find_patients(PatientQuery(patient_ids=("A-555",)))
        ok = result.complete and [p.PatientID for p in patients] == ["A-555"]
        _ok(console, ok, f"imported {stored} instances of {len(result.studies)} studies into community A's PACS as "
                         f"patient A-555 (reconciled; originals kept in Original Attributes Sequence); "
                         f"job {found.job_id[:8]}")
        events: dict[str, int] = {}
        for row in SqlAuditStore(engine).query():
            events[row.summary.event] = events.get(row.summary.event, 0) + 1
        audited = ", ".join(f"{n} {e}" for e, n in sorted(events.items()))
        _ok(console, bool(events), f"community A audited every exchange (ATNA, DICOM PS3.15): {audited} — "
                                   f"`xig audit ls --config {station / 'xig.toml'}`")
        return ok and bool(events)
    finally:
        await local.aclose()
        audit.close()
        engine.dispose()


async def run_demo(workdir: Path, port: int, serve_after: bool, console: Console) -> int:
    cfg = prepare(workdir, port)
    console.rule("XIG demo — community B's responding gateway")
    server = BackgroundServer(cfg).start()
    try:
        seed(server, workdir)
        console.print(f"gateway for community {cfg.gateway.home_community_id} listening on {server.url} "
                      f"(config {workdir / 'xig.toml'})")
        ok = await self_check(cfg, server.url, console)
        console.rule("community A's import station pulls the priors of DOE^Dana from community B")
        ok &= await pull_from(cfg, server.url, workdir, console)
        console.print(how_to_call(cfg, server.url), soft_wrap=True)
        if serve_after and ok:
            console.print("serving — press Ctrl-C to stop")
            try:
                await asyncio.Event().wait()  # until Ctrl-C cancels the demo
            except (KeyboardInterrupt, asyncio.CancelledError):
                pass
        return 0 if ok else 1
    finally:
        server.stop()
