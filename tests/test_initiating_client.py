"""The initiating gateway's partner client and fan-out against real XIG responders over mutual TLS.

No mocks: every partner is a real XIG server (``BackgroundServer``) on loopback TLS with signed assertions:

* A — the patient with two studies (one of ~50 MB), embedded filesystem PACS;
* B — the same patient (its own id) with one study;
* C — a real responder whose DICOMweb PACS is a closed port: its XCPD answers AE;
* slow — a real XIG app whose ITI-55 handler never answers (short partner timeouts), and whose ITI-38
  handler answers entries without ``home`` (a non-conformant peer);
* untrusted — a real XIG server with a certificate from another CA (TLS failure);
* closed — a URL where nothing listens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pydicom
import pytest
from lxml import etree

from gateway.config import Config, PartnerSection, load_config
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.errors import XIG_BUSY, receiver_fault
from gateway.ihe import ebrim, iti38
from gateway.ihe.ebrim import CX
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.initiating.client import (
    NOT_RETURNED,
    UNAVAILABLE,
    ImageRequest,
    PartnerClient,
    PartnerError,
    check_reply,
    open_soap_client,
)
from gateway.initiating.fanout import discover_all, find_all, start_order
from gateway.initiating.partners import Partner, PartnerDirectory, parse_fhir_directory, transaction_of
from gateway.security.certs import CertSet
from gateway.security.outbound import NHIN_PURPOSE, default_identity
from gateway.security.saml import CodedValue
from gateway.soap import mtom, ns, xml
from gateway.soap.envelope import build_envelope
from gateway.store.db import make_engine, open_database
from gateway.store.response_times import WEIGHT, SqlResponseTimes
from gateway.web import loop as event_loop
from gateway.web.app import RequestContext, SoapResponse
from gateway.web.client import parse_reply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD
from gateway.web.server import BackgroundServer
from tests.conftest import write_config

ARC = "1.3.6.1.4.1.21367.13"


def ids(n: int) -> dict[str, str]:
    return {"home_community_id": f"urn:oid:{ARC}.70.{n}", "assigning_authority": f"{ARC}.20.{n}",
            "repository_unique_id": f"{ARC}.80.{n}", "imaging_source_id": f"{ARC}.71.{n}.1"}


IG, A, B, C, SLOW, ROGUE = ids(400), ids(401), ids(402), ids(403), ids(404), ids(407)
HCID_SLOW_1, HCID_SLOW_2, HCID_CLOSED, HCID_HUB = (f"urn:oid:{ARC}.70.{n}" for n in (405, 406, 408, 409))
SLOW_TIMEOUT = 1.5
DB = '[database]\nurl = "sqlite:///xig.db"\n'
DEMOGRAPHICS = PatientDemographics(names=(PersonName(family=("Doe",), given=("Jane",)),), gender="F",
                                   birth_time="19800214")


def patient_study(out: Path, patient_id: str, **kw: Any) -> SyntheticStudy:
    """A study of Jane Doe, born 1980-02-14, under ``patient_id`` (each community has its own id)."""
    return make_study(out, patient_id=patient_id, patient_name="Doe^Jane", birth_date="19800214", sex="F", **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_sink(_info: mtom.PartInfo) -> mtom.PartSink:
    return mtom.MemorySink()


def endpoints(base: str) -> str:
    return (f'xcpd_url = "{base}{XCPD.path}"\nxca_query_url = "{base}{XCA_QUERY.path}"\n'
            f'xca_retrieve_url = "{base}{XCA_RETRIEVE.path}"\nxcai_retrieve_url = "{base}{XCAI_RETRIEVE.path}"\n')


def partner_toml(name: str, hcid: str, base: str, *, timeout: float = 30, extra: str = "") -> str:
    return (f'\n[[partners]]\nname = "{name}"\nhome_community_id = "{hcid}"\n{endpoints(base)}'
            f"timeout_seconds = {timeout}\n{extra}")


class Stuck:
    """An ITI-55 handler stuck on its backend: it waits for an event the tests never set. The fixture
    releases the waiters at teardown so the server stops cleanly (no task cancelled mid-request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def handler(self, ctx: RequestContext) -> SoapResponse:
        event = asyncio.Event()
        with self._lock:
            self._waiters.append((asyncio.get_running_loop(), event))
        await event.wait()
        raise receiver_fault(XIG_BUSY, "released at shutdown")

    def release(self) -> None:
        with self._lock:
            for loop, event in self._waiters:
                loop.call_soon_threadsafe(event.set)


NO_HOME_UID = "1.3.6.1.4.1.21367.13.99.1"


async def entries_without_home(ctx: RequestContext) -> SoapResponse:
    """A non-conformant ITI-38 responder: one entry with ``home``, one without (ITI TF-2 3.38.4.1.3)."""
    entries = [ebrim.DocumentEntry(entry_uuid=f"urn:uuid:6a3c7c1e-2b1a-4a53-9a1e-0d5b2f6e9a1{i}", unique_id=uid,
                                   patient_id=f"X^^^&{SLOW['assigning_authority']}&ISO", mime_type="application/dicom",
                                   repository_unique_id=SLOW["repository_unique_id"], format_code=ebrim.KOS_FORMAT_CODE)
               for i, uid in enumerate((NO_HOME_UID, NO_HOME_UID + ".2"))]
    body = iti38.build_response(entries, return_type="LeafClass", home_community_id=SLOW["home_community_id"])
    first = body.find(f"{{{ns.RIM}}}RegistryObjectList/{{{ns.RIM}}}ExtrinsicObject")
    assert first is not None
    del first.attrib["home"]
    return SoapResponse(body)


@dataclasses.dataclass
class Network:
    ig: Config
    directory: PartnerDirectory
    servers: dict[str, BackgroundServer]
    studies_a: list[SyntheticStudy]
    study_b: SyntheticStudy


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, pki: CertSet, rogue_pki: CertSet) -> Any:
    tmp = tmp_path_factory.mktemp("initiating")
    servers: dict[str, BackgroundServer] = {}
    stuck = Stuck()
    try:
        servers["A"] = BackgroundServer(load_config(write_config(tmp / "a", pki, ids=A, extra=DB))).start()
        studies_a = [
            # ~50 MB: 96 slices of 512 x 512 x 16 bits
            patient_study(tmp / "in-a" / "big", "PAT-A1", accession="ACC-A1", study_description="CT chest",
                          study_date="20240110", series=(("CT", 48, "CHEST"), ("CT", 48, "CHEST")), rows=512,
                          cols=512, seed="a-big"),
            patient_study(tmp / "in-a" / "small", "PAT-A1", accession="ACC-A2", study_description="MR knee",
                          study_date="20230301", series=(("MR", 3, "KNEE"),), seed="a-small"),
        ]
        assert servers["A"].services.community.backends[0].index_directory(tmp / "in-a").ok
        servers["B"] = BackgroundServer(load_config(write_config(tmp / "b", pki, ids=B, extra=DB))).start()
        study_b = patient_study(tmp / "in-b", "PAT-B7", accession="ACC-B1", study_description="US abdomen",
                                series=(("US", 2, "ABDOMEN"),), seed="b")
        assert servers["B"].services.community.backends[0].index_directory(tmp / "in-b").ok
        path_c = write_config(tmp / "c", pki, ids=C, extra=DB)
        path_c.write_text(path_c.read_text().replace(
            '[pacs]\nkind = "filesystem"\npath = "pacs"\n',
            f'[pacs]\nkind = "dicomweb"\nurl = "http://127.0.0.1:{free_port()}/dicom-web"\n'))
        servers["C"] = BackgroundServer(load_config(path_c)).start()
        servers["slow"] = BackgroundServer(
            load_config(write_config(tmp / "slow", pki, ids=SLOW, server_extra="shutdown_timeout = 5")),
            {XCPD.transaction: stuck.handler, XCA_QUERY.transaction: entries_without_home}).start()
        servers["untrusted"] = BackgroundServer(load_config(write_config(tmp / "rogue", rogue_pki, ids=ROGUE)),
                                                {}).start()
        closed = f"https://127.0.0.1:{free_port()}"
        partners = "".join([
            partner_toml("A", A["home_community_id"], servers["A"].url, extra="max_documents_per_request = 40\n"),
            partner_toml("B", B["home_community_id"], servers["B"].url),
            partner_toml("C", C["home_community_id"], servers["C"].url),
            partner_toml("slow-1", HCID_SLOW_1, servers["slow"].url, timeout=SLOW_TIMEOUT),
            partner_toml("slow-2", HCID_SLOW_2, servers["slow"].url, timeout=SLOW_TIMEOUT),
            partner_toml("untrusted", ROGUE["home_community_id"], servers["untrusted"].url, timeout=5),
            partner_toml("closed", HCID_CLOSED, closed, timeout=5),
        ])
        ig = load_config(write_config(tmp / "ig", pki, ids=IG, extra=partners))
        yield Network(ig, PartnerDirectory.from_config(ig), servers, studies_a, study_b)
    finally:
        stuck.release()
        for s in servers.values():
            s.stop()


