"""Synthetic DICOM studies: deterministic, valid, the requested size and layout."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.dicom.synth import IMPLEMENTATION_CLASS_UID, SOP_CLASS_BY_MODALITY, make_instance, make_study

ARGS: dict[str, Any] = dict(
    patient_id="SYN-1", patient_name="Doe^Jane", birth_date="19800312", sex="F", issuer="2.999.1.1",
    accession="ACC-9", study_description="CT chest", series=[("CT", 3, "CHEST"), ("MR", 2, "HEAD")])


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    one = make_study(tmp_path / "one", seed=7, **ARGS)
    two = make_study(tmp_path / "two", seed=7, **ARGS)
    assert [p.read_bytes() for p in one.paths] == [p.read_bytes() for p in two.paths]
    assert one.StudyInstanceUID == two.StudyInstanceUID


def test_different_seed_or_patient_gives_different_uids_and_pixels(tmp_path: Path) -> None:
    base = make_study(tmp_path / "a", seed=7, **ARGS)
    other_seed = make_study(tmp_path / "b", seed=8, **ARGS)
    other_patient = make_study(tmp_path / "c", seed=7, **{**ARGS, "patient_id": "SYN-2"})
    uids = [{i.SOPInstanceUID for i in s.instances} | {s.StudyInstanceUID} for s in (base, other_seed, other_patient)]
    assert not uids[0] & uids[1] and not uids[0] & uids[2]
    assert base.instances[0].pixel_sha256 != other_seed.instances[0].pixel_sha256
    # every instance of a study has its own pixels
    assert len({i.pixel_sha256 for i in base.instances}) == len(base.instances)


def test_structure_and_modules(tmp_path: Path) -> None:
    study = make_study(tmp_path, seed=1, accession_issuer="2.999.5", **ARGS)
    assert [(s.Modality, len(s.instances), s.BodyPartExamined) for s in study.series] == \
        [("CT", 3, "CHEST"), ("MR", 2, "HEAD")]
    assert study.modalities == ("CT", "MR")
    for s in study.series:
        for inst in s.instances:
            ds = pydicom.dcmread(inst.path)
            assert inst.path == tmp_path / f"s{s.SeriesNumber:03d}" / f"i{inst.InstanceNumber:05d}.dcm"
            assert ds.preamble == b"\0" * 128
            meta = ds.file_meta
            assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == inst.SOPInstanceUID
            assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == SOP_CLASS_BY_MODALITY[s.Modality]
            assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
            assert ds.StudyInstanceUID == study.StudyInstanceUID and ds.SeriesInstanceUID == s.SeriesInstanceUID
            assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex, ds.IssuerOfPatientID) == \
                ("SYN-1", "Doe^Jane", "19800312", "F", "2.999.1.1")
            assert ds.AccessionNumber == "ACC-9"
            assert ds.IssuerOfAccessionNumberSequence[0].UniversalEntityID == "2.999.5"
            assert ds.Modality == s.Modality and ds.BodyPartExamined == s.BodyPartExamined
            assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (64, 64, 16, 12)
            assert len(ds.PixelData) == 64 * 64 * 2
            assert hashlib.sha256(ds.PixelData).hexdigest() == inst.pixel_sha256
            assert max(ds.PixelData[1::2]) < 16  # 12 bits stored: high byte < 0x10
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
                assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
            assert inst.size == inst.path.stat().st_size


def test_large_images_and_transfer_syntax(tmp_path: Path) -> None:
    study = make_study(tmp_path, patient_id="SYN-L", patient_name="Large^L", birth_date="19500101", sex="M",
                       series=[("CT", 2, "ABDOMEN"), ("US", 1, "ABDOMEN")], rows=512, cols=512,
                       transfer_syntax="1.2.840.10008.1.2", seed=3)
    ct = pydicom.dcmread(study.series[0].instances[0].path)
    assert ct.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert len(ct.PixelData) == 512 * 512 * 2
    assert study.series[0].instances[0].size > 512 * 512 * 2
    us = pydicom.dcmread(study.series[1].instances[0].path)
    assert us.BitsAllocated == 8 and len(us.PixelData) == 512 * 512  # the US Image module wants 8 bits
    assert us.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"


def test_make_instance(tmp_path: Path) -> None:
    inst = make_instance(tmp_path / "x.dcm", patient_id="ONE", modality="CR", body_part="HAND",
                         study_uid="2.999.10.1", sop_uid="2.999.10.1.1.1", seed=5)
    ds = pydicom.dcmread(inst.path)
    assert ds.StudyInstanceUID == "2.999.10.1" and ds.SOPInstanceUID == "2.999.10.1.1.1"
    assert ds.SOPClassUID == SOP_CLASS_BY_MODALITY["CR"] and ds.BodyPartExamined == "HAND"
    other = make_instance(tmp_path / "y.dcm", modality="XX", seed=5)
    assert other.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # unknown modality: Secondary Capture


def test_rejects_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transfer syntax"):
        make_study(tmp_path, patient_id="X", patient_name="X", birth_date="", sex="O",
                   transfer_syntax="1.2.840.10008.1.2.4.50")
    with pytest.raises(ValueError, match="bits"):
        make_study(tmp_path, patient_id="X", patient_name="X", birth_date="", sex="O", bits=12)
    with pytest.raises(ValueError, match="at least one"):
        make_study(tmp_path, patient_id="X", patient_name="X", birth_date="", sex="O", series=[("CT", 0, "")])


def test_objects_pass_dciodvfy(tmp_path: Path) -> None:
    study = make_study(tmp_path, patient_id="V-1", patient_name="Valid^Val", birth_date="19700101", sex="O",
                       series=[("CT", 1, "CHEST"), ("MR", 1, "HEAD"), ("CR", 1, "CHEST"), ("US", 1, "ABDOMEN")],
                       seed=11)
    for inst in study.instances:
        out = subprocess.run(["dciodvfy", str(inst.path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{inst.path}: {errors}"
