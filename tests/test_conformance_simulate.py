"""``xig conformance simulate``: the simulated responding community judges real initiating gateways.

Everything real: the simulator is XIG's responding gateway over embedded PACS seeded from a fixture,
on loopback with mutual TLS; the initiator is XIG's own initiating gateway (``PullPriors`` and the
``PartnerClient`` steps) or hand-built wrong requests made with XIG's codecs and ``SoapClient``.

1. XIG's initiating gateway passes every judgement and imports every instance of the fixture.
2. A deliberately wrong initiator fails with the right diagnosis, one family at a time.
3. Each injected fault is observed by XIG's initiating client as the right outcome.
4. The command line: usage errors, and a real run stopped with SIGINT that writes its reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
import typer
from lxml import etree
from typer.testing import CliRunner

from conformance.model import ScenarioResult
from conformance.simulator import Simulator, load_fixture, parse_fault, parse_fixture
from conformance.simulator.cli import register
from conformance.simulator.fixture import FixtureError
from conformance.simulator.report import HTML_NAME, JSON_NAME, JUNIT_NAME
from gateway.config import Config, load_config
from gateway.ihe import ebrim, iti38, iti39, rad75
from gateway.ihe.ebrim import CX
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.initiating.client import UNAVAILABLE, PartnerClient, PartnerError, RetrievedManifest, open_soap_client
from gateway.initiating.partners import Partner
from gateway.initiating.pull import PullPriors, PullRequest
from gateway.pacs.factory import open_backends
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.saml import ATTR_PURPOSE_OF_USE, load_signing_credentials, sign_assertion
from gateway.soap import mtom, ns
from gateway.store.db import open_database
from gateway.store.jobs import SqlJobStore
from gateway.store.ledger import SqlPatientLinks
from gateway.web.client import SoapReply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE
from tests.conftest import write_config

ARC = "1.3.6.1.4.1.21367.13"
SIM = {"home_community_id": f"urn:oid:{ARC}.70.520", "assigning_authority": f"{ARC}.20.520",
       "repository_unique_id": f"{ARC}.80.520", "imaging_source_id": f"{ARC}.71.520.1"}
IG = {"home_community_id": f"urn:oid:{ARC}.70.521", "assigning_authority": f"{ARC}.20.521",
      "repository_unique_id": f"{ARC}.80.521", "imaging_source_id": f"{ARC}.71.521.1"}
SECOND_REPOSITORY = f"{ARC}.71.520.2"
FIXTURE = {
    "patients": [
        {"id": "SIM-1", "family": "DOE", "given": "Dana", "birth_date": "19700405", "gender": "F", "studies": [
            {"description": "CT chest", "date": "20240110", "accession": "A1",
             "series": [{"modality": "CT", "instances": 3, "body_part": "CHEST"}]},
            {"description": "MR knee", "date": "20220505", "accession": "A2", "repository": SECOND_REPOSITORY,
             "series": [{"modality": "MR", "instances": 2, "body_part": "KNEE"},
                        {"modality": "MR", "instances": 1, "body_part": "KNEE"}]}]},
        {"id": "SIM-2", "family": "ROE", "given": "Rick", "birth_date": "19551122", "gender": "M"},
    ],
}
DANA = PatientDemographics(names=(PersonName(family=("DOE",), given=("Dana",)),), gender="F", birth_time="19700405")
T = TypeVar("T")


def run(steps: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(steps())


# --------------------------------------------------------------------------------------------------
# The world: one simulator, one initiating community pointing at it
# --------------------------------------------------------------------------------------------------

class World:
    def __init__(self, sim: Simulator, ig: Config, tmp: Path) -> None:
        self.sim, self.ig, self.tmp = sim, ig, tmp

    def partner(self, **changes: Any) -> Partner:
        e = self.sim.endpoints
        settings: dict[str, Any] = {"timeout": 20, "max_documents_per_request": 2, **changes}
        return Partner(name="Simulated", home_community_id=SIM["home_community_id"], xcpd_url=e["ITI-55"],
                       xca_query_url=e["ITI-38"], xca_retrieve_url=e["ITI-39"], xcai_retrieve_url=e["RAD-75"],
                       **settings)

    def mark(self) -> int:
        return len(self.sim.results)

    def since(self, mark: int, count: int) -> list[ScenarioResult]:
        """The results of the ``count`` requests answered after ``mark`` (waits for their answers)."""
        return self.sim.recorder.wait_for(mark + count, timeout=30)[mark:]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: CertSet) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("simulate")
    sim_cfg = load_config(write_config(tmp / "sim", pki, ids=SIM))
    sim = Simulator(sim_cfg, parse_fixture(FIXTURE), tmp / "sim-work").start()
    e = sim.endpoints
    partners = f"""