# --------------------------------------------------------------------------------------------------
# Fan-out
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_discover_all_isolates_every_partner(network: Network, loop_kind: event_loop.EventLoopKind) -> None:
    """On both event loops: the client's TLS is the loop's own (:mod:`gateway.web.netbackend`)."""
    event_loop.run(_discover_all_isolates_every_partner(network), loop_kind)


async def _discover_all_isolates_every_partner(network: Network) -> None:
    res = await discover_all(network.ig, network.directory, DEMOGRAPHICS, local_patient_id="IG-PAT-9")
    timings = {name: round(r.seconds, 3) for name, r in res.partners.items()}
    print(f"\nfan-out wall time {res.seconds:.3f} s; per partner {timings}")
    assert list(res.partners) == ["A", "B", "C", "slow-1", "slow-2", "untrusted", "closed"]

    # A and B: one match each, with the id to use there and the custodian community
    for name, ids_, pid in (("A", A, "PAT-A1"), ("B", B, "PAT-B7")):
        out = res.partners[name].outcome
        assert out is not None and out.status == "match" and out.query_response_code == "OK", out
        (m,) = out.matches
        assert m.patient_id == CX(pid, ids_["assigning_authority"])
        assert m.home_community_id == ids_["home_community_id"] and m.custodian_given
        assert m.health_data_locator is False and m.reported_by == name
    # C: its PACS is down → AE with the detected issue, an application answer, not a PartnerError
    c = res.partners["C"].outcome
    assert c is not None and c.status == "error" and c.ack_code == "AE"
    assert c.issue_codes == ("AnswerNotAvailable",) and "not reachable" in c.summary()
    # the slow ones: a clear timeout, each within its own deadline
    for name in ("slow-1", "slow-2"):
        err = res.partners[name].error
        assert err is not None and err.kind == "timeout" and err.transaction == "ITI-55"
        assert f"within {SLOW_TIMEOUT:g} s" in str(err) and "timeout_seconds" in str(err)
        assert SLOW_TIMEOUT <= res.partners[name].seconds < SLOW_TIMEOUT + 1
    # TLS failure names the certificate problem; the closed port says nothing listens
    tls = res.errors["untrusted"]
    assert tls.kind == "tls" and "certificate" in str(tls) and "CA" in str(tls), str(tls)
    closed = res.errors["closed"]
    assert closed.kind == "unreachable" and "connection refused" in str(closed), str(closed)
    assert "nothing listens" in str(closed)
    # grouped by custodian community, both directly reachable
    assert set(res.communities) == {A["home_community_id"], B["home_community_id"]}
    assert all(g.reachable and g.partner is not None for g in res.communities.values())
    assert res.communities[A["home_community_id"]].partner.name == "A"  # type: ignore[union-attr]
    # concurrent: bounded by the slowest partner's timeout, not the sum of the two slow ones
    assert SLOW_TIMEOUT <= res.seconds < 2 * SLOW_TIMEOUT, timings


