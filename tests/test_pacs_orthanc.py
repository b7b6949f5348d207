"""The DIMSE (C-GET and C-MOVE) and DICOMweb adapters against a real Orthanc.

Seeds two patients (one study with three series of two modalities, one single-image study stored
in Implicit VR Little Endian) and runs every backend method through each adapter. Everything here
uses its own patient IDs and UIDs, so it works on an Orthanc shared with other test modules.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.dicom.synth import SyntheticStudy, derive_uid, make_instance, make_study
from gateway.pacs.base import (
    InstanceRef,
    PacsBackend,
    PacsError,
    PatientQuery,
    RetrievedInstance,
    RetrieveFailure,
)
from gateway.pacs.dicomweb import DicomwebBackend, MultipartReader
from gateway.pacs.dimse import DimseBackend, _ReactorCheckpoint
from tests.conftest import logging_to
from tests.orthanc import OrthancServer

SOURCE_ID = "2.999.77.1"
ADAPTERS = ["c-get", "c-move", "dicomweb"]


def make_backend(kind: str, server: OrthancServer, **kwargs: object) -> PacsBackend:
    if kind == "dicomweb":
        return DicomwebBackend(server.dicomweb_url, source_id=SOURCE_ID, timeout=10)
    return DimseBackend(host="127.0.0.1", port=server.dicom_port, called_ae=server.aet, calling_ae="XIG",
                        source_id=SOURCE_ID, retrieve=kind,  # type: ignore[arg-type]
                        move_port=server.move_port, move_host="127.0.0.1", timeout=10, dimse_timeout=30,
                        **kwargs)  # type: ignore[arg-type]


@dataclass
class Seed:
    a: SyntheticStudy
    b: SyntheticStudy


@pytest.fixture(scope="module")
def seeded(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Seed:
    root = tmp_path_factory.mktemp("seed")
    a = make_study(root / "a", patient_id="XIGPACS-A", patient_name="Zebulon^Ann", birth_date="19800312", sex="F",
                   issuer="2.999.77.10", accession="ACC-77A", accession_issuer="2.999.77.20",
                   study_description="CT chest / MR head", study_date="20240110",
                   series=[("CT", 3, "CHEST"), ("CT", 2, "CHEST"), ("MR", 2, "HEAD")], seed="pacs-a")
    b = make_study(root / "b", patient_id="XIGPACS-B", patient_name="Quarrington^Bob", birth_date="19170605",
                   sex="M", accession="ACC-77B", study_description="CR chest", study_date="20230305",
                   series=[("CR", 1, "CHEST")], transfer_syntax="1.2.840.10008.1.2", seed="pacs-b")
    orthanc.upload(a.paths + b.paths)
    return Seed(a, b)


@pytest.fixture(params=ADAPTERS)
async def backend(request: pytest.FixtureRequest, orthanc: OrthancServer) -> AsyncIterator[PacsBackend]:
    b = make_backend(request.param, orthanc)
    try:
        yield b
    finally:
        await b.aclose()


def dataset_bytes(part10: bytes) -> bytes:
    """The bytes after the File Meta group: (0002,0000) group length sits at offset 132..144."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    return part10[144 + struct.unpack_from("<I", part10, 140)[0]:]


def refs_of(study: SyntheticStudy) -> list[InstanceRef]:
    return [InstanceRef(i.StudyInstanceUID, i.SeriesInstanceUID, i.SOPInstanceUID) for i in study.instances]


async def collect(backend: PacsBackend, refs: list[InstanceRef]) -> tuple[dict[str, bytes], dict[str, str]]:
    got: dict[str, bytes] = {}
    failed: dict[str, str] = {}
    async for item in backend.retrieve(refs):
        if isinstance(item, RetrievedInstance):
            got[item.ref.SOPInstanceUID] = b"".join([c async for c in item.chunks])
            assert item.TransferSyntaxUID and item.SOPClassUID
        else:
            assert isinstance(item, RetrieveFailure)
            failed[item.ref.SOPInstanceUID] = item.reason
    return got, failed


# --------------------------------------------------------------------------------------------------

async def test_ping(backend: PacsBackend) -> None:
    await backend.ping()


