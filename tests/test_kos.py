"""KOS manifest build/parse: IOD validity (dciodvfy), determinism, UIDs, round trip, rejects."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.dicom.kos import (
    IMAGE_STORAGE_SOP_CLASSES,
    KOS_SOP_CLASS_UID,
    KosError,
    KosManifest,
    KosReference,
    build_kos,
    kos_series_uid_for,
    kos_uid_for,
    parse_kos,
    value_type_for,
)
from gateway.pacs.base import InstanceInfo, PatientRecord, SeriesInfo, StudyInfo

ROOT = "1.2.826.0.1.3680043.10.1234"
LOCATION = "1.3.6.1.4.1.21367.13.80.110"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
ECG = "1.2.840.10008.5.1.4.1.1.9.1.1"
PR = "1.2.840.10008.5.1.4.1.1.11.1"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
US_MF = "1.2.840.10008.5.1.4.1.1.3.1"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def _series(uid: str, modality: str, number: int, sop_class: str, count: int) -> SeriesInfo:
    return SeriesInfo(
        SeriesInstanceUID=uid,
        Modality=modality,
        SeriesNumber=number,
        instances=tuple(InstanceInfo(sop_class, f"{uid}.{i}", i) for i in range(1, count + 1)),
    )


def make_study(
    *,
    name: str = "Doe^Jane^Q",
    accession: str = "ACC-0042",
    series: tuple[SeriesInfo, ...] | None = None,
    study_date: str = "20240311",
) -> StudyInfo:
    if series is None:
        series = (
            _series("1.2.3.4.5.1", "CT", 1, CT, 5),
            _series("1.2.3.4.5.2", "MR", 2, MR, 3),
            _series("1.2.3.4.5.3", "US", 3, US_MF, 2),
            _series("1.2.3.4.5.4", "ECG", 4, ECG, 1),
            _series("1.2.3.4.5.5", "SR", 5, SR, 1),
            _series("1.2.3.4.5.6", "PR", 6, PR, 2),
            _series("1.2.3.4.5.7", "DOC", 7, PDF, 1),
        )
    return StudyInfo(
        StudyInstanceUID="1.2.3.4.5",
        patient=PatientRecord("PID-77", "1.3.6.1.4.1.21367.13.20.1000", name, "19670412", "F"),
        StudyDate=study_date,
        StudyTime="142233",
        AccessionNumber=accession,
        AccessionNumberIssuer="1.3.6.1.4.1.21367.13.20.2000",
        StudyID="S77",
        StudyDescription="CT chest with contrast",
        ReferringPhysicianName="House^Gregory",
        series=series,
        source_id=LOCATION,
        RetrieveAETitle="PACS_AE",
    )


def build(study: StudyInfo, **kw: Any) -> bytes:
    return build_kos(study, kos_uid=kos_uid_for(study, root=ROOT), retrieve_location_uid=LOCATION, **kw)


def dciodvfy(data: bytes, tmp_path: Path) -> tuple[list[str], list[str]]:
    """Run the real dicom3tools validator; return (errors, warnings)."""
    exe = shutil.which("dciodvfy")
    assert exe is not None, "dciodvfy (Debian package dicom3tools) is not installed: run `make install` as root"
    path = tmp_path / "kos.dcm"
    path.write_bytes(data)
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


# ---------------------------------------------------------------------------- IOD validity


def test_multi_series_multi_modality_kos_passes_dciodvfy(tmp_path: Path) -> None:
    data = build(make_study(), institution="General Hospital", retrieve_ae_title="PACS_AE")
    errors, warnings = dciodvfy(data, tmp_path)
    assert errors == []
    assert warnings == []


def test_non_ascii_patient_kos_passes_dciodvfy_and_declares_utf8(tmp_path: Path) -> None:
    study = make_study(name="Müller-Lüdenscheidt^Zoë=山田^太郎", accession="")
    data = build(study)
    errors, warnings = dciodvfy(data, tmp_path)
    assert errors == []
    assert warnings == []
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller-Lüdenscheidt^Zoë=山田^太郎"
    assert "ReferencedRequestSequence" not in ds  # no accession → no request to reference


def test_ascii_kos_has_no_specific_character_set() -> None:
    ds = pydicom.dcmread(io.BytesIO(build(make_study())))
    assert "SpecificCharacterSet" not in ds


def test_validator_does_catch_a_broken_kos(tmp_path: Path) -> None:
    """Guard for the tests above: dciodvfy's output is parsed correctly and it does report errors."""
    ds = pydicom.dcmread(io.BytesIO(build(make_study())))
    del ds.ContentDate
    ds.ContentSequence[0].ValueType = "BOGUS"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    errors, _ = dciodvfy(buf.getvalue(), tmp_path)
    assert any("ContentDate" in e for e in errors)
    assert any("BOGUS" in e for e in errors)


