"""The NIST XCA-I 2018 Responding Imaging Gateway test kits (``rig_2018-*``), replayed against a real XIG.

Each kit (``shared/spec/samples/messages/rad75-xcai/nist-toolkit/tests/rig_2018-*``) holds a RAD-75
request body (``Rad75RetrieveRequest/RAD-75Request.xml``) and the response the NIST toolkit expects
(``ValidateRad75Response/testplan.xml``). Per kit this test:

1. starts a real XIG responding gateway (mutual TLS, signed assertions) with the kit's identifiers:
   home community ``urn:oid:1.3.6.1.4.1.21367.13.70.201`` and two filesystem PACS, NIST's Imaging
   Document Sources "E" (``1.3.6.1.4.1.21367.13.71.201.1``) and "F" (``...201.2``), in separate folders;
2. seeds the NIST data set the kit addresses: every instance some kit retrieves successfully (or
   fails only for its transfer syntax) is part of E or F; a kit gets the instances of the series its
   request names, synthesised with exactly the kit's Study/Series/SOP Instance UIDs, in the
   repository of its DocumentRequest and in the transfer syntax the kit implies (:data:`STORED_SYNTAX`).
   Instances the kit expects to be unknown (the ``....999`` UIDs) exist nowhere;
3. authorises the requesting community the real way: ITI-38 FindDocuments for the patient, ITI-39
   for the KOS of every study (whose references must be exactly the seeded instances, each with its
   IDS as Retrieve Location UID);
4. sends the kit's RAD-75 body verbatim (MTOM, signed assertion) and compares the answer with the
   kit's expected response: status, errorCodes, severity, DocumentResponse identifiers echoed,
   mimeType, XSD validity and, for every returned part, that it is the seeded object (SOP Instance
   UID, the kit's ``ValidateReturnedImages`` tag list, pixel hash, byte identity when returned as
   stored) in a transfer syntax the request listed.

Where XIG deliberately answers differently from the NIST toolkit, XIG's behaviour is asserted. The
differences (applied by :data:`ERROR_CODE_MAP` and :func:`xig_expectation`):

================  ==========================================  ==================================================
Item              NIST toolkit expects                        XIG answers (and why)
================  ==========================================  ==================================================
unknown           errorCode ``XDSIUnknownIdsUid`` (5424c)     ``XDSUnknownRepositoryId``: the NIST code is not an
repository                                                    IHE code; ITI TF-3 Table 4.2.4.1-2 has this one
                                                              (samples README, item 1)
RegistryError     the SOP UID (5424a) or a simulator name     ``<DocumentUniqueId> (<homeCommunityId>)`` for every
@location         (``IdsActorSimulator EL-2``,                per-instance error (XCA convention: an initiating
                  ``RigImgDocSetRet``)                        gateway can attribute it)
codeContext       NIST wording ("No document matching         XIG's own wording, asserted on its essential content
                  composite UID [..]", "IDS cannot encode     only (:data:`CONTEXT_MUST_NAME`); 5425a's kit text
                  the pixel data using ...")                  even names a UID not in its request ("...003.1omit")
unknown           XDSDocumentUniqueIdError once the IDS has   same code, decided before any PACS lookup: an
instance          looked the composite UID up                 instance no KOS delivered to the caller references
                                                              is refused like a guess (Carequality Imaging-002);
                                                              the answer never reveals whether it exists
RAD-69 fan-out    ``ValidateRad69Request*``: one RAD-69 per   not applicable: XIG's imaging sources are PACS
                  IDS, TransferSyntaxUIDList passed through   behind it (filesystem stores here). Routing by
                                                              RepositoryUniqueId is checked instead: an instance
                                                              exists only in its own IDS's store, and 5424c's
                                                              exists in E but is asked of the unknown .2.999
transfer-syntax   XDSRepositoryError (5424a: only JPEG        same; XIG never *produces* lossy compression, so a
failure           Baseline .4.50 accepted)                    losslessly stored image cannot be given as .4.50
================  ==========================================  ==================================================

The JPEG kits (5422a, 5422b) store JPEG Lossless SV1 (``1.2.840.10008.1.2.4.70``), produced from the
synthetic image with XIG's own encoder (``transcode.transcode``) and checked pixel-exact with an
independent decoder (pylibjpeg-libjpeg) when the part comes back. Everything is generated at test
time; nothing binary is committed.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from lxml import etree

from gateway.config import Config, load_config
from gateway.dicom import transcode
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import make_instance
from gateway.ihe import ebrim, iti38, iti39
from gateway.ihe.iti39 import DocumentRequest
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom
from gateway.soap.schema import default_schemas
from gateway.web.client import SoapClient, SoapReply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE
from gateway.web.server import BackgroundServer
from tests.conftest import IHE_TEST_IDS, SAMPLES

KITS_DIR = SAMPLES / "messages" / "rad75-xcai" / "nist-toolkit" / "tests"
KIT_NAMES = sorted(p.name for p in KITS_DIR.glob("rig_2018-*")) if KITS_DIR.is_dir() else []

#: the kits' identifiers (checked against the files by test_kits_use_one_community_and_two_sources)
HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.201"
IDS_E = "1.3.6.1.4.1.21367.13.71.201.1"
IDS_F = "1.3.6.1.4.1.21367.13.71.201.2"
AA = IHE_TEST_IDS["assigning_authority"]
#: the initiating community calling us (a community of its own, not ours)
CALLER_HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.101"
PATIENT_ID = "NIST-RIG-1"

EVRLE = transcode.EXPLICIT_VR_LITTLE_ENDIAN
JPEG_LOSSLESS_SV1 = transcode.JPEG_LOSSLESS_SV1
#: transfer syntax the IDS holds the kit's images in: the "single JPEG image" kits hold JPEG Lossless
#: (5422a accepts only .4.70 and expects success; 5422b offers .4.50 or .4.70), every other kit an
#: uncompressed image (5424a: "IDS cannot encode the pixel data" as JPEG Baseline).
STORED_SYNTAX = {"rig_2018-5422a": JPEG_LOSSLESS_SV1, "rig_2018-5422b": JPEG_LOSSLESS_SV1}

#: NIST error code → the code XIG answers with (see the module docstring)
ERROR_CODE_MAP = {"XDSIUnknownIdsUid": "XDSUnknownRepositoryId"}

RS_STATUS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:"
PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"


# ----------------------------------------------------------------------------------------------------
# Reading the kits (with lxml only: XIG's own parsers are what is under test)
# ----------------------------------------------------------------------------------------------------

def _local(el: etree._Element) -> str:
    return etree.QName(el).localname if isinstance(el.tag, str) else ""


def _children(el: etree._Element, name: str) -> list[etree._Element]:
    return [c for c in el if _local(c) == name]


def _text(el: etree._Element, name: str) -> str:
    found = _children(el, name)
    return "".join(found[0].itertext()).strip() if found else ""


@dataclass(frozen=True)
class Requested:
    study: str
    series: str
    hcid: str
    repo: str
    uid: str


@dataclass(frozen=True)
class ExpectedDocument:
    hcid: str
    repo: str
    uid: str
    mime_type: str


@dataclass(frozen=True)
class ExpectedError:
    code: str
    context: str
    location: str
    severity: str


@dataclass(frozen=True)
class Kit:
    name: str
    goal: str
    expected_status: str  # Rad75RetrieveRequest testplan: Success / PartialSuccess / Failure
    request_path: Path
    requested: tuple[Requested, ...]
    syntaxes: tuple[str, ...]
    status: str  # the RegistryResponse/@status of the expected response
    documents: tuple[ExpectedDocument, ...]
    errors: tuple[ExpectedError, ...]
    image_tags: tuple[str, ...]  # ValidateReturnedImages TagList (empty when the kit has none)

    @property
    def failed(self) -> list[Requested]:
        """Requested instances the kit expects not to be returned, in request order."""
        returned = {d.uid for d in self.documents}
        return [r for r in self.requested if r.uid not in returned]

    def expected_code(self, r: Requested) -> str | None:
        """The NIST errorCode for a requested instance (kit errors belong to failed requests in order)."""
        failed = self.failed
        return self.errors[failed.index(r)].code if r in failed else None


def _parse_request(path: Path) -> tuple[tuple[Requested, ...], tuple[str, ...]]:
    root = etree.parse(str(path)).getroot()
    assert _local(root) == "RetrieveImagingDocumentSetRequest"
    requested: list[Requested] = []
    for study in _children(root, "StudyRequest"):
        for series in _children(study, "SeriesRequest"):
            for doc in _children(series, "DocumentRequest"):
                requested.append(Requested(study.get("studyInstanceUID", ""), series.get("seriesInstanceUID", ""),
                                           _text(doc, "HomeCommunityId"), _text(doc, "RepositoryUniqueId"),
                                           _text(doc, "DocumentUniqueId")))
    syntaxes = tuple(t for lst in _children(root, "TransferSyntaxUIDList")
                     for t in ("".join(e.itertext()).strip() for e in _children(lst, "TransferSyntaxUID")))
    return tuple(requested), syntaxes


@cache
def load_kit(name: str) -> Kit:
    d = KITS_DIR / name
    retrieve_plan = etree.parse(str(d / "Rad75RetrieveRequest" / "testplan.xml")).getroot()
    step = retrieve_plan.find("TestStep")
    assert step is not None
    requested, syntaxes = _parse_request(d / "Rad75RetrieveRequest" / "RAD-75Request.xml")
    plan = etree.parse(str(d / "ValidateRad75Response" / "testplan.xml")).getroot()
    response = next(e for e in plan.iter() if _local(e) == "RetrieveDocumentSetResponse")
    rr = _children(response, "RegistryResponse")[0]
    errors = tuple(ExpectedError(e.get("errorCode", ""), e.get("codeContext", ""), e.get("location", ""),
                                 e.get("severity", ""))
                   for e in rr.iter() if _local(e) == "RegistryError")
    documents = tuple(ExpectedDocument(_text(dr, "HomeCommunityId"), _text(dr, "RepositoryUniqueId"),
                                       _text(dr, "DocumentUniqueId"), _text(dr, "mimeType"))
                      for dr in _children(response, "DocumentResponse"))
    tags: tuple[str, ...] = ()
    images = d / "ValidateReturnedImages" / "testplan.xml"
    if images.exists():
        tags = tuple(_local(t) for t in etree.parse(str(images)).getroot().iter()
                     if isinstance(t.tag, str) and t.getparent() is not None and _local(t.getparent()) == "TagList")
    return Kit(name=name, goal=step.findtext("Goal", "").strip(), expected_status=step.findtext("ExpectedStatus", ""),
               request_path=d / "Rad75RetrieveRequest" / "RAD-75Request.xml", requested=requested,
               syntaxes=syntaxes, status=rr.get("status", ""), documents=documents, errors=errors, image_tags=tags)


@cache
def nist_data_set() -> dict[str, Requested]:
    """SOP Instance UID → where it lives: every instance a kit returns, or refuses only for its syntax."""
    found: dict[str, Requested] = {}
    for name in KIT_NAMES:
        kit = load_kit(name)
        for r in kit.requested:
            if kit.expected_code(r) in (None, "XDSRepositoryError"):
                assert found.setdefault(r.uid, r) == r, f"{name}: {r.uid} lives elsewhere in another kit"
    return found


def seeds_for(kit: Kit) -> list[Requested]:
    """The data-set instances of every series the kit's request names (what NIST's IDS E/F hold there)."""
    series = {(r.study, r.series) for r in kit.requested}
    return sorted((r for r in nist_data_set().values() if (r.study, r.series) in series),
                  key=lambda r: (r.repo, r.study, r.series, r.uid))


#: per error code, what XIG's codeContext must name for a failed request
CONTEXT_MUST_NAME = {
    "XDSRepositoryError": lambda r, kit: ["cannot encode the pixel data using any of the requested transfer syntaxes",
                                          *kit.syntaxes],
    "XDSDocumentUniqueIdError": lambda r, kit: [r.uid],
    "XDSUnknownRepositoryId": lambda r, kit: [r.repo],
}


def xig_expectation(kit: Kit) -> list[tuple[str, str, str, list[str]]]:
    """XIG's RegistryErrors for the kit: ``(code, location, severity, phrases the context must contain)``."""
    out = []
    for r, e in zip(kit.failed, kit.errors, strict=True):
        code = ERROR_CODE_MAP.get(e.code, e.code)
        out.append((code, f"{r.uid} ({HCID})", e.severity, CONTEXT_MUST_NAME[code](r, kit)))
    return out