[[partners]]
name = "Simulated"
home_community_id = "{SIM['home_community_id']}"
xcpd_url = "{e['ITI-55']}"
xca_query_url = "{e['ITI-38']}"
xca_retrieve_url = "{e['ITI-39']}"
xcai_retrieve_url = "{e['RAD-75']}"
max_documents_per_request = 2
"""
    ig = load_config(write_config(tmp / "ig", pki, ids=IG, extra='[database]\nurl = "sqlite:///xig.db"\n' + partners))
    try:
        yield World(sim, ig, tmp)
    finally:
        sim.stop()


@pytest.fixture
def faults(world: World) -> Iterator[Callable[..., None]]:
    """``faults("ITI-38:delay=1500", ...)`` injects from now on; cleared after the test."""
    def inject(*texts: str) -> None:
        world.sim.plan.replace([parse_fault(t) for t in texts])
    yield inject
    world.sim.plan.replace([])


def checks(result: ScenarioResult) -> dict[str, Any]:
    return {c.check_id: c for c in result.checks}


def failed(result: ScenarioResult) -> set[str]:
    return {c.check_id for c in result.checks if not c.passed}


async def manifests(world: World) -> list[RetrievedManifest]:
    """XIG's own discover → find_manifests → retrieve_manifests (so the initiator may retrieve images)."""
    async with open_soap_client(world.ig) as soap:
        client = PartnerClient(world.ig, world.partner(), soap)
        found = await client.discover(DANA)
        entries = await client.find_manifests(found.matches[0].patient_id)
        return await client.retrieve_manifests(entries)


# --------------------------------------------------------------------------------------------------
# 1. XIG's initiating gateway passes
# --------------------------------------------------------------------------------------------------

async def test_xig_initiator_passes_every_judgement_and_imports_the_fixture(world: World) -> None:
    mark = world.mark()
    engine = open_database(world.ig.database.url, world.ig.base_dir)
    local = open_backends(world.ig, engine)[0]
    job = PullPriors(world.ig, SqlJobStore(engine), SqlPatientLinks(engine), local)
    found = await job.discover(PullRequest(family="DOE", given="Dana", birth_date="19700405", gender="F",
                                           local_id="LOCAL-1"))
    assert found.errors == [] and sorted(s.instances for s in found.studies) == [3, 3]
    result = await job.run(found.job_id)
    assert result.complete and result.counts == {"stored": 6}
    # every fixture instance, reconciled into the local PACS
    truth = world.sim.truth
    assert truth is not None
    stored = [pydicom.dcmread(p, stop_before_pixels=True) for p in (world.ig.base_dir / "pacs").rglob("*.dcm")]
    assert sorted(ds.SOPInstanceUID for ds in stored) == sorted(truth.instances)
    assert {ds.PatientID for ds in stored} == {"LOCAL-1"}

    # XCPD, ITI-38, ITI-39, and RAD-75 per repository in batches of 2: 2 + 2 = 4 requests (3 + 3 instances)
    results = world.since(mark, 1 + 1 + 1 + 4)
    kinds = [r.scenario_id.split("#")[0] for r in results]
    assert kinds.count("ITI-55") == 1 and kinds.count("ITI-38") == 1 and kinds.count("ITI-39") == 1
    assert kinds.count("RAD-75") == 4
    for r in results:
        assert r.status == "passed", (r.scenario_id, [(c.check_id, c.detail) for c in r.checks if not c.passed])
        assert all(c.spec for c in r.checks)  # every judgement cites its clause
    rad = checks(next(r for r in results if r.scenario_id.startswith("RAD-75")))
    for check_id in ("mtom.required", "mtom.package", "wsa.action", "security.assertion",
                     "security.attr.purpose-of-use", "xsd.body", "rad75.grouping", "rad75.nesting",
                     "rad75.repository", "rad75.manifest-first", "rad75.home"):
        assert rad[check_id].passed
    assert "IHE" not in rad["xsd.body"].spec and "XDSI.b_ImagingDocumentSource.xsd" in rad["xsd.body"].spec
    query = checks(next(r for r in results if r.scenario_id.startswith("ITI-38")))
    assert query["iti38.patient-id"].passed and query["iti38.home.known"].passed
    assert "urn:oid:" in results[0].title  # the requester, from its assertion

    files = world.sim.write_report(world.tmp / "report-pass")
    doc = json.loads(files.json.read_text())
    ours = [q for q in doc["requests"] if q["scenario_id"] in {r.scenario_id for r in results}]
    assert len(ours) == 7 and all(q["status"] == "passed" for q in ours)
    assert ours[0]["exchanges"][0]["status"] == 200 and "PRPA_IN201305UV02" in ours[0]["exchanges"][0][
        "request_body"]["text"]
    junit = etree.parse(str(files.junit)).getroot()
    cases = {c.get("name"): c for c in junit.iter("testcase")}
    for r in results:  # one testcase per request, every check listed with its clause
        assert cases[r.scenario_id].find("failure") is None
        assert all(f"[{c.check_id}]" in cases[r.scenario_id].findtext("system-out", "") for c in r.checks)
    assert "(RAD TF-3 4.69.4.1.2 (RAD69-001)" in cases[results[-1].scenario_id].findtext("system-out", "")
    assert cases[results[-1].scenario_id].get("classname") == "conformance.RAD-75"
    assert results[-1].scenario_id in files.html.read_text()