async def test_find_patients_by_family_prefix(backend: PacsBackend, seeded: Seed) -> None:
    found = await backend.find_patients(PatientQuery(family="zebu"))
    mine = [p for p in found if p.PatientID == "XIGPACS-A"]
    assert len(mine) == 1
    p = mine[0]
    assert (p.PatientName, p.PatientBirthDate, p.PatientSex, p.IssuerOfPatientID) == \
        ("Zebulon^Ann", "19800312", "F", "2.999.77.10")
    assert not any(p.PatientID == "XIGPACS-B" for p in found)
    # the prefix is a prefix of the family name only, not any substring
    assert not any(p.PatientID == "XIGPACS-A" for p in await backend.find_patients(PatientQuery(family="ebulon")))


async def test_find_patients_by_birth_date_range(backend: PacsBackend, seeded: Seed) -> None:
    found = await backend.find_patients(PatientQuery(birth_date_from="19170101", birth_date_to="19171231"))
    ids = {p.PatientID for p in found}
    assert "XIGPACS-B" in ids and "XIGPACS-A" not in ids
    both = await backend.find_patients(PatientQuery(family="Zebulon", birth_date_from="19800101",
                                                    birth_date_to="19800331"))
    assert "XIGPACS-A" in {p.PatientID for p in both}
    none = await backend.find_patients(PatientQuery(family="Zebulon", birth_date_from="19900101",
                                                    birth_date_to="19901231"))
    assert "XIGPACS-A" not in {p.PatientID for p in none}


async def test_find_patients_by_id(backend: PacsBackend, seeded: Seed) -> None:
    found = await backend.find_patients(PatientQuery(patient_ids=("XIGPACS-B", "XIGPACS-NOBODY")))
    assert [p.PatientID for p in found if p.PatientID.startswith("XIGPACS-")] == ["XIGPACS-B"]


async def test_find_studies_full_tree(backend: PacsBackend, seeded: Seed) -> None:
    studies = await backend.find_studies("XIGPACS-A")
    assert len(studies) == 1
    st = studies[0]
    a = seeded.a
    assert st.StudyInstanceUID == a.StudyInstanceUID
    assert st.AccessionNumber == "ACC-77A"
    assert st.StudyDate == "20240110"
    assert st.StudyDescription == "CT chest / MR head"
    assert st.patient.PatientID == "XIGPACS-A" and st.patient.PatientName == "Zebulon^Ann"
    assert st.source_id == SOURCE_ID
    assert st.modalities == ("CT", "MR")
    assert [len(s.instances) for s in st.series] == [3, 2, 2]
    assert [s.SeriesInstanceUID for s in st.series] == [s.SeriesInstanceUID for s in a.series]
    assert [s.BodyPartExamined for s in st.series] == ["CHEST", "CHEST", "HEAD"]
    assert st.instance_count == 7
    expected = {i.SOPInstanceUID: (i.SOPClassUID, i.InstanceNumber) for i in a.instances}
    assert {i.SOPInstanceUID: (i.SOPClassUID, i.InstanceNumber) for _, i in st.instances()} == expected
    if isinstance(backend, DimseBackend):
        assert st.RetrieveAETitle == "ORTHANC"
        assert st.AccessionNumberIssuer == "2.999.77.20"  # Orthanc answers the sequence over C-FIND, not QIDO
    # issuer: matching or absent → found; a different issuer → not this patient's study
    assert len(await backend.find_studies("XIGPACS-A", "2.999.77.10")) == 1
    assert await backend.find_studies("XIGPACS-A", "2.999.77.99") == []
    assert await backend.find_studies("XIGPACS-NOBODY") == []


