"""The PACS interface the responding and initiating services are written against.

A backend answers three questions — which patients, which studies (down to every instance), and
"give me these instances" — and, for the import station, stores instances. Models are plain
frozen dataclasses whose names follow DICOM keywords so a reader can look them up in PS3.3/PS3.4.

Adapters: ``dimse`` (C-FIND / C-GET or C-MOVE, pynetdicom), ``dicomweb`` (QIDO-RS / WADO-RS /
STOW-RS, httpx) and ``filesystem`` (the embedded default: a folder of Part 10 files indexed in
the database).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from gateway.errors import XigError


class PacsError(XigError):
    """The PACS could not answer (unreachable, refused, failed mid-way)."""


@dataclass(frozen=True)
class PatientRecord:
    """Patient-level attributes as the PACS knows them (DICOM Patient Module)."""

    PatientID: str
    IssuerOfPatientID: str | None = None
    #: DICOM PN, ``Family^Given^Middle^Prefix^Suffix``
    PatientName: str = ""
    #: ``YYYYMMDD`` or empty
    PatientBirthDate: str = ""
    #: ``M``, ``F``, ``O`` or empty
    PatientSex: str = ""


@dataclass(frozen=True)
class InstanceInfo:
    SOPClassUID: str
    SOPInstanceUID: str
    InstanceNumber: int | None = None
    #: the stored transfer syntax when the backend knows it (not every C-FIND answers it)
    TransferSyntaxUID: str | None = None


@dataclass(frozen=True)
class SeriesInfo:
    SeriesInstanceUID: str
    Modality: str = ""
    SeriesNumber: int | None = None
    SeriesDescription: str = ""
    BodyPartExamined: str = ""
    instances: tuple[InstanceInfo, ...] = ()


@dataclass(frozen=True)
class StudyInfo:
    """A study with its full series/instance tree (what a KOS manifest is generated from)."""

    StudyInstanceUID: str
    patient: PatientRecord
    StudyDate: str = ""
    StudyTime: str = ""
    AccessionNumber: str = ""
    #: Issuer of Accession Number Sequence > Local/Universal Entity ID (an OID when known)
    AccessionNumberIssuer: str | None = None
    StudyID: str = ""
    StudyDescription: str = ""
    ReferringPhysicianName: str = ""
    series: tuple[SeriesInfo, ...] = ()
    #: RAD-75 RepositoryUniqueId of the PACS holding it (= KOS Retrieve Location UID)
    source_id: str = ""
    #: Retrieve AE Title for the KOS (DIMSE backends); empty when not applicable
    RetrieveAETitle: str = ""

    @property
    def modalities(self) -> tuple[str, ...]:
        """Distinct modalities in series order (KO/PR and other non-acquisition ones included)."""
        seen: dict[str, None] = {}
        for s in self.series:
            if s.Modality:
                seen.setdefault(s.Modality, None)
        return tuple(seen)

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series)

    def instances(self) -> list[tuple[SeriesInfo, InstanceInfo]]:
        return [(s, i) for s in self.series for i in s.instances]

    @property
    def content_digest(self) -> str:
        """SHA-256 over the sorted referenced SOP Instance UIDs (and classes): the study's "content".

        Unchanged content ⇒ same digest ⇒ same on-demand KOS uniqueId (ITI TF-2 3.43.4.2.3).
        """
        h = hashlib.sha256()
        for _, inst in sorted(self.instances(), key=lambda si: si[1].SOPInstanceUID):
            h.update(f"{inst.SOPClassUID}|{inst.SOPInstanceUID}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class InstanceRef:
    """One instance asked for in RAD-75 (study/series/instance UIDs)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str


@dataclass
class RetrievedInstance:
    """A DICOM Part 10 object as it streams out of the PACS (read ``chunks`` exactly once; a chunk is ``bytes``
    or a ``memoryview`` of a network read, valid for as long as it is referenced)."""

    ref: InstanceRef
    TransferSyntaxUID: str
    SOPClassUID: str
    chunks: AsyncIterator[bytes | memoryview]
    size: int | None = None


@dataclass
class RetrieveFailure:
    """An instance the PACS did not deliver, with a reason for the RegistryError's codeContext."""

    ref: InstanceRef
    reason: str
    #: True when the PACS answered that it does not have the instance (→ XDSDocumentUniqueIdError);
    #: False when it could not deliver it (unreachable, failed sub-operation → XDSRepositoryError).
    missing: bool = False


@dataclass(frozen=True)
class PatientQuery:
    """Loose pre-selection criteria for candidate patients (scoring happens in the service).

    A backend returns every patient that *could* match: it may over-return, never under-return.
    """

    family: str | None = None
    birth_date_from: str | None = None  # YYYYMMDD
    birth_date_to: str | None = None  # YYYYMMDD
    patient_ids: tuple[str, ...] = ()


@dataclass
class StoreResult:
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs
    failed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason


@runtime_checkable
class PacsBackend(Protocol):
    """What XIG needs from a PACS. All methods raise :class:`PacsError` when the PACS fails."""

    #: RAD-75 RepositoryUniqueId this backend serves (``imaging_source_id``)
    source_id: str

    async def ping(self) -> None:
        """Raise :class:`PacsError` unless the PACS answers (C-ECHO, HTTP, folder readable)."""

    async def find_patients(self, query: PatientQuery) -> list[PatientRecord]:
        """Candidate patients for XCPD matching."""

    async def find_studies(self, patient_id: str, issuer: str | None = None) -> list[StudyInfo]:
        """Every study of the patient, each with its full series/instance tree."""

    async def get_study(self, study_instance_uid: str) -> StudyInfo | None:
        """One study with its full tree, or ``None`` when the PACS does not have it."""

    def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        """Stream the instances, in any order, one result per ref; memory bounded by one instance."""

    async def store(self, files: Sequence[Path]) -> StoreResult:
        """Store Part 10 files (the import station's local PACS)."""

    async def aclose(self) -> None:
        """Release connections/associations."""


def unwrap(backend: PacsBackend) -> PacsBackend:
    """The backend under its decorators (audit, metrics: each keeps the one it wraps as ``inner``)."""
    while isinstance(getattr(backend, "inner", None), PacsBackend):
        backend = backend.inner  # type: ignore[attr-defined]
    return backend