# --------------------------------------------------------------------------------------------------
# 2. A deliberately wrong initiator fails with the right diagnosis
# --------------------------------------------------------------------------------------------------

async def send(world: World, url: str, body: etree._Element, action: str, *, use_mtom: bool = False,
               security: etree._Element | None | bool = True) -> tuple[SoapReply, ScenarioResult]:
    """Send one hand-built request; return the reply and the simulator's judgement of it."""
    mark = world.mark()
    header = security_header(world.ig, url) if security is True else None if security is False else security
    async with open_soap_client(world.ig) as soap:
        reply = await soap.call(url, body, action, security=header, use_mtom=use_mtom)
    [result] = world.since(mark, 1)
    return reply, result


def find_documents(patient: str = f"SIM-1^^^&{SIM['assigning_authority']}&ISO") -> etree._Element:
    return iti38.build_query(iti38.find_documents_for_kos(patient), home_community_id=SIM["home_community_id"])


async def test_wrong_action_is_diagnosed(world: World) -> None:
    url = world.sim.endpoints["ITI-38"]
    reply, result = await send(world, url, find_documents(), XCA_RETRIEVE.request_action)
    assert failed(result) == {"wsa.action"}
    action = checks(result)["wsa.action"]
    assert XCA_QUERY.request_action in action.detail and action.spec == "ITI TF-2 Table 3.38.5-2"
    assert reply.fault is not None and reply.fault.subcode is not None
    assert reply.fault.subcode.local == "ActionNotSupported"  # and the responder refused it


async def test_iti38_home_community_rules(world: World) -> None:
    url = world.sim.endpoints["ITI-38"]
    # GetDocuments names no patient: AdhocQuery/@home is required (ITI TF-2 3.38.4.1.2.1)
    get = iti38.build_query(iti38.GetDocumentsParams(home_community_id="", unique_ids=("2.25.1",)))
    reply, result = await send(world, url, get, XCA_QUERY.request_action)
    assert failed(result) == {"iti38.home.required"}
    assert checks(result)["iti38.home.required"].spec == "ITI TF-2 3.38.4.1.2.1"
    assert checks(result)["iti38.stored-query"].passed
    assert reply.fault is None and "XDSMissingHomeCommunityId" in etree.tostring(reply.body).decode()
    # a bare OID and a community that is not the simulator's
    get = iti38.build_query(iti38.GetDocumentsParams(home_community_id="urn:oid:2.999.404", unique_ids=("2.25.1",)))
    get.find(ns.q(ns.RIM, "AdhocQuery")).set("home", "2.999.404")
    _, result = await send(world, url, get, XCA_QUERY.request_action)
    assert failed(result) == {"iti38.home.format", "iti38.home.known"}
    # a patient id that was not learned from the community's XCPD
    _, result = await send(world, url, find_documents("SIM-1^^^&2.999.9&ISO"), XCA_QUERY.request_action)
    assert failed(result) == {"iti38.patient-id"} and "XCPD" in checks(result)["iti38.patient-id"].detail