async def test_get_study(backend: PacsBackend, seeded: Seed) -> None:
    st = await backend.get_study(seeded.b.StudyInstanceUID)
    assert st is not None
    assert st.patient.PatientID == "XIGPACS-B"
    assert st.modalities == ("CR",) and st.instance_count == 1
    assert st.series[0].instances[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert (await backend.get_study(derive_uid("no such study"))) is None


async def test_retrieve_is_byte_identical(backend: PacsBackend, seeded: Seed) -> None:
    sources = {i.SOPInstanceUID: i for i in seeded.a.instances + seeded.b.instances}
    got, failed = await collect(backend, refs_of(seeded.a) + refs_of(seeded.b))
    assert failed == {}
    assert set(got) == set(sources)
    for sop, data in got.items():
        src = sources[sop]
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SOPInstanceUID == sop
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SeriesInstanceUID == src.SeriesInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == sop
        # the stored transfer syntax is preserved (B is Implicit VR Little Endian)
        assert ds.file_meta.TransferSyntaxUID == src.TransferSyntaxUID
        assert hashlib.sha256(ds.PixelData).hexdigest() == src.pixel_sha256
        if isinstance(backend, DicomwebBackend):
            assert data == src.path.read_bytes()  # WADO-RS with transfer-syntax=* returns the file as stored
        # the data set after the File Meta is exactly what was stored (DIMSE: pynetdicom writes its own meta)
        assert dataset_bytes(data) == dataset_bytes(src.path.read_bytes())


async def test_orthanc_wado_parts_are_read_by_their_content_length(orthanc: OrthancServer, seeded: Seed,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Orthanc's WADO-RS parts carry a Content-Length: the reader takes the counted path (no delimiter search
    through the instances), and the bytes are the stored files."""
    counted: list[int] = []
    read_counted = MultipartReader._read_counted

    async def spy(self: MultipartReader, remaining: int) -> bytes | memoryview | None:
        counted.append(remaining)
        return await read_counted(self, remaining)

    monkeypatch.setattr(MultipartReader, "_read_counted", spy)
    sources = {i.SOPInstanceUID: i for i in seeded.a.instances}
    got, failed = await collect(make_backend("dicomweb", orthanc), refs_of(seeded.a))
    assert failed == {} and got == {sop: i.path.read_bytes() for sop, i in sources.items()}
    assert set(counted) >= {i.path.stat().st_size for i in sources.values()}  # each part's whole length


async def test_a_retrieve_right_after_the_study_tree_asks_orthanc_no_series_query(orthanc: OrthancServer,
                                                                                 seeded: Seed) -> None:
    """The tree a manifest is built from (``get_study``) already counted each series' instances: the RAD-75
    that follows goes straight to WADO-RS, and gets every instance."""
    b = make_backend("dicomweb", orthanc)
    assert isinstance(b, DicomwebBackend)
    asked: list[str] = []
    qido = b._qido

    async def spy(path: str, match: dict[str, str], fields: Sequence[str] = ()) -> list[dict[str, Any]]:
        asked.append(path)
        return await qido(path, match, fields)

    b._qido = spy  # type: ignore[method-assign]
    try:
        study = await b.get_study(seeded.a.StudyInstanceUID)
        assert study is not None and sum(len(s.instances) for s in study.series) == len(seeded.a.instances)
        before = len(asked)
        got, failed = await collect(b, refs_of(seeded.a))
    finally:
        await b.aclose()
    assert failed == {} and got == {i.SOPInstanceUID: i.path.read_bytes() for i in seeded.a.instances}
    assert asked[before:] == []


@pytest.mark.parametrize("verbose", [False, True])
async def test_pynetdicom_logs_its_messages_only_when_verbose(orthanc: OrthancServer, seeded: Seed,
                                                              verbose: bool) -> None:
    """At INFO pynetdicom says nothing of a query and a retrieve (it logged each DIMSE message and
    identifier); with ``--verbose`` (DEBUG) its detail is back."""
    stream = io.StringIO()
    with logging_to(stream, json=False, level=logging.DEBUG if verbose else logging.INFO):
        backend = make_backend("c-get", orthanc)
        assert (await backend.get_study(seeded.b.StudyInstanceUID)) is not None
        got, failed = await collect(backend, refs_of(seeded.b))
        assert len(got) == 1 and not failed
    lines = [line for line in stream.getvalue().splitlines() if " pynetdicom." in line]
    if verbose:
        assert any("Identifier" in line for line in lines) and any("C-GET" in line for line in lines), lines[:20]
    else:
        assert lines == []


async def test_retrieve_reports_unknown_instances_only(backend: PacsBackend, seeded: Seed) -> None:
    a = seeded.a
    known = refs_of(a)[:2] + refs_of(a)[5:6]
    unknown_in_known_series = InstanceRef(a.StudyInstanceUID, a.series[0].SeriesInstanceUID, derive_uid("nope", 1))
    unknown_series = InstanceRef(a.StudyInstanceUID, derive_uid("nope-series"), derive_uid("nope", 2))
    refs = [known[0], unknown_in_known_series, known[1], unknown_series, known[2]]
    results: list[RetrievedInstance | RetrieveFailure] = []
    delivered = set()
    async for item in backend.retrieve(refs):
        results.append(item)
        if isinstance(item, RetrievedInstance):  # read each instance before asking for the next item
            delivered.add(item.ref.SOPInstanceUID)
            async for _ in item.chunks:
                pass
    assert len(results) == len(refs)  # one result per ref
    failures = {i.ref.SOPInstanceUID: i.reason for i in results if isinstance(i, RetrieveFailure)}
    assert delivered == {r.SOPInstanceUID for r in known}
    assert set(failures) == {unknown_in_known_series.SOPInstanceUID, unknown_series.SOPInstanceUID}
    assert all("not found" in reason for reason in failures.values())


async def test_retrieve_stops_cleanly_when_the_consumer_stops(backend: PacsBackend, seeded: Seed) -> None:
    refs = refs_of(seeded.a)
    stream = backend.retrieve(refs)
    first = await stream.__anext__()
    assert isinstance(first, RetrievedInstance)
    await stream.aclose()  # type: ignore[attr-defined]
    got, failed = await collect(backend, refs[:2])  # the backend is still usable
    assert len(got) == 2 and not failed


async def test_concurrent_retrieves(backend: PacsBackend, seeded: Seed) -> None:
    """Two retrieves at once on one backend (C-MOVE: one shared Storage SCP, routed by SOP Instance UID)."""
    results: dict[str, tuple[dict[str, bytes], dict[str, str]]] = {}

    async def run(name: str, refs: list[InstanceRef]) -> None:
        results[name] = await collect(backend, refs)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a", refs_of(seeded.a))
        tg.start_soon(run, "b", refs_of(seeded.b))
    for name, study in (("a", seeded.a), ("b", seeded.b)):
        delivered, failed = results[name]
        # on failure the reasons say what the PACS answered (this once failed in a full-suite run, c-get)
        assert set(delivered) == {i.SOPInstanceUID for i in study.instances} and not failed, (name, failed)


class _FreezingCheckpoint(_ReactorCheckpoint):
    """Holds the association's reactor thread right after one of its ``wait()`` calls returned — where a
    busy machine can preempt it — until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.freeze_next = threading.Event()
        self.frozen = threading.Event()
        self.go_on = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        result = super().wait(timeout)
        if self.freeze_next.is_set():
            self.freeze_next.clear()
            self.frozen.set()
            self.go_on.wait(10)
        return result


def test_requests_wait_until_the_association_reactor_is_really_parked(orthanc: OrthancServer) -> None:
    """pynetdicom pauses an association's reactor by polling a flag the reactor sets before ``wait()``: a
    reactor just back from ``wait()`` looks paused and can still take (and drop) the first response of the
    next request. XIG parks it first, and a park completes only once the reactor waits on it."""
    backend = make_backend("c-get", orthanc)
    assert isinstance(backend, DimseBackend)
    with backend._association([(Verification, [ExplicitVRLittleEndian])]) as assoc:
        checkpoint = _FreezingCheckpoint()
        assoc._reactor_checkpoint = checkpoint  # type: ignore[assignment]
        checkpoint.freeze_next.set()
        assert checkpoint.frozen.wait(10)  # the reactor returned from wait() and is held there
        assert assoc._is_paused  # what pynetdicom's own pause loop trusts: "paused"
        assert not checkpoint.park(0.3)  # not parked: a request now could lose its response
        checkpoint.go_on.set()
        assert checkpoint.park(10)  # the reactor finished its round and waits on the cleared checkpoint
        status = assoc.send_c_echo()
        assert int(status.Status) == 0x0000
    assert backend.open_associations == 0


async def test_store_then_find(backend: PacsBackend, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    kind = request.node.callspec.params["backend"]
    pid = f"XIGPACS-STORE-{kind}"
    inst = make_instance(tmp_path / "new.dcm", patient_id=pid, patient_name="Storer^Sue", modality="MR",
                         body_part="KNEE", seed=kind)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    result = await backend.store([inst.path, bad])
    assert result.stored == [inst.SOPInstanceUID]
    assert list(result.failed) == [str(bad)]
    studies = await backend.find_studies(pid)
    assert [s.StudyInstanceUID for s in studies] == [inst.StudyInstanceUID]
    assert studies[0].series[0].instances[0].SOPInstanceUID == inst.SOPInstanceUID
    assert studies[0].modalities == ("MR",)


async def test_cmove_without_move_port_fails_per_instance(orthanc: OrthancServer, seeded: Seed) -> None:
    b = DimseBackend(host="127.0.0.1", port=orthanc.dicom_port, source_id=SOURCE_ID, retrieve="c-move", timeout=10)
    try:
        got, failed = await collect(b, refs_of(seeded.b))
    finally:
        await b.aclose()
    assert got == {}
    assert "move_port" in failed[seeded.b.instances[0].SOPInstanceUID]


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_pacs_down_raises_pacs_error(kind: str, tmp_path: Path, seeded: Seed) -> None:
    server = OrthancServer(tmp_path / "short-lived")
    server.start()
    b = make_backend(kind, server)
    try:
        await b.ping()
        server.kill()
        with pytest.raises(PacsError):
            await b.ping()
        with pytest.raises(PacsError):
            await b.find_patients(PatientQuery(family="Zebulon"))
        with pytest.raises(PacsError):
            await b.find_studies("XIGPACS-A")
        with pytest.raises(PacsError):
            await b.get_study(seeded.a.StudyInstanceUID)
        got, failed = await collect(b, refs_of(seeded.a))
        assert got == {} and set(failed) == {i.SOPInstanceUID for i in seeded.a.instances}
    finally:
        await b.aclose()
        server.remove()


# --------------------------------------------------------------------------------------------------
# A ~100 MB study: throughput and bounded memory
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_study(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    study = make_study(tmp_path_factory.mktemp("big"), patient_id="XIGPACS-BIG", patient_name="Large^Larry",
                       birth_date="19500101", sex="M", study_description="CT abdomen 200 slices",
                       series=[("CT", 200, "ABDOMEN")], rows=512, cols=512, seed="pacs-big")
    orthanc.upload(study.paths)
    return study


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_large_study_retrieve_bounded_memory(kind: str, orthanc: OrthancServer, big_study: SyntheticStudy,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    refs = refs_of(big_study)
    expected = {i.SOPInstanceUID for i in big_study.instances}
    b = make_backend(kind, orthanc)
    try:
        # 1. throughput (not traced: tracemalloc slows Python code several-fold)
        start = time.perf_counter()
        total, seen = 0, set()
        async for item in b.retrieve(refs):
            assert isinstance(item, RetrievedInstance), item
            seen.add(item.ref.SOPInstanceUID)
            async for chunk in item.chunks:
                total += len(chunk)
        elapsed = time.perf_counter() - start
        assert seen == expected and total >= big_study.total_bytes * 0.99
        # 2. peak Python memory while streaming the whole study — and, from a DICOMweb server (whose pieces come
        # in receive buffers reused once nothing refers to them), every instance exactly the file stored, its
        # pieces kept until it is complete (as a spool does) while the next reads arrive
        stored = ({i.SOPInstanceUID: hashlib.sha256(i.path.read_bytes()).hexdigest() for i in big_study.instances}
                  if kind == "dicomweb" else {})
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            count = 0
            async for item in b.retrieve(refs):
                assert isinstance(item, RetrievedInstance), item
                pieces = [chunk async for chunk in item.chunks]
                if stored:
                    digest = hashlib.sha256()
                    for piece in pieces:
                        digest.update(piece)
                    assert digest.hexdigest() == stored[item.ref.SOPInstanceUID]
                del pieces
                count += 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await b.aclose()
    assert count == len(refs)
    with capsys.disabled():
        print(f"\n[{kind}] {total / 1e6:.1f} MB in {elapsed:.2f} s = {total / 1e6 / elapsed:.1f} MB/s; "
              f"tracemalloc peak {peak / 1e6:.1f} MB")
    assert peak < 40 * 1024 * 1024