def test_hostile_pacs_values_still_give_a_valid_kos(tmp_path: Path) -> None:
    study = dataclasses.replace(
        make_study(accession="A\\B-WAY-TOO-LONG-ACCESSION-NUMBER"),
        StudyDate="2024-03-11",
        StudyTime="garbage",
        StudyID="an id longer than sixteen",
        patient=PatientRecord("P\x001", None, "Very^Long^" + "X" * 80, "1967", "unknown"),
    )
    data = build(study)
    errors, _ = dciodvfy(data, tmp_path)
    assert errors == []
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.StudyDate == "20240311"
    assert ds.StudyTime == ""
    assert ds.PatientBirthDate == ""
    assert ds.PatientSex == ""


# ---------------------------------------------------------------------------- content


def test_kos_content_follows_the_iod() -> None:
    study = make_study()
    uid = kos_uid_for(study, root=ROOT)
    data = build_kos(study, kos_uid=uid, retrieve_location_uid=LOCATION, retrieve_ae_title="AE_X")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert data[128:132] == b"DICM"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == KOS_SOP_CLASS_UID == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == uid == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.Modality == "KO"
    assert ds.SeriesInstanceUID == kos_series_uid_for(study, root=ROOT)
    assert "ReferencedPerformedProcedureStepSequence" in ds and len(ds.ReferencedPerformedProcedureStepSequence) == 0
    assert (ds.PatientID, ds.IssuerOfPatientID, str(ds.PatientName)) == (
        "PID-77",
        study.patient.IssuerOfPatientID,
        "Doe^Jane^Q",
    )
    assert (ds.StudyInstanceUID, ds.AccessionNumber, ds.StudyID) == ("1.2.3.4.5", "ACC-0042", "S77")
    assert ds.IssuerOfAccessionNumberSequence[0].UniversalEntityID == "1.3.6.1.4.1.21367.13.20.2000"
    assert ds.IssuerOfAccessionNumberSequence[0].UniversalEntityIDType == "ISO"
    request = ds.ReferencedRequestSequence[0]
    assert (request.StudyInstanceUID, request.AccessionNumber) == ("1.2.3.4.5", "ACC-0042")
    assert ds.Manufacturer == "XIG"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113030", "DCM", "Manifest")
    assert (ds.ValueType, ds.ContinuityOfContent) == ("CONTAINER", "SEPARATE")
    template = ds.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2010")
    # evidence: every instance, retrieve location on every series
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == "1.2.3.4.5"
    series_items = evidence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in series_items] == [s.SeriesInstanceUID for s in study.series]
    assert {s.RetrieveLocationUID for s in series_items} == {LOCATION}
    assert {s.RetrieveAETitle for s in series_items} == {"AE_X"}
    referenced = [
        (r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for s in series_items for r in s.ReferencedSOPSequence
    ]
    expected = [(i.SOPClassUID, i.SOPInstanceUID) for _, i in study.instances()]
    assert referenced == expected
    # content tree: one CONTAINS item per instance with the right value type
    content = ds.ContentSequence
    assert len(content) == study.instance_count == 15
    assert all(item.RelationshipType == "CONTAINS" for item in content)
    types = {item.ReferencedSOPSequence[0].ReferencedSOPClassUID: item.ValueType for item in content}
    assert types == {
        CT: "IMAGE",
        MR: "IMAGE",
        US_MF: "IMAGE",
        ECG: "WAVEFORM",
        SR: "COMPOSITE",
        PR: "COMPOSITE",
        PDF: "COMPOSITE",
    }
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in content] == [u for _, u in expected]


def test_retrieve_ae_title_defaults_to_the_study_and_can_be_absent() -> None:
    ds = pydicom.dcmread(io.BytesIO(build(make_study())))
    assert ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].RetrieveAETitle == "PACS_AE"
    study = dataclasses.replace(make_study(), RetrieveAETitle="")
    ds = pydicom.dcmread(io.BytesIO(build(study)))
    assert "RetrieveAETitle" not in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]


def test_value_type_classification() -> None:
    assert value_type_for(CT) == "IMAGE"
    assert value_type_for("1.2.840.10008.5.1.4.1.1.77.1.6") == "IMAGE"  # whole slide microscopy
    assert value_type_for("1.2.840.10008.5.1.4.1.1.66.4") == "IMAGE"  # segmentation
    assert value_type_for("1.2.840.10008.5.1.4.1.1.9.4.1") == "WAVEFORM"  # basic voice audio
    assert value_type_for("1.2.840.10008.5.1.4.1.1.88.59") == "COMPOSITE"  # KOS
    assert value_type_for("1.2.840.10008.5.1.4.1.1.4.2") == "COMPOSITE"  # MR spectroscopy: no pixels
    assert value_type_for("1.2.840.10008.5.1.4.1.1.481.5") == "COMPOSITE"  # RT plan
    assert value_type_for("1.2.840.10008.5.1.4.1.1.66") == "COMPOSITE"  # raw data
    assert value_type_for("1.3.12.2.1107.5.9.1") == "COMPOSITE"  # private


