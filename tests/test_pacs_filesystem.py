"""The embedded filesystem PACS (folder + ``pacs_instances`` index) and the backend factory."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine, func, select

from gateway.config import ConfigError, parse_config
from gateway.dicom.synth import SyntheticStudy, derive_uid, make_instance, make_study
from gateway.pacs import filesystem as fs_module
from gateway.pacs.base import InstanceRef, PacsBackend, PacsError, PatientQuery, RetrievedInstance, RetrieveFailure
from gateway.pacs.dicomweb import DicomwebBackend
from gateway.pacs.dimse import DimseBackend
from gateway.pacs.factory import backend_for_source, open_backends
from gateway.pacs.filesystem import FilesystemBackend
from gateway.store.db import open_database
from gateway.store.tables import pacs_instances

SOURCE = "2.999.1.3"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = open_database("sqlite:///db/xig.db", tmp_path)
    yield eng
    eng.dispose()


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> FilesystemBackend:
    return FilesystemBackend(tmp_path / "store", engine, SOURCE)


@pytest.fixture
def studies(tmp_path: Path) -> tuple[SyntheticStudy, SyntheticStudy]:
    incoming = tmp_path / "incoming"
    a = make_study(incoming / "a", patient_id="FS-A", patient_name="Doe^Jane", birth_date="19800312", sex="F",
                   issuer="2.999.1.1", accession="ACC-1", accession_issuer="2.999.5", study_date="20240110",
                   study_description="CT+MR", series=[("CT", 3, "CHEST"), ("MR", 2, "HEAD")], seed="fs-a")
    b = make_study(incoming / "b", patient_id="FS-B", patient_name="O'Brien^Pat", birth_date="19550101", sex="M",
                   study_date="20230101", series=[("CR", 1, "CHEST")], transfer_syntax="1.2.840.10008.1.2",
                   seed="fs-b")
    return a, b


def write_bad_files(directory: Path) -> dict[str, str]:
    """Three files that must be reported, with the words their reason must contain."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("this is not DICOM\n")
    # a Part 10 file without SOP Instance UID
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.StudyInstanceUID = derive_uid("bad", 1)
    ds.SeriesInstanceUID = derive_uid("bad", 2)
    ds.PatientID = "BAD"
    pydicom.dcmwrite(directory / "no-sop.dcm", ds)
    # a Study Instance UID trying to escape the store folder
    evil = make_instance(directory / "evil.dcm", patient_id="EVIL", seed="evil")
    ds = pydicom.dcmread(evil.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns about the invalid UI value
        ds.StudyInstanceUID = "../../etc"
    ds.save_as(evil.path)
    return {"notes.txt": "not a DICOM", "no-sop.dcm": "missing SOP Instance UID",
            "evil.dcm": "invalid Study Instance UID"}


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def row_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(pacs_instances)).scalar_one())


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, reading the "../../etc" UID
def test_import_copies_indexes_and_reports_bad_files(store: FilesystemBackend, engine: Engine, tmp_path: Path,
                                                     studies: tuple[SyntheticStudy, SyntheticStudy]) -> None:
    a, b = studies
    expected_bad = write_bad_files(tmp_path / "incoming" / "junk")
    report = store.index_directory(tmp_path / "incoming")
    assert {f.SOPInstanceUID for f in report.imported} == {i.SOPInstanceUID for i in a.instances + b.instances}
    assert report.skipped == []
    reasons = {f.source.name: f.reason for f in report.failed}
    assert set(reasons) == set(expected_bad)
    for name, words in expected_bad.items():
        assert words in reasons[name], reasons[name]
    # every instance lands at <study>/<series>/<sop>.dcm, byte for byte; nothing else (no temp files, no escape)
    files = stored_files(store.root)
    assert files == sorted(store.root / i.StudyInstanceUID / i.SeriesInstanceUID / f"{i.SOPInstanceUID}.dcm"
                           for i in a.instances + b.instances)
    for inst in a.instances + b.instances:
        dest = store.root / inst.StudyInstanceUID / inst.SeriesInstanceUID / f"{inst.SOPInstanceUID}.dcm"
        assert dest.read_bytes() == inst.path.read_bytes()
    assert not (tmp_path / "etc").exists()
    assert row_count(engine) == 6
    with engine.connect() as conn:
        row = conn.execute(select(pacs_instances).where(
            pacs_instances.c.sop_instance_uid == b.instances[0].SOPInstanceUID)).one()
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2"
    assert row.sha256 == hashlib.sha256(b.instances[0].path.read_bytes()).hexdigest()
    assert row.size == b.instances[0].path.stat().st_size
    assert row.source_id == SOURCE and row.patient_name == "O'Brien^Pat"