# ----------------------------------------------------------------------------------------------------
# Sanity of the kits themselves
# ----------------------------------------------------------------------------------------------------

def test_all_eleven_kits_are_there() -> None:
    assert len(KIT_NAMES) == 11, f"NIST rig_2018 kits not found under {KITS_DIR}"


def test_kits_use_one_community_and_two_sources() -> None:
    repos: set[str] = set()
    for name in KIT_NAMES:
        kit = load_kit(name)
        assert {r.hcid for r in kit.requested} | {d.hcid for d in kit.documents} == {HCID}, name
        assert kit.status.endswith(kit.expected_status), name
        assert len(kit.errors) == len(kit.failed), f"{name}: one RegistryError per instance not returned"
        repos |= {r.repo for r in kit.requested}
    assert {r.repo for r in nist_data_set().values()} == {IDS_E, IDS_F}
    assert repos == {IDS_E, IDS_F, IDS_F + ".999"}  # .2.999: rig_5424c's deliberately unknown IDS


# ----------------------------------------------------------------------------------------------------
# The gateway under test
# ----------------------------------------------------------------------------------------------------

def write_rig_config(directory: Path, pki: CertSet) -> Path:
    """A responding gateway with the NIST identifiers and one filesystem PACS per NIST IDS."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "xig.toml"
    path.write_text(f"""