async def test_unsigned_or_incomplete_assertion_is_diagnosed(world: World) -> None:
    url = world.sim.endpoints["ITI-38"]
    unsigned = security_header(world.ig, url)
    assertion = unsigned.find(ns.q(ns.SAML2, "Assertion"))
    assertion.remove(assertion.find(ns.q(ns.DS, "Signature")))
    reply, result = await send(world, url, find_documents(), XCA_QUERY.request_action, security=unsigned)
    assert failed(result) == {"security.assertion"}
    assert "InvalidSecurityToken" in checks(result)["security.assertion"].detail
    assert "not signed" in checks(result)["security.assertion"].detail
    assert reply.fault is not None

    # signed, but without the purpose of use (removed, then the assertion re-signed with XIG's codec)
    incomplete = security_header(world.ig, url)
    assertion = incomplete.find(ns.q(ns.SAML2, "Assertion"))
    assertion.remove(assertion.find(ns.q(ns.DS, "Signature")))
    for attribute in assertion.iter(ns.q(ns.SAML2, "Attribute")):
        if attribute.get("Name") == ATTR_PURPOSE_OF_USE:
            attribute.getparent().remove(attribute)
    sign_assertion(assertion, load_signing_credentials(world.ig.saml.signing_certificate, world.ig.saml.signing_key))
    _, result = await send(world, url, find_documents(), XCA_QUERY.request_action, security=incomplete)
    assert failed(result) == {"security.attr.purpose-of-use", "security.assertion"}
    assert "purposeofuse" in checks(result)["security.attr.purpose-of-use"].detail

    _, result = await send(world, url, find_documents(), XCA_QUERY.request_action, security=False)
    assert failed(result) == {"security.header"} and "wsse:Security" in checks(result)["security.header"].detail


async def test_rad75_grouping_and_mtom_are_diagnosed(world: World) -> None:
    kos = [m for m in await manifests(world) if m.ok]
    assert len(kos) == 2
    url = world.sim.endpoints["RAD-75"]
    truth = world.sim.truth
    assert truth is not None
    ct = next(s for s in truth.studies if s.repository != SECOND_REPOSITORY).study
    series = ct.series[0]
    hcid = SIM["home_community_id"]
    # one SeriesRequest whose instances name two repositories
    docs = [iti39.DocumentRequest(hcid, SIM["imaging_source_id"], series.instances[0].SOPInstanceUID),
            iti39.DocumentRequest(hcid, SECOND_REPOSITORY, series.instances[1].SOPInstanceUID)]
    request = rad75.imaging_request([(ct.StudyInstanceUID, series.SeriesInstanceUID, d) for d in docs],
                                    [rad75.EXPLICIT_VR_LITTLE_ENDIAN])
    reply, result = await send(world, url, rad75.build_request(request), XCAI_RETRIEVE.request_action,
                               use_mtom=True)
    assert failed(result) == {"rad75.grouping", "rad75.repository"}
    assert SECOND_REPOSITORY in checks(result)["rad75.grouping"].detail
    assert series.instances[1].SOPInstanceUID in checks(result)["rad75.repository"].detail
    assert checks(result)["rad75.manifest-first"].passed  # the KOS was delivered to this community first
    assert reply.fault is None

    # a correct request, but plain SOAP: RAD-75 requests are MTOM/XOP (RAD69-003 → ITI TF-2 3.43.5)
    good = rad75.imaging_request([(ct.StudyInstanceUID, series.SeriesInstanceUID, docs[0])],
                                 [rad75.EXPLICIT_VR_LITTLE_ENDIAN])
    _, result = await send(world, url, rad75.build_request(good), XCAI_RETRIEVE.request_action, use_mtom=False)
    assert failed(result) == {"mtom.required"} and "3.43.5" in checks(result)["mtom.required"].spec


async def test_schema_invalid_body_is_diagnosed(world: World) -> None:
    url = world.sim.endpoints["ITI-39"]
    body = iti39.build_request([iti39.DocumentRequest(SIM["home_community_id"], SIM["repository_unique_id"],
                                                      "2.25.77")])
    etree.SubElement(body[0], ns.q(ns.XDSB, "Priority")).text = "high"
    reply, result = await send(world, url, body, XCA_RETRIEVE.request_action, use_mtom=True)
    assert "xsd.body" in failed(result) and "Priority" in checks(result)["xsd.body"].detail
    assert checks(result)["xsd.body"].spec.endswith("(XDS.b_DocumentRepository.xsd)")
    assert failed(result) == {"xsd.body", "iti39.document"}  # 2.25.77 was never returned by ITI-38 either
    assert reply.fault is not None and reply.fault.subcode is not None
    assert reply.fault.subcode.local == "SchemaValidationFailed"