def test_reimport_is_idempotent(store: FilesystemBackend, engine: Engine, tmp_path: Path,
                                studies: tuple[SyntheticStudy, SyntheticStudy]) -> None:
    first = store.index_directory(tmp_path / "incoming")
    assert len(first.imported) == 6
    mtimes = {p: p.stat().st_mtime_ns for p in stored_files(store.root)}
    again = store.index_directory(tmp_path / "incoming")
    assert again.imported == []
    assert len(again.skipped) == 6
    assert all("already stored" in s.reason for s in again.skipped)
    assert row_count(engine) == 6
    assert {p: p.stat().st_mtime_ns for p in stored_files(store.root)} == mtimes  # nothing rewritten


def test_failed_copy_leaves_nothing_behind(store: FilesystemBackend, engine: Engine, tmp_path: Path,
                                           studies: tuple[SyntheticStudy, SyntheticStudy],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = studies

    def no_rename(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs_module.os, "replace", no_rename)
    report = store.index_directory(a.series[0].instances[0].path)
    assert report.imported == [] and len(report.failed) == 1
    assert "cannot copy into the store" in report.failed[0].reason
    assert [p for p in store.root.rglob("*") if p.is_file()] == []  # neither a partial file nor a temporary
    assert row_count(engine) == 0
    monkeypatch.undo()
    assert len(store.index_directory(a.series[0].instances[0].path).imported) == 1


def test_reindex_store_in_place(tmp_path: Path, studies: tuple[SyntheticStudy, SyntheticStudy]) -> None:
    eng1 = open_database("sqlite:///one.db", tmp_path)
    FilesystemBackend(tmp_path / "store", eng1, SOURCE).index_directory(tmp_path / "incoming")
    before = {p: p.stat().st_mtime_ns for p in stored_files(tmp_path / "store")}
    eng2 = open_database("sqlite:///two.db", tmp_path)  # the index is lost: rebuild it from the folder
    report = FilesystemBackend(tmp_path / "store", eng2, SOURCE).index_directory(tmp_path / "store")
    assert len(report.imported) == 6 and not report.failed
    assert {p: p.stat().st_mtime_ns for p in stored_files(tmp_path / "store")} == before
    assert row_count(eng2) == 6
    eng1.dispose()
    eng2.dispose()


def test_same_instance_in_another_source_is_skipped(tmp_path: Path, engine: Engine,
                                                    studies: tuple[SyntheticStudy, SyntheticStudy]) -> None:
    a, _ = studies
    one = FilesystemBackend(tmp_path / "s1", engine, "2.999.1.3")
    two = FilesystemBackend(tmp_path / "s2", engine, "2.999.1.4")
    one.index_directory(a.series[1].instances[0].path)
    report = two.index_directory(a.series[1].instances[0].path)
    assert report.imported == [] and "imaging source 2.999.1.3" in report.skipped[0].reason


def test_listings(store: FilesystemBackend, tmp_path: Path, studies: tuple[SyntheticStudy, SyntheticStudy]) -> None:
    a, b = studies
    store.index_directory(tmp_path / "incoming")
    patients = store.list_patients()
    assert [(p.patient.PatientID, p.studies, p.instances) for p in patients] == [("FS-A", 1, 5), ("FS-B", 1, 1)]
    assert patients[0].patient.IssuerOfPatientID == "2.999.1.1"
    listed = store.list_studies()
    assert [s.StudyInstanceUID for s in listed] == [a.StudyInstanceUID, b.StudyInstanceUID]  # newest first
    assert listed[0].modalities == ("CT", "MR") and listed[0].series == 2 and listed[0].instances == 5
    assert listed[0].size == sum(i.size for i in a.instances)
    assert [s.PatientID for s in store.list_studies("FS-B")] == ["FS-B"]


# --------------------------------------------------------------------------------------------------
# PacsBackend methods
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def loaded(store: FilesystemBackend, tmp_path: Path,
           studies: tuple[SyntheticStudy, SyntheticStudy]) -> tuple[SyntheticStudy, SyntheticStudy]:
    assert store.index_directory(tmp_path / "incoming").ok
    return studies


async def test_ping(store: FilesystemBackend, loaded: Any) -> None:
    await store.ping()
    for p in sorted(store.root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    store.root.rmdir()
    with pytest.raises(PacsError, match="does not exist"):
        await store.ping()


async def test_find_patients(store: FilesystemBackend, loaded: Any) -> None:
    async def ids(**kw: Any) -> set[str]:
        return {p.PatientID for p in await store.find_patients(PatientQuery(**kw))}

    assert await ids(family="doe") == {"FS-A"}
    assert await ids(family="O'BR") == {"FS-B"}
    assert await ids(family="%") == set()  # LIKE wildcards in the input are literals
    assert await ids(family="oe") == set()  # a prefix, not a substring
    assert await ids(birth_date_from="19500101", birth_date_to="19601231") == {"FS-B"}
    assert await ids(birth_date_from="19700101") == {"FS-A"}
    assert await ids(family="Doe", birth_date_to="19700101") == set()
    assert await ids(patient_ids=("FS-B",)) == {"FS-B"}
    assert await ids(family="Doe", patient_ids=("FS-B",)) == {"FS-A", "FS-B"}  # union
    rec = (await store.find_patients(PatientQuery(family="Doe")))[0]
    assert (rec.PatientName, rec.PatientBirthDate, rec.PatientSex, rec.IssuerOfPatientID) == \
        ("Doe^Jane", "19800312", "F", "2.999.1.1")


async def test_find_studies_and_get_study(store: FilesystemBackend, loaded: tuple[SyntheticStudy, SyntheticStudy],
                                          ) -> None:
    a, b = loaded
    found = await store.find_studies("FS-A")
    assert len(found) == 1
    st = found[0]
    assert st.StudyInstanceUID == a.StudyInstanceUID and st.source_id == SOURCE
    assert (st.AccessionNumber, st.AccessionNumberIssuer, st.StudyDate, st.StudyDescription) == \
        ("ACC-1", "2.999.5", "20240110", "CT+MR")
    assert st.modalities == ("CT", "MR")
    assert [len(s.instances) for s in st.series] == [3, 2]
    assert [s.BodyPartExamined for s in st.series] == ["CHEST", "HEAD"]
    assert [i.InstanceNumber for i in st.series[0].instances] == [1, 2, 3]
    assert {i.SOPInstanceUID: i.SOPClassUID for _, i in st.instances()} == \
        {i.SOPInstanceUID: i.SOPClassUID for i in a.instances}
    assert all(i.TransferSyntaxUID == "1.2.840.10008.1.2.1" for _, i in st.instances())
    assert len(await store.find_studies("FS-A", "2.999.1.1")) == 1
    assert await store.find_studies("FS-A", "2.999.1.99") == []
    assert len(await store.find_studies("FS-B", "2.999.1.99")) == 1  # no issuer recorded: could be them
    got = await store.get_study(b.StudyInstanceUID)
    assert got is not None and got.instance_count == 1 and got.patient.PatientID == "FS-B"
    assert got.series[0].instances[0].TransferSyntaxUID == "1.2.840.10008.1.2"
    assert await store.get_study(derive_uid("unknown")) is None


async def test_retrieve(store: FilesystemBackend, loaded: tuple[SyntheticStudy, SyntheticStudy],
                        tmp_path: Path) -> None:
    a, b = loaded
    big = make_instance(tmp_path / "big" / "big.dcm", patient_id="FS-C", rows=1024, cols=1024, seed="big")
    assert store.index_directory(big.path).imported
    insts = a.instances + b.instances + [big]
    refs = [InstanceRef(i.StudyInstanceUID, i.SeriesInstanceUID, i.SOPInstanceUID) for i in insts]
    unknown = InstanceRef(a.StudyInstanceUID, a.series[0].SeriesInstanceUID, derive_uid("nope"))
    wrong_series = InstanceRef(a.StudyInstanceUID, a.series[1].SeriesInstanceUID,
                               a.series[0].instances[0].SOPInstanceUID)
    # a file that vanished from the store folder
    gone = b.instances[0]
    (store.root / gone.StudyInstanceUID / gone.SeriesInstanceUID / f"{gone.SOPInstanceUID}.dcm").unlink()
    results: dict[InstanceRef, RetrievedInstance | RetrieveFailure] = {}
    chunk_sizes: list[int] = []
    data: dict[str, bytes] = {}
    async for item in store.retrieve([*refs, unknown, wrong_series]):
        results[item.ref] = item
        if isinstance(item, RetrievedInstance):
            chunks = [c async for c in item.chunks]
            chunk_sizes += [len(c) for c in chunks]
            data[item.ref.SOPInstanceUID] = b"".join(chunks)
            assert item.size == len(data[item.ref.SOPInstanceUID])
    assert len(results) == len(refs) + 2
    failures = {r: i.reason for r, i in results.items() if isinstance(i, RetrieveFailure)}
    assert set(failures) == {unknown, wrong_series, refs[len(a.instances)]}
    assert "not in the store" in failures[unknown]
    assert "not part of" in failures[wrong_series]
    assert "missing" in failures[refs[len(a.instances)]]
    for inst in insts:
        if inst is not gone:
            assert data[inst.SOPInstanceUID] == inst.path.read_bytes()
    assert max(chunk_sizes) == 1024 * 1024  # 2 MiB of pixels: streamed in 1 MiB chunks
    big_ds = pydicom.dcmread(io.BytesIO(data[big.SOPInstanceUID]))
    assert hashlib.sha256(big_ds.PixelData).hexdigest() == big.pixel_sha256
    first = next(i for i in results.values() if isinstance(i, RetrievedInstance))
    assert first.TransferSyntaxUID == "1.2.840.10008.1.2.1" and first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


async def test_store(store: FilesystemBackend, tmp_path: Path) -> None:
    inst = make_instance(tmp_path / "x" / "one.dcm", patient_id="FS-S", modality="US", seed="store")
    junk = tmp_path / "x" / "junk.bin"
    junk.write_bytes(os.urandom(300))
    result = await store.store([inst.path, junk])
    assert result.stored == [inst.SOPInstanceUID]
    assert list(result.failed) == [str(junk)]
    again = await store.store([inst.path])
    assert again.stored == [inst.SOPInstanceUID] and not again.failed  # storing twice is not an error
    studies = await store.find_studies("FS-S")
    assert studies[0].modalities == ("US",)


async def test_backend_is_a_pacs_backend(store: FilesystemBackend) -> None:
    assert isinstance(store, PacsBackend)
    await store.aclose()


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

def config_with(tmp_path: Path, pacs: list[dict[str, Any]]) -> Any:
    data = {
        "gateway": {"home_community_id": "urn:oid:2.999.1", "assigning_authority": "2.999.1.1",
                    "repository_unique_id": "2.999.1.2", "imaging_source_id": "2.999.1.3"},
        "server": {"certificate": "c.pem", "private_key": "k.pem", "client_ca": "ca.pem"},
        "saml": {"trusted_issuers": "ca.pem", "signing_certificate": "c.pem", "signing_key": "k.pem"},
        "pacs": pacs,
    }
    return parse_config(data, base_dir=tmp_path)


async def test_open_backends(tmp_path: Path, engine: Engine) -> None:
    cfg = config_with(tmp_path, [
        {"kind": "filesystem", "path": "pacs"},
        {"kind": "dimse", "host": "10.0.0.5", "port": 11112, "called_ae": "PACS", "retrieve": "c-move",
         "move_port": 11113, "imaging_source_id": "urn:oid:2.999.1.30"},
        {"kind": "dicomweb", "url": "http://pacs.example/dicom-web", "imaging_source_id": "2.999.1.31"},
    ])
    backends = open_backends(cfg, engine)
    fs, dimse, web = backends
    assert isinstance(fs, FilesystemBackend) and fs.source_id == "2.999.1.3"  # the gateway's default
    assert fs.root == (tmp_path / "pacs").resolve() and fs.root.is_dir()
    assert isinstance(dimse, DimseBackend) and dimse.source_id == "2.999.1.30"
    assert (dimse.host, dimse.port, dimse.called_ae, dimse.retrieve_method) == ("10.0.0.5", 11112, "PACS", "c-move")
    assert (dimse.move_port, dimse.move_host, dimse.move_destination) == (11113, "127.0.0.1", "XIG")
    assert isinstance(web, DicomwebBackend) and web.url == "http://pacs.example/dicom-web"
    assert backend_for_source(backends, "2.999.1.31") is web
    assert backend_for_source(backends, "urn:oid:2.999.1.30") is dimse
    assert backend_for_source(backends, "2.999.1.99") is None
    for b in backends:
        await b.aclose()


def test_open_backends_refuses_duplicate_source_ids(tmp_path: Path, engine: Engine) -> None:
    cfg = config_with(tmp_path, [{"kind": "filesystem", "path": "a"},
                                 {"kind": "dicomweb", "url": "http://x/dicom-web"}])
    with pytest.raises(ConfigError, match=r"pacs\[1\].imaging_source_id"):
        open_backends(cfg, engine)