[gateway]
home_community_id = "{HCID}"
assigning_authority = "{AA}"
repository_unique_id = "{IHE_TEST_IDS['repository_unique_id']}"
imaging_source_id = "{IDS_E}"

[server]
listen = "127.0.0.1:0"
certificate = "{pki.gateway_cert}"
private_key = "{pki.gateway_key}"
client_ca = "{pki.ca_cert}"

[saml]
trusted_issuers = "{pki.ca_cert}"
signing_certificate = "{pki.partner_cert}"
signing_key = "{pki.partner_key}"

[database]
url = "sqlite:///xig.db"

[[pacs]]
kind = "filesystem"
path = "ids-e"
imaging_source_id = "{IDS_E}"
name = "NIST IDS E"

[[pacs]]
kind = "filesystem"
path = "ids-f"
imaging_source_id = "{IDS_F}"
name = "NIST IDS F"
""")
    return path


@dataclass(frozen=True)
class Seeded:
    where: Requested
    syntax: str
    data: bytes  # the Part 10 object as stored in the PACS
    pixel_sha256: str  # of the native pixel values (little endian), whatever the stored syntax
    dataset: pydicom.Dataset


def _pixel_hash(ds: pydicom.Dataset) -> str:
    arr = np.ascontiguousarray(ds.pixel_array)
    return hashlib.sha256(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).hexdigest()


def seed(server: BackgroundServer, kit: Kit, staging: Path) -> dict[str, Seeded]:
    syntax = STORED_SYNTAX.get(kit.name, EVRLE)
    assert transcode.can_encode(syntax), f"installed codecs cannot produce {syntax}"
    out: dict[str, Seeded] = {}
    for n, r in enumerate(seeds_for(kit), start=1):
        path = staging / r.repo / f"{n}.dcm"
        inst = make_instance(path, patient_id=PATIENT_ID, patient_name="NIST^RIG", birth_date="19600101", sex="F",
                             issuer=AA, study_uid=r.study, series_uid=r.series, sop_uid=r.uid,
                             study_description=f"NIST data set {'E' if r.repo == IDS_E else 'F'}", modality="CR",
                             body_part="CHEST", instance_number=n, seed=r.uid)
        data = path.read_bytes()
        if syntax != EVRLE:
            data = transcode.transcode(data, syntax)
            path.write_bytes(data)
        ds = pydicom.dcmread(io.BytesIO(data))
        assert str(ds.file_meta.TransferSyntaxUID) == syntax and ds.SOPInstanceUID == r.uid
        assert _pixel_hash(ds) == inst.pixel_sha256  # the stored object holds the synthesised pixels exactly
        out[r.uid] = Seeded(r, syntax, data, inst.pixel_sha256, ds)
    for repo in {s.where.repo for s in out.values()}:
        backend = server.services.community.backend_for(repo)
        assert backend is not None
        report = backend.index_directory(staging / repo)
        assert report.ok and len(report.imported) == sum(s.where.repo == repo for s in out.values()), report.summary()
    return out


@asynccontextmanager
async def rig_gateway(tmp_path: Path, pki: CertSet) -> AsyncIterator[tuple[Config, BackgroundServer]]:
    cfg = load_config(write_rig_config(tmp_path / "gw", pki))
    server = BackgroundServer(cfg).start()
    try:
        yield cfg, server
    finally:
        server.stop()


async def call(cfg: Config, pki: CertSet, url: str, body: etree._Element, action: str, **kw: Any) -> SoapReply:
    """One request from the initiating community ``CALLER_HCID`` (its own signed assertion)."""
    async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
        reply = await c.call(url, body, action, security=security_header(cfg, url, home_community_id=CALLER_HCID),
                             **kw)
    assert reply.fault is None, reply.fault
    assert default_schemas().errors(reply.body) == []
    return reply


async def authorise(cfg: Config, pki: CertSet, base: str, seeded: dict[str, Seeded]) -> None:
    """ITI-38 FindDocuments for the patient, ITI-39 for every study's KOS (as tests/test_rad75_e2e.py)."""
    q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX(PATIENT_ID, AA)))
    found = iti38.parse_response((await call(cfg, pki, base + XCA_QUERY.path, q, XCA_QUERY.request_action)).body)
    studies = {s.where.study for s in seeded.values()}
    assert len(found.entries) == len(studies)
    req = iti39.build_request([DocumentRequest(HCID, e.repository_unique_id, e.unique_id) for e in found.entries])
    reply = await call(cfg, pki, base + XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action, use_mtom=True)
    got = iti39.parse_response(reply.body, reply.attachments)
    assert got.status == RS_STATUS + "Success" and len(got.documents) == len(studies)
    refs = set()
    for doc in got.documents:
        kos = parse_kos(doc.data if doc.data is not None else doc.attachment)
        refs |= {(r.study_uid, r.series_uid, r.sop_instance_uid, r.retrieve_location_uid) for r in kos.references}
    assert refs == {(s.where.study, s.where.series, s.where.uid, s.where.repo) for s in seeded.values()}


