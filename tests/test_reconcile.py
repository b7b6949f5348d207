"""Reconciliation codec: local identity in, originals kept in Original Attributes, pixels and UIDs untouched."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from gateway.dicom.kos import IMPLEMENTATION_CLASS_UID, build_kos, parse_kos
from gateway.dicom.reconcile import (
    Expected,
    LocalPatient,
    ReconcileError,
    ReconcilePolicy,
    check,
    reconcile,
    reconcile_dataset,
    reconcile_file,
    reconcile_kos,
)
from gateway.dicom.synth import make_study
from gateway.pacs.base import InstanceInfo, PatientRecord, SeriesInfo, StudyInfo

REMOTE_ISSUER = "1.3.6.1.4.1.21367.13.20.300"
REMOTE_ACCESSION_ISSUER = "1.3.6.1.4.1.21367.13.20.301"
LOCAL_ISSUER = "1.3.6.1.4.1.21367.13.20.1"
PARTNER = "urn:oid:1.3.6.1.4.1.21367.13.70.300"
NOW = datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
LOCAL = LocalPatient("L42", f"urn:oid:{LOCAL_ISSUER}", "Local^Lisa^M", "19600102", "F")
CT = "1.2.840.10008.5.1.4.1.1.2"
#: the attributes reconciliation may change, besides Specific Character Set and the history itself
TRACKED = {
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription", "PatientName", "PatientID",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "RequestAttributesSequence", "ReferencedRequestSequence",
}


def outside(tmp_path: Path, *, issuer: str | None = REMOTE_ISSUER, accession: str = "RACC1",
            description: str = "CT CHEST", **kw: Any) -> tuple[bytes, str]:
    """One CT instance as the partner community holds it; returns (Part 10 bytes, Study Instance UID)."""
    study = make_study(tmp_path / "partner", patient_id="R1", patient_name="Remote^Rob", birth_date="19600101",
                       sex="M", issuer=issuer, accession=accession, accession_issuer=REMOTE_ACCESSION_ISSUER,
                       study_description=description, series=(("CT", 1, "CHEST"),), **kw)
    return study.paths[0].read_bytes(), study.StudyInstanceUID


def expect(study_uid: str, patient_id: str = "R1", issuer: str | None = REMOTE_ISSUER) -> Expected:
    return Expected(patient_id=patient_id, study_uids=[study_uid], issuer=issuer)


def policy(**kw: Any) -> ReconcilePolicy:
    return ReconcilePolicy(source_of_previous_values=PARTNER, **kw)


def read(data: bytes) -> FileDataset:
    return pydicom.dcmread(io.BytesIO(data))


def history(ds: Dataset) -> list[Dataset]:
    return list(ds.get("OriginalAttributesSequence", []))


def modified(ds: Dataset, index: int = -1) -> Dataset:
    items = history(ds)[index].ModifiedAttributesSequence
    assert len(items) == 1  # PS3.3 C.12.1: only a single item
    item: Dataset = items[0]
    return item


def write(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dciodvfy_errors(data: bytes, path: Path) -> set[str]:
    exe = shutil.which("dciodvfy")
    assert exe is not None, "dciodvfy (Debian package dicom3tools) is not installed"
    path.write_bytes(data)
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return {ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")}


# ---------------------------------------------------------------------------- the reconciled instance


def test_outside_instance_takes_the_local_identity(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy(), now=NOW))
    assert ds.PatientID == "L42"
    assert ds.IssuerOfPatientID == LOCAL_ISSUER
    (qualifier,) = ds.IssuerOfPatientIDQualifiersSequence
    assert (qualifier.UniversalEntityID, qualifier.UniversalEntityIDType) == (LOCAL_ISSUER, "ISO")
    assert str(ds.PatientName) == "Local^Lisa^M"
    assert (ds.PatientBirthDate, ds.PatientSex) == ("19600102", "F")
    # the partner's identity stays visible to every reader
    (other,) = ds.OtherPatientIDsSequence
    assert (other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID) == ("R1", REMOTE_ISSUER, "TEXT")
    assert other.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == REMOTE_ISSUER
    assert ds.AccessionNumber == "RACC1"  # default policy keeps it
    assert ds.StudyDescription == "CT CHEST [OUTSIDE]"


def test_originals_are_recorded_exactly_in_one_original_attributes_item(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    before = read(data)
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy(accession="clear"), now=NOW))
    (item,) = history(ds)
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem == "XIG"
    assert item.SourceOfPreviousValues == PARTNER
    assert item.AttributeModificationDateTime == "20240501123015.250000+0000"
    old = modified(ds)
    changed = {"PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
               "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence", "AccessionNumber",
               "IssuerOfAccessionNumberSequence", "StudyDescription"}
    assert {e.keyword for e in old} == changed
    for keyword in changed:
        if keyword in before:
            assert old[keyword] == before[keyword], keyword
        else:  # added by reconciliation: recorded with zero length (there was no value)
            assert len(old[keyword].value) == 0, keyword
    assert str(old.PatientName) == "Remote^Rob"
    assert old.IssuerOfAccessionNumberSequence[0].UniversalEntityID == REMOTE_ACCESSION_ISSUER


def _to_syntax(data: bytes, syntax: str) -> bytes:
    ds = read(data)
    if syntax in (RLELossless, JPEGLSLossless):
        ds.compress(syntax, generate_instance_uid=False)
        return write(ds)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian,
                     little_endian=syntax != ExplicitVRBigEndian)
    return buf.getvalue()


SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
            RLELossless, JPEGLSLossless]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_pixels_uids_syntax_and_all_other_attributes_are_untouched(tmp_path: Path, syntax: str) -> None:
    plain, study_uid = outside(tmp_path)
    data = _to_syntax(plain, syntax)
    before = read(data)
    assert before.file_meta.TransferSyntaxUID == syntax
    out = reconcile(data, LOCAL, expect(study_uid), policy(accession="prefix", accession_prefix="OUT_"), now=NOW)
    after = read(out)
    assert after.file_meta.TransferSyntaxUID == syntax
    assert after.PatientID == "L42" and after.AccessionNumber == "OUT_RACC1"
    assert bytes(after.PixelData) == bytes(before.PixelData)  # native or encapsulated, never re-encoded
    assert len(after.PixelData) > 0
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID", "FrameOfReferenceUID"):
        assert after[keyword].value == before[keyword].value
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
        assert after.file_meta[keyword].value == before.file_meta[keyword].value
    assert after.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID  # XIG wrote this file (PS3.10 7.1)
    untouched = {e.keyword for e in before} - TRACKED
    assert untouched <= {e.keyword for e in after}
    for keyword in untouched:
        assert after[keyword] == before[keyword], keyword
    assert {e.keyword for e in after} - {e.keyword for e in before} <= TRACKED | {"OriginalAttributesSequence"}


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=lambda s: s.name)
def test_output_passes_dciodvfy_without_new_errors(tmp_path: Path, syntax: str) -> None:
    plain, study_uid = outside(tmp_path)
    data = _to_syntax(plain, syntax)
    out = reconcile(data, LOCAL, expect(study_uid), policy(accession="local", local_accession="LOC-7",
                                                          local_accession_issuer="1.3.6.1.4.1.21367.13.20.2"), now=NOW)
    errors_before = dciodvfy_errors(data, tmp_path / "in.dcm")
    errors_after = dciodvfy_errors(out, tmp_path / "out.dcm")
    assert errors_after - errors_before == set()


def test_reconciliation_is_deterministic_with_a_pinned_clock(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    args = (LOCAL, expect(study_uid), policy())
    assert reconcile(data, *args, now=NOW) == reconcile(data, *args, now=NOW)


def test_default_modification_datetime_carries_a_utc_offset(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy()))
    assert re.fullmatch(r"\d{14}\.\d{6}[+-]\d{4}", history(ds)[0].AttributeModificationDateTime)


def test_existing_history_of_other_systems_is_kept(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(data)
    theirs, theirs_modified = Dataset(), Dataset()
    theirs_modified.PatientID = "THEIR-OLD-ID"
    theirs.ModifiedAttributesSequence = [theirs_modified]
    theirs.AttributeModificationDateTime = "20230101000000"
    theirs.ModifyingSystem = "PARTNER PACS"
    theirs.SourceOfPreviousValues = "Somewhere"
    theirs.ReasonForTheAttributeModification = "COERCE"
    ds.OriginalAttributesSequence = [theirs]
    out = read(reconcile(write(ds), LOCAL, expect(study_uid), policy(), now=NOW))
    first, second = history(out)
    assert first.ModifyingSystem == "PARTNER PACS" and first.ModifiedAttributesSequence[0].PatientID == "THEIR-OLD-ID"
    assert second.ModifyingSystem == "XIG" and second.ModifiedAttributesSequence[0].PatientID == "R1"


# ---------------------------------------------------------------------------- accession, marker, other IDs


@pytest.mark.parametrize(
    ("kw", "accession", "issuer"),
    [
        ({"accession": "keep"}, "RACC1", REMOTE_ACCESSION_ISSUER),
        ({"accession": "prefix", "accession_prefix": "OUT_"}, "OUT_RACC1", None),
        ({"accession": "clear"}, "", None),
        ({"accession": "local", "local_accession": "LOC-2024-17"}, "LOC-2024-17", None),
        ({"accession": "local", "local_accession": "LOC-2024-17", "local_accession_issuer": "urn:oid:1.2.3.4"},
         "LOC-2024-17", "1.2.3.4"),
    ],
    ids=["keep", "prefix", "clear", "local", "local-with-issuer"],
)
def test_accession_policies(tmp_path: Path, kw: dict[str, Any], accession: str, issuer: str | None) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy(**kw), now=NOW))
    assert "AccessionNumber" in ds and ds.AccessionNumber == accession  # Type 2: always present
    if issuer is None:
        assert "IssuerOfAccessionNumberSequence" not in ds
    else:
        (item,) = ds.IssuerOfAccessionNumberSequence
        assert (item.UniversalEntityID, item.UniversalEntityIDType) == (issuer, "ISO")
    old = modified(ds)
    if kw["accession"] == "keep":
        assert "AccessionNumber" not in old and "IssuerOfAccessionNumberSequence" not in old
    else:  # the original is always preserved
        assert old.AccessionNumber == "RACC1"
        assert old.IssuerOfAccessionNumberSequence[0].UniversalEntityID == REMOTE_ACCESSION_ISSUER


def test_prefixed_accession_is_clipped_to_sh_length(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path, accession="ABCDEFGHIJKLMN")
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy(accession="prefix", accession_prefix="OUTSIDE-")))
    assert ds.AccessionNumber == "OUTSIDE-ABCDEFGH"
    assert modified(ds).AccessionNumber == "ABCDEFGHIJKLMN"


def test_prefix_leaves_an_empty_accession_empty(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path, accession="")
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy(accession="prefix", accession_prefix="OUT_")))
    assert ds.AccessionNumber == ""
    assert "AccessionNumber" not in modified(ds)


def test_accession_inside_request_attributes_follows_the_policy(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(data)
    request = Dataset()
    request.AccessionNumber = "RACC1"
    request.RequestedProcedureID = "RP1"
    request.ScheduledProcedureStepID = "SPS1"
    ds.RequestAttributesSequence = [request]
    out = read(reconcile(write(ds), LOCAL, expect(study_uid), policy(accession="prefix", accession_prefix="X-")))
    assert out.AccessionNumber == "X-RACC1"
    assert out.RequestAttributesSequence[0].AccessionNumber == "X-RACC1"
    assert out.RequestAttributesSequence[0].RequestedProcedureID == "RP1"
    assert modified(out).RequestAttributesSequence[0].AccessionNumber == "RACC1"


@pytest.mark.parametrize(
    ("description", "kw", "result"),
    [
        ("CT CHEST", {}, "CT CHEST [OUTSIDE]"),
        ("", {}, "[OUTSIDE]"),
        ("X" * 60, {}, "X" * 54 + " [OUTSIDE]"),
        ("CT CHEST", {"outside_marker_text": "(EXTERN)"}, "CT CHEST (EXTERN)"),
        ("CT CHEST", {"outside_marker": False}, "CT CHEST"),
        ("CT CHEST [OUTSIDE]", {}, "CT CHEST [OUTSIDE]"),
    ],
    ids=["appended", "empty", "clipped-to-64", "custom", "off", "already-marked"],
)
def test_outside_marker(tmp_path: Path, description: str, kw: dict[str, Any], result: str) -> None:
    data, study_uid = outside(tmp_path, description=description)
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy(**kw), now=NOW))
    assert ds.StudyDescription == result
    assert len(ds.StudyDescription) <= 64
    if result == description:
        assert "StudyDescription" not in modified(ds)
    else:
        assert modified(ds).StudyDescription == description


def test_other_patient_ids_can_be_left_alone(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy(keep_other_ids=False)))
    assert "OtherPatientIDsSequence" not in ds
    assert "OtherPatientIDsSequence" not in modified(ds)


def test_other_patient_id_takes_the_xcpd_issuer_when_the_instance_names_none(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path, issuer=None)
    ds = read(reconcile(data, LOCAL, expect(study_uid), policy()))  # accepted on the Patient ID alone
    (other,) = ds.OtherPatientIDsSequence
    assert (other.PatientID, other.IssuerOfPatientID) == ("R1", REMOTE_ISSUER)
    assert modified(ds).IssuerOfPatientID == ""  # was absent: recorded with zero length


# ---------------------------------------------------------------------------- refusals


def test_wrong_patient_is_refused_with_a_precise_reason(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    sop = read(data).SOPInstanceUID
    with pytest.raises(ReconcileError) as info:
        reconcile(data, LOCAL, expect(study_uid, patient_id="R2"), policy())
    assert str(info.value) == (f"instance {sop} belongs to patient R1^^^&{REMOTE_ISSUER}&ISO, "
                               f"expected R2^^^&{REMOTE_ISSUER}&ISO: refused")


def test_same_patient_id_from_another_issuer_is_refused(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    wanted = r"belongs to patient R1\^\^\^&.*300&ISO, expected R1\^\^\^&2\.16\.999\.9&ISO: refused"
    with pytest.raises(ReconcileError, match=wanted):
        reconcile(data, LOCAL, expect(study_uid, issuer="urn:oid:2.16.999.9"), policy())


def test_wrong_study_is_refused(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    with pytest.raises(ReconcileError, match=rf"belongs to study {study_uid}, expected 1\.2\.3: refused"):
        reconcile(data, LOCAL, Expected("R1", ["1.2.3"], REMOTE_ISSUER), policy())


def test_instance_without_patient_id_is_refused(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(data)
    ds.PatientID = ""
    with pytest.raises(ReconcileError, match="has no Patient ID: refused"):
        reconcile(write(ds), LOCAL, expect(study_uid), policy())


def test_check_accepts_the_expected_instance_and_leaves_it_untouched(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(data)
    check(ds, expect(study_uid))
    check(ds, expect(study_uid, issuer=None))
    assert ds.PatientID == "R1"


@pytest.mark.parametrize(
    "data",
    [b"", b"not dicom at all", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00"],
    ids=["empty", "text", "truncated-meta"],
)
def test_non_dicom_input_is_a_reconcile_error(data: bytes) -> None:
    with pytest.raises(ReconcileError):
        reconcile(data, LOCAL, Expected("R1", ["1.2.3"]), policy())


def test_dataset_without_file_meta_is_refused(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, read(data), enforce_file_format=False)  # preamble-less, meta-less dataset
    raw = buf.getvalue()
    with pytest.raises(ReconcileError, match="not a DICOM Part 10 object"):
        reconcile(raw[raw.index(b"\x08\x00"):], LOCAL, expect(study_uid), policy())


@pytest.mark.parametrize(
    "make",
    [
        lambda: LocalPatient("", LOCAL_ISSUER),
        lambda: LocalPatient("L\\1", LOCAL_ISSUER),
        lambda: LocalPatient("L1", ""),
        lambda: LocalPatient("L1", LOCAL_ISSUER, birth_date="1960-01-02"),
        lambda: LocalPatient("L1", LOCAL_ISSUER, birth_date="19600231"),
        lambda: LocalPatient("L1", LOCAL_ISSUER, sex="X"),
        lambda: LocalPatient("L1", LOCAL_ISSUER, name="A" * 65),
        lambda: ReconcilePolicy(accession="prefix"),
        lambda: ReconcilePolicy(accession="local", local_accession="X" * 17),
        lambda: ReconcilePolicy(accession="bogus"),  # type: ignore[arg-type]
        lambda: ReconcilePolicy(modifying_system=""),
        lambda: Expected("", ["1.2.3"]),
        lambda: Expected("R1", []),
    ],
)
def test_invalid_configuration_is_rejected(make: Any) -> None:
    with pytest.raises(ReconcileError):
        make()


# ---------------------------------------------------------------------------- idempotence


def test_reconciling_again_with_the_same_policy_changes_nothing(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    pol = policy(accession="prefix", accession_prefix="OUT_")
    once = reconcile(data, LOCAL, expect(study_uid), pol, now=NOW)
    twice = reconcile(once, LOCAL, expect(study_uid), pol, now=datetime(2025, 1, 1, tzinfo=UTC))
    assert twice == once  # byte for byte: no second history item, no double prefix or marker
    ds = read(twice)
    assert len(history(ds)) == 1
    assert ds.AccessionNumber == "OUT_RACC1" and ds.StudyDescription == "CT CHEST [OUTSIDE]"


def test_reconciling_again_with_another_policy_starts_from_the_originals(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    first = reconcile(data, LOCAL, expect(study_uid), policy(accession="prefix", accession_prefix="OUT_"), now=NOW)
    second = read(reconcile(first, LOCAL, expect(study_uid), policy(accession="clear", outside_marker=False)))
    assert second.PatientID == "L42" and str(second.PatientName) == "Local^Lisa^M"
    assert second.AccessionNumber == ""
    assert second.StudyDescription == "CT CHEST"
    assert len(history(second)) == 2
    assert {e.keyword for e in modified(second)} == {"AccessionNumber", "StudyDescription"}
    assert modified(second).AccessionNumber == "OUT_RACC1"  # the intermediate value
    assert modified(second, 0).AccessionNumber == "RACC1"  # the original, still first
    # back to "keep": the partner's accession and issuer return from the first item
    third = read(reconcile(write(second), LOCAL, expect(study_uid), policy(outside_marker=False)))
    assert third.AccessionNumber == "RACC1"
    assert third.IssuerOfAccessionNumberSequence[0].UniversalEntityID == REMOTE_ACCESSION_ISSUER


def test_reconciled_instance_is_still_refused_for_another_patient(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    once = reconcile(data, LOCAL, expect(study_uid), policy(), now=NOW)
    with pytest.raises(ReconcileError, match=r"belongs to patient R1\^\^\^.*expected R9.*Original Attributes"):
        reconcile(once, LOCAL, expect(study_uid, patient_id="R9"), policy())


def test_a_history_claimed_by_an_outside_instance_is_not_trusted(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    forged = read(reconcile(data, LOCAL, expect(study_uid), policy(), now=NOW))
    forged.PatientID = "SOMEONE-ELSE"  # history says "was R1", but it is not our local patient now
    with pytest.raises(ReconcileError, match="belongs to patient SOMEONE-ELSE"):
        reconcile(write(forged), LOCAL, expect(study_uid), policy())


def test_reconcile_dataset_reports_whether_it_changed_anything(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(data)
    assert reconcile_dataset(ds, LOCAL, expect(study_uid), policy(), now=NOW) is True
    assert reconcile_dataset(ds, LOCAL, expect(study_uid), policy(), now=NOW) is False
    assert len(history(ds)) == 1


# ---------------------------------------------------------------------------- character sets


def test_latin1_instance_switches_to_utf8_and_keeps_originals_in_their_own_character_set(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    ds = read(data)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Zoë"
    ds.StudyDescription = "Thorax Übersicht"
    ds.InstitutionName = "Klinik Süd"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCH", "99XIG", "CT für Thorax"
    ds.ProcedureCodeSequence = [code]
    latin = write(ds)
    local = LocalPatient("L42", LOCAL_ISSUER, "Yamada^Tarou=山田^太郎", "19600102", "M")
    out = reconcile(latin, local, expect(study_uid), policy(), now=NOW)
    after = read(out)
    assert after.SpecificCharacterSet == "ISO_IR 192"
    assert str(after.PatientName) == "Yamada^Tarou=山田^太郎"
    assert after.StudyDescription == "Thorax Übersicht [OUTSIDE]"
    assert after.InstitutionName == "Klinik Süd"  # re-encoded, not mangled
    assert after.ProcedureCodeSequence[0].CodeMeaning == "CT für Thorax"
    old = modified(after)
    assert old.SpecificCharacterSet == "ISO_IR 100"  # the item keeps the previous character set (PS3.5 7.5.3)
    assert str(old.PatientName) == "Müller^Zoë"
    assert "Müller".encode("latin-1") in out and "Klinik Süd".encode() in out
    assert dciodvfy_errors(out, tmp_path / "out.dcm") - dciodvfy_errors(latin, tmp_path / "in.dcm") == set()


def test_utf8_instance_keeps_its_character_set(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)  # the synthesizer writes ISO_IR 192
    local = LocalPatient("L42", LOCAL_ISSUER, "Müller^Zoë")
    after = read(reconcile(data, local, expect(study_uid), policy()))
    assert after.SpecificCharacterSet == "ISO_IR 192"
    assert str(after.PatientName) == "Müller^Zoë"
    assert "SpecificCharacterSet" not in modified(after)


# ---------------------------------------------------------------------------- the KOS


def partner_kos(accession: str = "RACC1") -> tuple[bytes, StudyInfo]:
    study = StudyInfo(
        StudyInstanceUID="1.3.6.1.4.1.21367.13.90.1",
        patient=PatientRecord("R1", REMOTE_ISSUER, "Remote^Rob", "19600101", "M"),
        StudyDate="20240115", StudyTime="101500", AccessionNumber=accession,
        AccessionNumberIssuer=REMOTE_ACCESSION_ISSUER, StudyID="S1", StudyDescription="CT CHEST",
        series=(SeriesInfo("1.3.6.1.4.1.21367.13.90.1.1", "CT", 1,
                           instances=tuple(InstanceInfo(CT, f"1.3.6.1.4.1.21367.13.90.1.1.{i}", i) for i in (1, 2))),),
        source_id="1.3.6.1.4.1.21367.13.80.300",
    )
    kos = build_kos(study, kos_uid="1.3.6.1.4.1.21367.13.90.2.1", retrieve_location_uid=study.source_id)
    return kos, study


def test_kos_is_reconciled_like_any_instance(tmp_path: Path) -> None:
    kos, study = partner_kos()
    before = parse_kos(kos)
    expected = Expected.for_manifest(before, patient_id="R1", issuer=REMOTE_ISSUER)
    pol = policy(accession="local", local_accession="LOC-7", local_accession_issuer="1.3.6.1.4.1.21367.13.20.2")
    out, manifest = reconcile_kos(kos, LOCAL, expected, pol, now=NOW)
    assert out == reconcile(kos, LOCAL, expected, pol, now=NOW)  # the same codec
    assert (manifest.patient_id, manifest.issuer_of_patient_id) == ("L42", LOCAL_ISSUER)
    assert manifest.patient_name == "Local^Lisa^M"
    assert manifest.accession_number == "LOC-7"
    assert manifest.references == before.references
    assert manifest.sop_instance_uid == before.sop_instance_uid
    ds = read(out)
    (request,) = ds.ReferencedRequestSequence  # no contradicting accession inside the manifest
    assert request.AccessionNumber == "LOC-7"
    assert request.IssuerOfAccessionNumberSequence[0].UniversalEntityID == "1.3.6.1.4.1.21367.13.20.2"
    old = modified(ds)
    assert old.PatientID == "R1" and old.ReferencedRequestSequence[0].AccessionNumber == "RACC1"
    assert dciodvfy_errors(kos, tmp_path / "in.dcm") == set()
    assert dciodvfy_errors(out, tmp_path / "out.dcm") == set()


def test_kos_of_another_patient_is_refused() -> None:
    kos, study = partner_kos()
    with pytest.raises(ReconcileError, match="belongs to patient R1.*expected R2.*refused"):
        reconcile_kos(kos, LOCAL, Expected("R2", [study.StudyInstanceUID]), policy())


def test_reconcile_kos_refuses_an_image(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    with pytest.raises(ReconcileError, match="not a usable KOS"):
        reconcile_kos(data, LOCAL, expect(study_uid), policy())


# ---------------------------------------------------------------------------- files


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_reconcile_file_writes_the_reconciled_object(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    src = tmp_path / "in.dcm"
    src.write_bytes(data)
    dest = tmp_path / "import" / "out.dcm"
    assert reconcile_file(src, dest, LOCAL, expect(study_uid), policy(), now=NOW) is True
    assert dest.read_bytes() == reconcile(data, LOCAL, expect(study_uid), policy(), now=NOW)
    assert _leftovers(dest.parent) == []
    # in place, already reconciled: nothing changes, the file is rewritten identically
    assert reconcile_file(dest, dest, LOCAL, expect(study_uid), policy(), now=NOW) is False
    assert dest.read_bytes() == reconcile(data, LOCAL, expect(study_uid), policy(), now=NOW)
    assert _leftovers(dest.parent) == []


def test_refused_instance_leaves_destination_and_directory_untouched(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    src = tmp_path / "in.dcm"
    src.write_bytes(data)
    out_dir = tmp_path / "import"
    out_dir.mkdir()
    dest = out_dir / "out.dcm"
    dest.write_bytes(b"previous content")
    with pytest.raises(ReconcileError):
        reconcile_file(src, dest, LOCAL, expect(study_uid, patient_id="R2"), policy())
    assert dest.read_bytes() == b"previous content"
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.dcm"]


def test_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    data, study_uid = outside(tmp_path)
    src = tmp_path / "in.dcm"
    src.write_bytes(data)
    out_dir = tmp_path / "import"
    dest = out_dir / "out.dcm"
    dest.mkdir(parents=True)  # a directory where the file should go: the rename fails after the write
    (dest / "keep").write_text("x")
    with pytest.raises(OSError):
        reconcile_file(src, dest, LOCAL, expect(study_uid), policy())
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.dcm"]
    assert (dest / "keep").read_text() == "x"
