"""A retrieved KOS manifest (family ``kos``): a readable Key Object Selection Document titled "Manifest",
about the test patient and the listed study, whose evidence says where to fetch every instance, and — when
dicom3tools is installed — free of ``dciodvfy`` errors."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from conformance import spec
from conformance.checks.common import check, listing
from conformance.model import Check
from conformance.target import TestPatient
from gateway.dicom.kos import KosError, KosManifest, parse_kos
from gateway.ihe import ebrim
from gateway.ihe.ebrim import DocumentEntry
from gateway.responding.matching import fold

DCIODVFY = "dciodvfy"
MANIFEST_TITLE = ("113030", "DCM")


def dciodvfy_path() -> str | None:
    return shutil.which(DCIODVFY) or (str(Path("/usr/bin/dciodvfy")) if Path("/usr/bin/dciodvfy").exists() else None)


def dciodvfy_errors(data: bytes, scratch: Path, exe: str) -> list[str]:
    """The ``Error`` lines of dicom3tools' ``dciodvfy`` for ``data`` (written to a file under ``scratch``)."""
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "kos.dcm"
    path.write_bytes(data)
    try:
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=False)
    finally:
        path.unlink(missing_ok=True)
    return [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def _study_uids(entry: DocumentEntry) -> list[str]:
    out = []
    for value in entry.reference_ids:
        try:
            ref = ebrim.parse_reference_id(value)
        except ValueError:
            continue
        if ref.type_code == ebrim.REFERENCE_ID_STUDY_INSTANCE_UID:
            out.append(ref.id)
    return out


def kos_checks(data: bytes, *, document_uid: str | None, entry: DocumentEntry | None, patient: TestPatient,
               scratch: Path) -> tuple[list[Check], KosManifest | None]:
    """Checks of one KOS; the parsed manifest when it is usable (None otherwise)."""
    try:
        kos = parse_kos(data)
    except KosError as exc:
        return [check("kos.readable", "kos", "the document is a readable DICOM Key Object Selection Document",
                      spec.KOS_IOD, False, str(exc))], None
    out = [check("kos.readable", "kos", "the document is a readable DICOM Key Object Selection Document",
                 spec.KOS_IOD, True, f"{len(kos.references)} referenced instance(s)")]
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        title = ds.ConceptNameCodeSequence[0]
        got = (str(title.CodeValue), str(title.CodingSchemeDesignator))
    except (InvalidDicomError, AttributeError, IndexError, KeyError, ValueError):
        got = ("", "")
    out.append(check("kos.title", "kos", "the document title is (113030, DCM, \"Manifest\")", spec.KOS_MANIFEST,
                     got == MANIFEST_TITLE, "" if got == MANIFEST_TITLE else f"title {got[0] or 'missing'} "
                                                                             f"({got[1] or '-'})"))
    if document_uid is not None:
        out.append(check("kos.uid", "kos", "the SOP Instance UID is the document's uniqueId", spec.KOS_METADATA,
                         kos.sop_instance_uid == document_uid,
                         "" if kos.sop_instance_uid == document_uid else
                         f"SOP Instance UID {kos.sop_instance_uid}, document uniqueId {document_uid}"))
    problems = []
    family = kos.patient_name.split("^", 1)[0]
    if fold(family) != fold(patient.family):
        problems.append(f"Patient's Name {kos.patient_name!r}")
    if kos.patient_birth_date and kos.patient_birth_date != patient.birth_date:
        problems.append(f"Patient's Birth Date {kos.patient_birth_date}")
    if entry is not None and entry.source_patient_id:
        try:
            source = ebrim.parse_cx(entry.source_patient_id)
            if source.id != kos.patient_id:
                problems.append(f"Patient ID {kos.patient_id!r} but sourcePatientId {entry.source_patient_id}")
        except ValueError:
            pass
    out.append(check("kos.patient", "kos", "the manifest is about the test patient (and the entry's sourcePatientId)",
                     spec.KOS_METADATA, not problems, "; ".join(problems)))
    studies = _study_uids(entry) if entry is not None else []
    if studies:
        ok = kos.study_instance_uid in studies
        out.append(check("kos.study", "kos", "the manifest's study is the one the entry's referenceIdList names",
                         spec.KOS_METADATA, ok, "" if ok else f"KOS study {kos.study_instance_uid}, entry lists "
                                                              f"{listing(studies)}"))
    no_location = sorted({r.series_uid for r in kos.references if not r.retrieve_location_uid})
    ok = bool(kos.references) and not no_location
    out.append(check("kos.evidence", "kos", "the evidence references instances, each series with a Retrieve "
                     "Location UID (the RAD-75 RepositoryUniqueId)", spec.KOS_RETRIEVE_LOCATION, ok,
                     "no referenced instance" if not kos.references else
                     f"series without Retrieve Location UID: {listing(no_location)}" if no_location else ""))
    exe = dciodvfy_path()
    if exe is not None:
        errors = dciodvfy_errors(data, scratch, exe)
        out.append(check("kos.dciodvfy", "kos", "dciodvfy reports no error", spec.KOS_IOD, not errors,
                         listing(errors, 3)))
    return out, kos


__all__ = ["dciodvfy_errors", "dciodvfy_path", "kos_checks"]