# ----------------------------------------------------------------------------------------------------
# The kits
# ----------------------------------------------------------------------------------------------------

def _response(body: etree._Element) -> tuple[str, list[ExpectedError], list[tuple[ExpectedDocument, str]]]:
    """``(status, errors, [(document, cid)])`` read from XIG's RetrieveDocumentSetResponse with lxml."""
    assert _local(body) == "RetrieveDocumentSetResponse"
    rr = _children(body, "RegistryResponse")[0]
    errors = [ExpectedError(e.get("errorCode", ""), e.get("codeContext", ""), e.get("location", ""),
                            e.get("severity", "")) for e in rr.iter() if _local(e) == "RegistryError"]
    docs = []
    for dr in _children(body, "DocumentResponse"):
        includes = mtom.find_xop_includes(dr)
        assert len(includes) == 1, "each DocumentResponse carries its image as one xop:Include"
        docs.append((ExpectedDocument(_text(dr, "HomeCommunityId"), _text(dr, "RepositoryUniqueId"),
                                      _text(dr, "DocumentUniqueId"), _text(dr, "mimeType")), includes[0][1]))
    return rr.get("status", ""), errors, docs


def _check_image(kit: Kit, doc: ExpectedDocument, data: bytes, seeded: dict[str, Seeded]) -> None:
    stored = seeded[doc.uid]
    ds = pydicom.dcmread(io.BytesIO(data))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    assert syntax in kit.syntaxes, f"{doc.uid} returned in {syntax}, not one of {kit.syntaxes}"
    assert ds.SOPInstanceUID == doc.uid == stored.where.uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == doc.uid
    for tag in kit.image_tags or ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert ds.get(tag) == stored.dataset.get(tag), f"{doc.uid}: {tag} differs from the stored image"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (stored.where.study, stored.where.series)
    assert _pixel_hash(ds) == stored.pixel_sha256, f"{doc.uid}: pixels differ from the stored image"
    if syntax == stored.syntax:
        assert data == stored.data, f"{doc.uid}: a stored syntax the consumer accepts is returned byte for byte"