# --------------------------------------------------------------------------------------------------
# 3. Injected faults as XIG's initiating client observes them
# --------------------------------------------------------------------------------------------------

async def test_delay_beyond_the_partner_timeout(world: World, faults: Callable[..., None]) -> None:
    faults("ITI-55:delay=4000")
    mark = world.mark()
    async with open_soap_client(world.ig) as soap:
        with pytest.raises(PartnerError) as caught:
            await PartnerClient(world.ig, world.partner(timeout=1.0), soap).discover(DANA)
    assert caught.value.kind == "timeout" and "1 s" in str(caught.value)
    [result] = world.since(mark, 1)  # answered: the simulator saw the initiator give up
    assert result.status == "passed" and "delay (4000 ms" in result.title
    assert "disconnected" in (result.exchanges[0].error or "")
    assert result.exchanges[0].elapsed_ms < 4000


async def test_soap_fault_and_registry_errors(world: World, faults: Callable[..., None]) -> None:
    faults("ITI-38:soap-fault=Sender,subcode=wsse:FailedAuthentication,times=1",
           "ITI-39:registry-error=XDSRepositoryBusy")
    async with open_soap_client(world.ig) as soap:
        client = PartnerClient(world.ig, world.partner(), soap)
        patient = CX("SIM-1", SIM["assigning_authority"])
        with pytest.raises(PartnerError) as caught:
            await client.find_manifests(patient)
        assert caught.value.kind == "fault" and caught.value.fault is not None
        assert caught.value.fault.subcode is not None and caught.value.fault.subcode.local == "FailedAuthentication"
        assert "injected" in str(caught.value)
        entries = await client.find_manifests(patient)  # times=1: the next query is answered
        assert len(entries) == 2
        retrieved = await client.retrieve_manifests(entries)
        assert all(m.error is not None and m.error.code == "XDSRepositoryBusy" for m in retrieved)
        faults("ITI-38:registry-error=XDSRegistryBusy")
        found = await client.find_manifests(patient)
        assert list(found) == [] and found.status.endswith("Failure")
        assert [e.code for e in found.errors] == ["XDSRegistryBusy"]


async def test_rad75_partial_success_is_recorded_per_instance(world: World, faults: Callable[..., None],
                                                              tmp_path: Path) -> None:
    kos = [m for m in await manifests(world) if m.ok]
    faults("RAD-75:partial=2")
    async with open_soap_client(world.ig) as soap:
        client = PartnerClient(world.ig, world.partner(max_documents_per_request=10), soap)
        items = [i for m in kos for i in m.image_requests()]
        outcome = await client.retrieve_images(items, sink_factory=lambda _: mtom.FileSink(tmp_path))
    # per request (one per repository), every second instance is withheld
    failed_uids = {r.request.sop_instance_uid for r in outcome.failed}
    assert len(outcome.results) == 6 and len(outcome.delivered) == 4 and len(failed_uids) == 2
    assert all(r.error_code == "XDSDocumentUniqueIdError" for r in outcome.failed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(r.delivered).name for r in outcome.delivered)


@pytest.mark.parametrize(("mode", "diagnosis"), [("truncate", "truncated part #2"),
                                                  ("bad-boundary", "boundary delimiter"),
                                                  ("missing-part", "references missing part")])
async def test_broken_mtom_is_a_protocol_error_without_half_written_files(world: World, faults: Callable[..., None],
                                                                          tmp_path: Path, mode: str,
                                                                          diagnosis: str) -> None:
    kos = [m for m in await manifests(world) if m.ok]
    faults(f"RAD-75:broken-mtom={mode}")
    out = tmp_path / "images"
    out.mkdir()
    async with open_soap_client(world.ig) as soap:
        client = PartnerClient(world.ig, world.partner(max_documents_per_request=10), soap)
        outcome = await client.retrieve_images(kos[0].image_requests(), sink_factory=lambda _: mtom.FileSink(out))
    assert outcome.results and not outcome.delivered
    for r in outcome.failed:
        assert r.error_code == UNAVAILABLE and r.partner_error is not None and r.partner_error.kind == "protocol"
        assert diagnosis in r.partner_error.reason
    assert list(out.iterdir()) == []  # no half-written instance


# --------------------------------------------------------------------------------------------------
# 4. Fixture, fault syntax and the command line
# --------------------------------------------------------------------------------------------------