def test_start_order_unknown_first_then_slowest_first() -> None:
    keys = ["a", "b", "c", "d", "e", "f"]
    expected = {"b": 0.2, "d": 3.0, "f": 0.2, "e": 1.0}
    together, one_by_one = start_order(keys, expected)
    assert [keys[i] for i in together] == ["a", "c"]  # no record: first, in their order
    assert [keys[i] for i in one_by_one] == ["d", "e", "b", "f"]  # slowest first; a tie keeps the order
    assert start_order(keys, {}) == ([0, 1, 2, 3, 4, 5], [])


def recording_factory(started: list[str]) -> Any:
    """A client factory that notes each partner's name as its task starts (each task makes its client first)."""
    def factory(cfg: Config, partner: Partner, soap: Any) -> PartnerClient:
        started.append(partner.name)
        return PartnerClient(cfg, partner, soap)
    return factory


async def test_the_usually_slowest_partners_are_asked_first_and_their_times_recorded(
        network: Network, tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path}/times.db", tmp_path)
    times = SqlResponseTimes(engine)
    hcid = {p.name: ebrim.normalize_hcid(p.home_community_id) for p in network.directory}
    times.record("ITI-55", {hcid["B"]: 2.0, hcid["A"]: 0.5, hcid["closed"]: 9.0, hcid["untrusted"]: 1.0})
    started: list[str] = []
    factory = recording_factory(started)
    chosen = ["A", "B", "C", "slow-1", "untrusted", "closed"]
    try:
        res = await discover_all(network.ig, network.directory, DEMOGRAPHICS, partners=chosen,
                                 client_factory=factory, response_times=times)
        # no record yet (C, slow-1) first, then by recorded time, slowest first; results in the asked order
        assert started == ["C", "slow-1", "closed", "B", "untrusted", "A"]
        assert list(res.partners) == chosen
        assert res.partners["A"].ok and res.partners["B"].ok and res.partners["slow-1"].error is not None
        rows = {r[1]: r[2:5] for r in times.all() if r[0] == "ITI-55"}  # average, last, samples
        for name, before in (("A", 0.5), ("B", 2.0)):
            seconds = res.partners[name].seconds
            assert rows[hcid[name]] == (pytest.approx(before + WEIGHT * (seconds - before)), seconds, 2)
        # an answer (C's AE) and a timeout tell how long a partner takes; a refused connection or a failed
        # TLS handshake does not
        assert rows[hcid["C"]] == (res.partners["C"].seconds,) * 2 + (1,)
        assert rows[hcid["slow-1"]][2] == 1 and rows[hcid["slow-1"]][0] >= SLOW_TIMEOUT
        assert rows[hcid["closed"]] == (9.0, 9.0, 1) and rows[hcid["untrusted"]] == (1.0, 1.0, 1)

        docs = await find_all(network.ig, res, response_times=times)
        assert not docs.errors
        assert {r[1] for r in times.all() if r[0] == "ITI-38"} == {hcid["A"], hcid["B"]}
    finally:
        engine.dispose()