@pytest.mark.parametrize("kit_name", KIT_NAMES)
async def test_nist_rig_kit(kit_name: str, pki: CertSet, tmp_path: Path) -> None:
    kit = load_kit(kit_name)
    async with rig_gateway(tmp_path, pki) as (cfg, server):
        seeded = seed(server, kit, tmp_path / "staging")
        for r in kit.requested:
            if kit.expected_code(r) in (None, "XDSRepositoryError"):  # returned, or refused for its syntax only
                assert seeded[r.uid].where == r
            elif kit.expected_code(r) == "XDSDocumentUniqueIdError":  # unknown instances exist nowhere
                assert r.uid not in seeded
        if seeded:
            await authorise(cfg, pki, server.url, seeded)

        body = etree.parse(str(kit.request_path)).getroot()  # verbatim
        reply = await call(cfg, pki, server.url + XCAI_RETRIEVE.path, body, XCAI_RETRIEVE.request_action,
                           use_mtom=True)

    assert reply.action == XCAI_RETRIEVE.response_action and reply.is_mtom
    status, errors, docs = _response(reply.body)
    assert status == kit.status, f"{kit.name} ({kit.goal})"
    # DocumentResponses: the kit's, in its order, identifiers echoed, application/dicom
    assert [d for d, _ in docs] == list(kit.documents)
    assert all(d.mime_type == "application/dicom" for d, _ in docs)
    # RegistryErrors: the kit's codes (mapped), one per instance not returned, in request order
    want = xig_expectation(kit)
    assert [e.code for e in errors] == [w[0] for w in want], [(e.code, e.context) for e in errors]
    for e, (_, location, severity, phrases) in zip(errors, want, strict=True):
        assert e.location == location and e.severity == severity == SEVERITY_ERROR
        for phrase in phrases:
            assert phrase in e.context, f"{e.code}: {phrase!r} not in {e.context!r}"
    # the parts: exactly one per DocumentResponse, each the seeded image
    attachments = {mtom.normalize_content_id(k): v for k, v in reply.attachments.items()}
    assert set(attachments) == {cid for _, cid in docs}
    for doc, cid in docs:
        data = attachments[cid]
        _check_image(kit, doc, bytes(data) if not isinstance(data, Path) else data.read_bytes(), seeded)