def test_every_image_storage_class_in_the_uid_registry_is_classified_image() -> None:
    from pydicom._uid_dict import UID_dictionary

    registry_images = {
        uid for uid, (name, kind, *_rest) in UID_dictionary.items() if kind == "SOP Class" and "Image Storage" in name
    }
    assert len(registry_images) > 60
    assert registry_images - IMAGE_STORAGE_SOP_CLASSES == set()
    assert all(UID_RE.match(u) for u in IMAGE_STORAGE_SOP_CLASSES)


# ---------------------------------------------------------------------------- determinism and UIDs


def test_rebuild_is_byte_identical() -> None:
    assert build(make_study()) == build(make_study())


def test_pacs_answer_order_does_not_change_uid_or_bytes() -> None:
    study = make_study()
    shuffled = dataclasses.replace(
        study,
        series=tuple(dataclasses.replace(s, instances=tuple(reversed(s.instances))) for s in reversed(study.series)),
    )
    assert kos_uid_for(shuffled, root=ROOT) == kos_uid_for(study, root=ROOT)
    assert build(shuffled) == build(study)


def test_new_instance_gives_new_uid_and_new_bytes_in_the_same_series() -> None:
    study = make_study()
    grown = dataclasses.replace(
        study,
        series=(*study.series[:-1], _series("1.2.3.4.5.7", "DOC", 7, PDF, 2)),
    )
    assert grown.content_digest != study.content_digest
    old_uid, new_uid = kos_uid_for(study, root=ROOT), kos_uid_for(grown, root=ROOT)
    assert old_uid != new_uid
    old, new = build(study), build(grown)
    assert old != new
    assert parse_kos(new).sop_instance_uid == new_uid
    assert len(parse_kos(new).references) == len(parse_kos(old).references) + 1
    assert kos_series_uid_for(grown, root=ROOT) == kos_series_uid_for(study, root=ROOT)


def test_corrected_header_gives_new_uid() -> None:
    study = make_study()
    renamed = dataclasses.replace(study, patient=dataclasses.replace(study.patient, PatientName="Doe^Janet"))
    assert renamed.content_digest == study.content_digest
    assert kos_uid_for(renamed, root=ROOT) != kos_uid_for(study, root=ROOT)
    assert kos_uid_for(study, root=ROOT, salt="AE2") != kos_uid_for(study, root=ROOT)


@pytest.mark.parametrize(
    "root",
    ["1.2.3", "2.25", "urn:oid:1.2.826.0.1.3680043.10.1234", "1.3.6.1.4.1.21367.2024.1.2.3.4.5.6.7.8.9.1"],
)
def test_kos_uid_is_a_valid_uid_of_at_most_64_chars(root: str) -> None:
    study = make_study()
    for uid in (kos_uid_for(study, root=root), kos_series_uid_for(study, root=root)):
        assert len(uid) <= 64
        assert UID_RE.match(uid), uid
        assert uid.startswith(root.removeprefix("urn:oid:") + ".")
    if root == "2.25":
        assert int(kos_uid_for(study, root=root).split(".")[2]) < 2**128


@pytest.mark.parametrize("root", ["1.2.03", "abc", "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22"])
def test_bad_or_too_long_root_is_refused(root: str) -> None:
    with pytest.raises(KosError, match="root"):
        kos_uid_for(make_study(), root=root)


def test_content_datetime_is_the_studys_or_the_given_one() -> None:
    ds = pydicom.dcmread(io.BytesIO(build(make_study())))
    assert (ds.ContentDate, ds.ContentTime) == ("20240311", "142233")
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20240311", "142233")
    ds = pydicom.dcmread(io.BytesIO(build(make_study(study_date=""))))
    assert (ds.ContentDate, ds.ContentTime) == ("19700101", "000000")
    ds = pydicom.dcmread(io.BytesIO(build(make_study(), content_datetime=datetime(2025, 1, 2, 3, 4, 5))))
    assert (ds.ContentDate, ds.ContentTime) == ("20250102", "030405")


def test_study_without_instances_is_refused() -> None:
    study = make_study(series=(SeriesInfo("1.2.3.4.5.1", "CT", 1),))
    with pytest.raises(KosError, match="no instances"):
        build(study)


def test_bad_retrieve_location_is_refused() -> None:
    with pytest.raises(KosError, match="Retrieve Location UID"):
        build_kos(make_study(), kos_uid="1.2.3", retrieve_location_uid="not-a-uid")