async def test_response_times_that_cannot_be_read_or_written_change_only_the_order(
        network: Network, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A database without the table (not migrated): the fan-out runs in the asked order, with warnings."""
    engine = make_engine(f"sqlite:///{tmp_path}/empty.db")
    started: list[str] = []
    factory = recording_factory(started)
    try:
        with caplog.at_level("WARNING", logger="xig.initiating"):
            res = await discover_all(network.ig, network.directory, DEMOGRAPHICS, partners=["B", "A"],
                                     client_factory=factory, response_times=SqlResponseTimes(engine))
    finally:
        engine.dispose()
    assert started == ["B", "A"] and res.partners["A"].ok and res.partners["B"].ok
    messages = [r.getMessage() for r in caplog.records]
    assert any("response times not available" in m and "no such table" in m for m in messages), messages
    assert any("could not record the partners' response times" in m for m in messages), messages


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_find_retrieve_and_stream_images(network: Network, tmp_path: Path, loop_kind: event_loop.EventLoopKind) -> None:
    event_loop.run(_find_retrieve_and_stream_images(network, tmp_path), loop_kind)


async def _find_retrieve_and_stream_images(network: Network, tmp_path: Path) -> None:
    cfg, directory = network.ig, network.directory
    found = await discover_all(cfg, directory, DEMOGRAPHICS, partners=["A", "B"])
    docs = await find_all(cfg, found)
    assert not docs.errors, docs.errors
    by_hcid = {hcid: [e for r in rs for e in r.entries or ()] for hcid, rs in docs.by_community().items()}
    entries_a = by_hcid[A["home_community_id"]]
    (entry_b,) = by_hcid[B["home_community_id"]]
    assert f"{network.study_b.StudyInstanceUID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID" in entry_b.reference_ids
    assert len(entries_a) == 2
    assert all(e.is_on_demand and e.home_community_id == A["home_community_id"] for e in entries_a)

    async with open_soap_client(cfg) as soap:
        client = PartnerClient(cfg, directory.by_name("A"), soap)
        manifests = await client.retrieve_manifests(entries_a)
        assert [m.ok for m in manifests] == [True, True], [m.problem or m.error for m in manifests]
        expected = {s.StudyInstanceUID: s for s in network.studies_a}
        for m in manifests:
            assert m.kos is not None and m.new_document_unique_id == m.kos.sop_instance_uid
            assert m.new_document_unique_id != m.entry.unique_id
            study = expected[m.kos.study_instance_uid]
            assert {r.sop_instance_uid for r in m.kos.references} == {i.SOPInstanceUID for i in study.instances}

        big = next(m for m in manifests if m.kos is not None and len(m.kos.references) == 96)
        big_study = expected[big.kos.study_instance_uid]  # type: ignore[union-attr]
        assert big_study.total_bytes > 50_000_000
        out = tmp_path / "images"
        out.mkdir()
        tracemalloc.start()
        try:
            t0 = time.monotonic()
            images = await client.retrieve_images(big.kos.plan(),  # type: ignore[union-attr]
                                                  home_community_id=big.home_community_id,
                                                  sink_factory=lambda _info: mtom.FileSink(out))
            seconds = time.monotonic() - t0
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        print(f"\nRAD-75: {big_study.total_bytes / 1e6:.1f} MB in {images.batches} requests, {seconds:.2f} s, "
              f"tracemalloc peak {peak / 1e6:.1f} MB")
        assert images.ok, [(r.error_code, r.error_context) for r in images.failed][:3]
        assert images.batches == 3  # 96 instances, max_documents_per_request = 40
        assert peak < 40_000_000
        # the other study too, through ImageRequest items
        small = next(m for m in manifests if m is not big)
        small_images = await client.retrieve_images(small.image_requests(),
                                                    sink_factory=lambda _info: mtom.FileSink(out))
        assert small_images.ok and len(small_images.results) == 3

        # every instance present and identical to what was seeded (UIDs, pixels)
        seeded = {i.SOPInstanceUID: i for s in network.studies_a for i in s.instances}
        delivered = {**images.results, **small_images.results}
        assert set(delivered) == set(seeded)
        for uid, result in delivered.items():
            ds = pydicom.dcmread(Path(result.delivered))
            assert ds.SOPInstanceUID == uid == result.request.sop_instance_uid
            assert hashlib.sha256(ds.PixelData).hexdigest() == seeded[uid].pixel_sha256
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files left

        # per-document problems are results, not exceptions
        unknown = dataclasses.replace(entries_a[0], unique_id="1.3.6.1.4.1.21367.13.99.404")
        (bad,) = await client.retrieve_manifests([unknown])
        assert not bad.ok and bad.error is not None and bad.error.code == "XDSDocumentUniqueIdError"
        good_ref = big.kos.references[0]  # type: ignore[union-attr]
        req = ImageRequest(A["home_community_id"], good_ref.retrieve_location_uid, good_ref.study_uid,
                           good_ref.series_uid, good_ref.sop_instance_uid)
        mixed = await client.retrieve_images(
            [req, dataclasses.replace(req, sop_instance_uid="1.3.6.1.4.1.21367.13.99.405"),
             dataclasses.replace(req, sop_instance_uid=big.kos.references[1].sop_instance_uid,  # type: ignore[union-attr]
                                 repository_unique_id="1.3.6.1.4.1.21367.13.99.406")],
            sink_factory=lambda _info: mtom.FileSink(out))
        codes = [r.error_code for r in mixed.results.values()]
        # one request per repository; the partner refuses the unknown instance and repository, nothing else
        assert codes == [None, "XDSDocumentUniqueIdError", "XDSUnknownRepositoryId"] and mixed.batches == 2
        assert mixed.results[req.sop_instance_uid].ok and NOT_RETURNED not in codes
        # a patient id in an authority the partner does not know: its XDSUnknownPatientId comes back as data
        none = await client.find_manifests(CX("PAT-A1", "2.999.1234"))
        assert list(none) == [] and [e.code for e in none.errors] == ["XDSUnknownPatientId"]


async def test_new_community_is_resolved_in_the_directory(network: Network) -> None:
    """A partner answers for another community (ITI TF-2 3.55.4.2.2.4 Case 1): its endpoints come from the
    directory — here a FHIR directory listing A — or it is reported as unreachable."""
    a = network.servers["A"].url
    hub = Partner(name="hub", home_community_id=HCID_HUB, xcpd_url=a + XCPD.path, timeout=30)
    listing = parse_fhir_directory(fhir_bundle(a))
    with_a = PartnerDirectory([hub, *listing])
    res = await discover_all(network.ig, with_a, DEMOGRAPHICS, partners=["hub"])
    group = res.communities[A["home_community_id"]]
    assert group.reported_by == ["hub"] and group.partner is not None
    assert group.partner.source == "directory" and group.partner.xca_query_url == a + XCA_QUERY.path
    docs = await find_all(network.ig, res)
    assert not docs.errors and len(docs.entries()) == 2

    alone = PartnerDirectory([hub])
    res = await discover_all(network.ig, alone, DEMOGRAPHICS)
    (group,) = res.unreachable_communities
    assert group.home_community_id == A["home_community_id"] and group.partner is None
    assert group.problem is not None and "not in the partner directory" in group.problem
    docs = await find_all(network.ig, res)
    (err,) = docs.errors
    assert err.kind == "no-endpoint" and A["home_community_id"] in str(err)


async def test_partner_errors_an_operator_can_act_on(network: Network, tmp_path: Path) -> None:
    cfg, directory = network.ig, network.directory
    a = directory.by_name("A")
    async with open_soap_client(cfg) as soap:
        # a purpose the partner does not permit: its WS-Security fault, code and text
        marketing = dataclasses.replace(default_identity(cfg), purpose_of_use=CodedValue(
            "MARKETING", NHIN_PURPOSE, "nhin-purpose", "Marketing"))
        with pytest.raises(PartnerError) as info:
            await PartnerClient(cfg, a, soap, identity=marketing).discover(DEMOGRAPHICS)
        err = info.value
        assert err.kind == "fault" and err.fault is not None and err.fault.subcode is not None
        assert "SOAP fault Sender/wsse:FailedAuthentication" in str(err) and "MARKETING" in str(err), str(err)
        # the ITI-38 URL points at the XCPD endpoint: the partner's ActionNotSupported fault
        wrong = dataclasses.replace(a, xca_query_url=a.xcpd_url)
        with pytest.raises(PartnerError) as info:
            await PartnerClient(cfg, wrong, soap).find_manifests(CX("PAT-A1", A["assigning_authority"]))
        assert info.value.kind == "fault" and "wsa:ActionNotSupported" in str(info.value), str(info.value)
        # no endpoint configured
        no_xcai = dataclasses.replace(a, xcai_retrieve_url=None)
        ref = ImageRequest(A["home_community_id"], A["imaging_source_id"], "1.2.3", "1.2.3.1", "1.2.3.1.1")
        images = await PartnerClient(cfg, no_xcai, soap).retrieve_images([ref], sink_factory=memory_sink)
        (r,) = images.results.values()
        assert r.error_code == UNAVAILABLE and r.partner_error is not None and r.partner_error.kind == "no-endpoint"
        assert "xcai_retrieve_url" in str(r.partner_error)
        # unreachable partner: every batch marked, only the first one tried
        closed = directory.by_name("closed")
        many = [dataclasses.replace(ref, sop_instance_uid=f"1.2.3.1.{n}") for n in range(250)]
        images = await PartnerClient(cfg, closed, soap).retrieve_images(many, sink_factory=memory_sink)
        assert images.batches == 1 and len(images.failed) == 250
        assert {r.partner_error.kind for r in images.failed if r.partner_error} == {"unreachable"}
        # a partner that drops ``home``: entry dropped and reported as XDSMissingHomeCommunityId naming it
        slow = directory.by_name("slow-1")
        found = await PartnerClient(cfg, slow, soap).find_manifests(CX("X", SLOW["assigning_authority"]))
        assert [e.unique_id for e in found] == [NO_HOME_UID + ".2"]
        (missing,) = found.errors
        assert missing.code == "XDSMissingHomeCommunityId" and "slow-1" in missing.context
        assert NO_HOME_UID in missing.context


def test_reply_checks_wrong_action_and_relates_to() -> None:
    """What a reply must satisfy, on real envelopes: our Action, related to our MessageID, not a fault."""
    body = etree.Element(ns.q(ns.QUERY, "AdhocQueryResponse"))

    def reply(action: str, relates_to: str | None) -> Any:
        env = build_envelope(body, action=action, relates_to=relates_to, to=ns.WSA_ANONYMOUS)
        return parse_reply(200, "application/soap+xml", xml.tostring(env), {}, "urn:uuid:ours")

    ok = reply(XCA_QUERY.response_action, "urn:uuid:ours")
    check_reply(ok, partner="P", transaction="ITI-38", url="https://p", expected_action=XCA_QUERY.response_action)
    with pytest.raises(PartnerError, match=r"wsa:Action is 'urn:ihe:iti:2007:CrossGatewayRetrieveResponse'"):
        check_reply(reply(XCA_RETRIEVE.response_action, "urn:uuid:ours"), partner="P", transaction="ITI-38",
                    url="https://p", expected_action=XCA_QUERY.response_action)
    with pytest.raises(PartnerError, match="relates to 'urn:uuid:other', not to our request 'urn:uuid:ours'"):
        check_reply(reply(XCA_QUERY.response_action, "urn:uuid:other"), partner="P", transaction="ITI-38",
                    url="https://p", expected_action=XCA_QUERY.response_action)
    with pytest.raises(PartnerError, match="no wsa:RelatesTo"):
        check_reply(reply(XCA_QUERY.response_action, None), partner="P", transaction="ITI-38",
                    url="https://p", expected_action=XCA_QUERY.response_action)


# --------------------------------------------------------------------------------------------------
# Directory
# --------------------------------------------------------------------------------------------------

TX = "https://sequoiaproject.org/fhir/sphd/StructureDefinition/Transaction"
POU = "https://sequoiaproject.org/fhir/sphd/StructureDefinition/PurposesOfUse"


def endpoint(eid: str, code: str | None, address: str, **extra: Any) -> dict[str, Any]:
    ext: list[dict[str, Any]] = [{"url": POU, "valueCodeableConcept": {"coding": [
        {"system": "http://healthit.gov/nhin/purposeofuse", "code": "TREATMENT"}]}}]
    if code is not None:
        ext.insert(0, {"url": TX, "valueCodeableConcept": {"coding": [
            {"system": "https://sequoiaproject.org/fhir/sphd/CodeSystem/TransactionCodes", "code": code}]}})
    return {"resourceType": "Endpoint", "id": eid, "status": "active", "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "ihe-xcpd" if code == "ITI-55" else "ihe-xca"}, "address": address, "extension": ext, **extra}


def organization(oid: str, name: str, endpoints_: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": oid, "active": True, "name": name, "identifier": [{
        "type": {"coding": [{"system": "https://sequoiaproject.org/fhir/sphd/CodeSystem/SequoiaIdentifierCodes",
                             "code": "HCID"}]}, "system": "urn:ietf:rfc:3986", "value": f"urn:oid:{oid}"}],
            "endpoint": [{"reference": f"#{e['id']}", "type": "Endpoint"} for e in endpoints_],
            "contained": endpoints_, **extra}


def fhir_bundle(base: str) -> dict[str, Any]:
    """A Carequality-style directory search result modelled on spec digest §9."""
    a_oid = A["home_community_id"][8:]
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in [
        organization(a_oid, "Community A Imaging", [
            endpoint("e1", "ITI-55", base + XCPD.path), endpoint("e2", "ITI-38", base + XCA_QUERY.path),
            endpoint("e3", "ITI-39", base + XCA_RETRIEVE.path), endpoint("e4", "RAD-75", base + XCAI_RETRIEVE.path),
            endpoint("e5", "ITI-41", base + "/xdr")]),
        organization("2.999.10.2", "Plain HTTP Clinic", [endpoint("h1", "ITI-55", "http://clinic.example/xcpd")]),
        {**organization("2.999.10.3", "Closed Hospital", [endpoint("c1", "ITI-55", "https://closed.example/x")]),
         "active": False},
        organization("not-an-oid", "Broken Org", [endpoint("b1", "ITI-55", "https://broken.example/x")]) | {
            "identifier": []},
        organization("2.999.10.5", "A Satellite Clinic", [],
                     partOf={"reference": f"Organization/{a_oid}", "type": "Organization"}),
        organization("2.999.10.6", "Half Documented", [
            endpoint("x1", None, "https://half.example/query"), endpoint("x2", "ITI-55", "https://half.example/xcpd"),
            endpoint("x3", "ITI-38", "https://half.example/old", status="off")]),
        {**organization("2.999.10.7", "Bundled Endpoints", []),
         "endpoint": [{"reference": "Endpoint/shared-xcpd"}, {"reference": "Endpoint/missing"}]},
        {"resourceType": "Endpoint", "id": "shared-xcpd", "status": "active", "address": "https://hie.example/xcpd",
         "extension": [{"url": TX, "valueCodeableConcept": {"coding": [{"code": "ITI-55"}]}}]},
        organization("2.999.10.8", "Only XDR", [endpoint("d1", "ITI-41", "https://xdr.example/x")]),
    ]]}


def test_parse_fhir_directory_and_overrides(network: Network) -> None:
    base = "https://a.example:8443"
    parsed = parse_fhir_directory(fhir_bundle(base))
    by_name = {p.name: p for p in parsed}
    assert set(by_name) == {"Community A Imaging", "A Satellite Clinic", "Half Documented", "Bundled Endpoints"}
    a = by_name["Community A Imaging"]
    assert a.home_community_id == A["home_community_id"] and a.source == "directory"
    assert a.endpoints == {"ITI-55": base + XCPD.path, "ITI-38": base + XCA_QUERY.path,
                           "ITI-39": base + XCA_RETRIEVE.path, "RAD-75": base + XCAI_RETRIEVE.path}
    assert a.accepted_purposes == ("TREATMENT",)
    sat = by_name["A Satellite Clinic"]
    assert sat.endpoints == a.endpoints and sat.endpoints_from == a.home_community_id
    half = by_name["Half Documented"]
    assert half.endpoints == {"ITI-55": "https://half.example/xcpd"}
    assert by_name["Bundled Endpoints"].xcpd_url == "https://hie.example/xcpd"
    text = "\n".join(parsed.warnings)
    for expected in ("Plain HTTP Clinic (urn:oid:2.999.10.2): endpoint h1: ITI-55 address 'http://clinic.example/xcpd' "
                     "is not https://",
                     "Plain HTTP Clinic (urn:oid:2.999.10.2): skipped: no usable ITI-55, ITI-38, ITI-39 or RAD-75",
                     "Closed Hospital (urn:oid:2.999.10.3): skipped: marked inactive",
                     "Broken Org: skipped: its Organization.id 'not-an-oid' is not an OID",
                     "Half Documented (urn:oid:2.999.10.6): endpoint x1: no Transaction extension",
                     "endpoint x3: status 'off', not active",
                     "endpoint reference 'Endpoint/missing' does not resolve",
                     "Only XDR (urn:oid:2.999.10.8): skipped: no usable"):
        assert expected in text, text
    assert transaction_of("urn:ihe:iti:xcpd:2009 ITI-55") == "ITI-55" and transaction_of("RAD75") == "RAD-75"
    assert transaction_of("ITI-41") is None

    # the configuration overrides the directory field by field (here: RAD-75 URL and the timeout)
    override = PartnerSection(name="A (imaging)", home_community_id=A["home_community_id"].removeprefix("urn:oid:"),
                              xcai_retrieve_url="https://a-images.example/rad75", timeout_seconds=7)
    cfg = network.ig.model_copy(update={"partners": [override]})
    directory = PartnerDirectory.from_config(cfg, extra=parsed)
    merged = directory.resolve(A["home_community_id"].removeprefix("urn:oid:"))
    assert merged is not None and merged.name == "A (imaging)" and merged.timeout == 7
    assert merged.xcai_retrieve_url == "https://a-images.example/rad75" and merged.xcpd_url == base + XCPD.path
    assert directory.by_name("Community A Imaging") == merged
    assert directory.resolve("urn:oid:2.999.404") is None
    with pytest.raises(KeyError, match="2.999.404"):
        directory.by_hcid("2.999.404")
    assert {p.name for p in directory.partners("ITI-55")} == {"A (imaging)", "A Satellite Clinic", "Half Documented",
                                                               "Bundled Endpoints"}
    assert [p.name for p in directory.partners("RAD-75")] == ["A (imaging)", "A Satellite Clinic"]