def test_fixture_and_fault_errors_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(FixtureError) as caught:
        parse_fixture({"patients": [{"id": "A^B", "family": "X", "birth_date": "1970", "gender": "Q",
                                     "studies": [{"repository": "not-an-oid", "colour": "red"}]}],
                       "faults": [{"transaction": "ITI-55", "kind": "partial"}]})
    problems = "\n".join(caught.value.problems)
    for expected in ("patients[0].id", "patients[0].birth_date", "patients[0].gender",
                     "patients[0].studies[0].repository", "patients[0].studies[0].colour: unknown key",
                     "faults[0]: a partial fault applies to RAD-75, not ITI-55"):
        assert expected in problems
    for bad, message in (("ITI-38", "TRANSACTION:KIND"), ("XDS-99:delay=5", "transaction"),
                         ("ITI-55:partial=2", "applies to RAD-75"), ("RAD-75:broken-mtom=shred", "mode"),
                         ("ITI-38:registry-error=Oops", "errorCode"), ("ITI-38:delay=soon", "whole number")):
        with pytest.raises(ValueError, match=message):
            parse_fault(bad)
    example = load_fixture(Path(__file__).parents[1] / "conformance" / "simulator" / "example-fixture.toml")
    assert example.instance_count == 10 and example.faults[0].describe() == "ITI-38 delay (300 ms, first 1 request(s))"


def test_cli_usage_errors(tmp_path: Path, pki: CertSet) -> None:
    app = typer.Typer()

    @app.callback()
    def _group() -> None:
        pass

    register(app, load_config)
    cfg = write_config(tmp_path / "sim", pki, ids=SIM)
    fixture = tmp_path / "fixture.json"
    fixture.write_text(json.dumps(FIXTURE))
    runner = CliRunner()
    r = runner.invoke(app, ["simulate", "--config", str(cfg), "--fixture", str(fixture), "--fault", "ITI-55:shake"])
    assert r.exit_code == 2 and "kind 'shake'" in r.output
    (tmp_path / "bad.toml").write_text("[[patients]]\nid = 1\n")
    r = runner.invoke(app, ["simulate", "--config", str(cfg), "--fixture", str(tmp_path / "bad.toml")])
    assert r.exit_code == 2 and "patients[0].family" in r.output and "Traceback" not in r.output


def test_cli_run_until_sigint_writes_the_reports(tmp_path: Path, pki: CertSet) -> None:
    cfg = write_config(tmp_path / "sim", pki, ids=SIM)
    fixture = tmp_path / "fixture.json"
    fixture.write_text(json.dumps(FIXTURE))
    reports = tmp_path / "reports"
    proc = subprocess.Popen([sys.executable, "-m", "conformance.simulator.cli", "simulate", "--config", str(cfg),
                             "--fixture", str(fixture), "--report-dir", str(reports), "--fault", "ITI-38:delay=10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        assert proc.stdout is not None
        endpoints: dict[str, str] = {}
        for line in proc.stdout:  # the simulator announces its endpoints, then starts judging
            parts = line.split()
            if len(parts) == 2 and parts[1].startswith("https://"):
                endpoints[parts[0]] = parts[1]
            if line.startswith("judging every request"):
                break
        assert set(endpoints) == {"ITI-55", "ITI-38", "ITI-39", "RAD-75"}
        ig = load_config(write_config(tmp_path / "ig", pki, ids=IG))
        partner = Partner(name="cli", home_community_id=SIM["home_community_id"], xcpd_url=endpoints["ITI-55"],
                          xca_query_url=endpoints["ITI-38"])

        async def steps() -> int:
            async with open_soap_client(ig) as soap:
                client = PartnerClient(ig, partner, soap)
                found = await client.discover(DANA)
                return len(await client.find_manifests(found.matches[0].patient_id))

        assert run(steps) == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "2 request(s) judged, 0 with failed checks" in out and "pass ITI-38#0002" in out
    doc = json.loads((reports / JSON_NAME).read_text())
    assert doc["summary"]["requests"] == 2 and doc["faults"] == ["ITI-38 delay (10 ms)"]
    junit = etree.parse(str(reports / JUNIT_NAME)).getroot()
    assert junit.get("tests") == "2" and junit.get("failures") == "0" and (reports / HTML_NAME).exists()
    assert not list(reports.glob(".*.tmp"))
    assert ebrim.normalize_hcid(doc["community"]) == SIM["home_community_id"]