def test_seeding_covers_every_kit_outcome() -> None:
    """What each kit gets in its PACS (a readable summary of the seeding rule, and a guard against drift)."""
    summary = {name: sorted((s.repo, s.uid.rsplit(".", 2)[-2] + "." + s.uid.rsplit(".", 1)[-1])
                            for s in seeds_for(load_kit(name))) for name in KIT_NAMES}
    e, f = IDS_E, IDS_F
    assert summary == {
        "rig_2018-5421a": [(e, "201606021454003.1")],
        "rig_2018-5421b": [(e, "201606021454003.1"), (e, "201606021454007.1")],
        "rig_2018-5421c": [(f, f"201606061008031.{i}") for i in range(1, 6)],
        "rig_2018-5422a": [(e, "201606021454003.1")],
        "rig_2018-5422b": [(e, "201606021454003.1")],
        "rig_2018-5423a": [(e, "201607011605056.1"), (f, "201607011606000.1")],
        "rig_2018-5424a": [(e, "201606021454003.1")],
        "rig_2018-5424b": [(e, "201606021454003.1")],  # the series exists; its .999 instance does not
        "rig_2018-5424c": [(e, "201606021454003.1")],  # in E, but asked of the unknown IDS .2.999
        "rig_2018-5425a": [(e, "201606021454003.1")],
        "rig_2018-5425b": [(e, "201607011605056.1"), (f, "201607011606000.1")],
    }