def test_2000_instances_build_and_parse_fast() -> None:
    series = tuple(_series(f"1.2.3.4.5.{k}", "CT", k, CT, 250) for k in range(1, 9))
    study = make_study(series=series)
    assert study.instance_count == 2000
    uid = kos_uid_for(study, root=ROOT)
    start = time.perf_counter()
    data = build_kos(study, kos_uid=uid, retrieve_location_uid=LOCATION)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"build took {elapsed:.3f} s"
    manifest = parse_kos(data)
    assert len(manifest.references) == 2000


# ---------------------------------------------------------------------------- parsing


def test_parse_round_trip_returns_every_reference_with_its_location(tmp_path: Path) -> None:
    study = make_study()
    data = build(study)
    path = tmp_path / "m.dcm"
    path.write_bytes(data)
    for source in (data, path):
        manifest = parse_kos(source)
        assert isinstance(manifest, KosManifest)
        assert manifest.sop_instance_uid == kos_uid_for(study, root=ROOT)
        assert (manifest.patient_id, manifest.issuer_of_patient_id) == ("PID-77", study.patient.IssuerOfPatientID)
        assert (manifest.patient_name, manifest.patient_birth_date, manifest.patient_sex) == (
            "Doe^Jane^Q",
            "19670412",
            "F",
        )
        assert (manifest.study_instance_uid, manifest.accession_number, manifest.title) == (
            "1.2.3.4.5",
            "ACC-0042",
            "Manifest",
        )
        expected = [
            KosReference("1.2.3.4.5", s.SeriesInstanceUID, i.SOPClassUID, i.SOPInstanceUID, LOCATION, "PACS_AE")
            for s, i in study.instances()
        ]
        assert list(manifest.references) == expected
        assert manifest.retrieve_locations == (LOCATION,)
        plan = manifest.plan()
        assert [(g.retrieve_location_uid, g.study_uid, g.series_uid) for g in plan] == [
            (LOCATION, "1.2.3.4.5", s.SeriesInstanceUID) for s in study.series
        ]
        assert sum(len(g.references) for g in plan) == study.instance_count


def test_plan_groups_by_location_study_and_series() -> None:
    ds = pydicom.dcmread(io.BytesIO(build(make_study())))
    series_items = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    series_items[1].RetrieveLocationUID = "1.2.999"
    del series_items[2].RetrieveLocationUID
    other_study = Dataset()
    other_study.StudyInstanceUID = "9.8.7"
    other_series = Dataset()
    other_series.SeriesInstanceUID = "9.8.7.1"
    other_series.RetrieveLocationUID = LOCATION
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = "9.8.7.1.1"
    other_series.ReferencedSOPSequence = [ref]
    other_study.ReferencedSeriesSequence = [other_series]
    ds.CurrentRequestedProcedureEvidenceSequence.append(other_study)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    manifest = parse_kos(buf.getvalue())
    keys = [(g.retrieve_location_uid, g.study_uid, g.series_uid) for g in manifest.plan()]
    assert ("1.2.999", "1.2.3.4.5", "1.2.3.4.5.2") in keys
    assert ("", "1.2.3.4.5", "1.2.3.4.5.3") in keys  # no location named: left for the caller to resolve
    assert (LOCATION, "9.8.7", "9.8.7.1") in keys
    assert len(keys) == 8
    assert manifest.retrieve_locations == (LOCATION, "1.2.999", "")


def _ct_image() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.9"
    ds.PatientName = "Doe^Jane"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _without(data: bytes, mutate: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    if mutate == "evidence":
        del ds.CurrentRequestedProcedureEvidenceSequence
    elif mutate == "empty-evidence":
        ds.CurrentRequestedProcedureEvidenceSequence = []
    elif mutate == "series":
        ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence = []
    elif mutate == "sops":
        ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence = []
    elif mutate == "instance-uid":
        del (
            ds.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID
        )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("evidence", "Current Requested Procedure Evidence Sequence"),
        ("empty-evidence", "Current Requested Procedure Evidence Sequence"),
        ("series", "no Referenced Series Sequence items"),
        ("sops", "no Referenced SOP Sequence items"),
        ("instance-uid", "lacks its SOP Class/Instance UID"),
    ],
)
def test_kos_with_missing_evidence_is_rejected(mutate: str, message: str) -> None:
    with pytest.raises(KosError, match=message):
        parse_kos(_without(build(make_study()), mutate))


def test_non_kos_is_rejected() -> None:
    with pytest.raises(
        KosError, match=r"not a Key Object Selection Document: SOP Class UID is 1\.2\.840\.10008\.5\.1\.4\.1\.1\.2"
    ):
        parse_kos(_ct_image())
    with pytest.raises(KosError, match="not a DICOM Part 10 file"):
        parse_kos(b"%PDF-1.7 definitely not dicom" * 10)
    with pytest.raises(KosError):
        parse_kos(build(make_study())[:700])  # truncated mid-element
