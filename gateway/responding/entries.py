"""One KOS DocumentEntry per study, built from live PACS data (RAD TF-3 4.68.4.1.2.3.2).

Pure mapping :class:`StudyInfo` → :class:`DocumentEntry` (spec digest §5.1). The entry is
On-Demand by default (ITI TF-2 3.38.4.1.3: the KOS is generated when retrieved); ``stable`` mode
announces the KOS of the study's current content as a Stable entry with its size and hash.
"""

from __future__ import annotations

import hashlib
import uuid

from gateway.config import CodeValue, Config
from gateway.dicom.kos import kos_uid_for
from gateway.ihe.ebrim import (
    DCM_OID,
    KOS_FORMAT_CODE,
    ON_DEMAND,
    STABLE,
    Code,
    DocumentEntry,
    SourcePatientInfo,
    dtm_from_dicom,
    entry_uuid_for,
    format_cx,
    study_reference_ids,
)
from gateway.pacs.base import StudyInfo

#: DICOM Controlled Terminology (acquisition modality codes, CID 29)
DCM_SCHEME = DCM_OID
#: Modalities that are not acquisitions and so are not event codes (CID 29 lists acquisition modalities)
NON_ACQUISITION = frozenset({"KO", "PR", "SR", "REG", "SEG", "RWV", "FID", "PLAN", "RTPLAN", "RTRECORD", "DOC"})
#: Modality display names (DICOM PS3.16 CID 29), for eventCodeDisplayNameList
MODALITY_NAMES = {
    "CR": "Computed Radiography", "CT": "Computed Tomography", "DX": "Digital Radiography",
    "MG": "Mammography", "MR": "Magnetic Resonance", "NM": "Nuclear Medicine", "OT": "Other",
    "PT": "Positron emission tomography", "RF": "Radio Fluoroscopy", "US": "Ultrasound",
    "XA": "X-Ray Angiography", "IO": "Intra-oral Radiography", "PX": "Panoramic X-Ray",
    "ES": "Endoscopy", "OP": "Ophthalmic photography", "SM": "Slide Microscopy", "XC": "External-camera Photography",
}
#: BodyPartExamined → SNOMED CT anatomic region (DICOM PS3.16 CID 4, the common ones)
BODY_PARTS = {
    "HEAD": ("69536005", "Head"), "BRAIN": ("12738006", "Brain"), "NECK": ("45048000", "Neck"),
    "CHEST": ("51185008", "Thorax"), "ABDOMEN": ("818983003", "Abdomen"), "PELVIS": ("816092008", "Pelvis"),
    "SPINE": ("421060004", "Spine"), "CSPINE": ("122494005", "Cervical spine"),
    "TSPINE": ("122495006", "Thoracic spine"), "LSPINE": ("122496007", "Lumbar spine"),
    "KNEE": ("72696002", "Knee"), "SHOULDER": ("16982005", "Shoulder"), "HIP": ("24136001", "Hip joint"),
    "HAND": ("85562004", "Hand"), "FOOT": ("56459004", "Foot"), "BREAST": ("76752008", "Breast"),
    "HEART": ("80891009", "Heart"), "EXTREMITY": ("66019005", "Limb"), "WHOLEBODY": ("38266002", "Entire body"),
}
SNOMED = "2.16.840.1.113883.6.96"


def _code(value: CodeValue) -> Code:
    return Code(value.code, value.scheme, value.display)


def event_codes(study: StudyInfo) -> tuple[Code, ...]:
    """Acquisition modalities (DCM, CID 29) then anatomic regions (SNOMED CT, CID 4), each once."""
    codes: dict[tuple[str, str], Code] = {}
    for modality in study.modalities:
        if modality not in NON_ACQUISITION:
            codes.setdefault((modality, DCM_SCHEME), Code(modality, DCM_SCHEME, MODALITY_NAMES.get(modality, modality)))
    for series in study.series:
        part = series.BodyPartExamined.strip().upper()
        if part in BODY_PARTS:
            code, name = BODY_PARTS[part]
            codes.setdefault((code, SNOMED), Code(code, SNOMED, name))
    return tuple(codes.values())


def on_demand_unique_id(study: StudyInfo, source_id: str) -> str:
    """The stable uniqueId of a study's On-Demand entry (``2.25`` UUID-derived, ≤ 64 characters)."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"xig-on-demand|{source_id}|{study.StudyInstanceUID}").int)


def kos_uid(study: StudyInfo, config: Config) -> str:
    """SOP Instance UID of the KOS for the study's current content (= NewDocumentUniqueId)."""
    return kos_uid_for(study, root=config.gateway.repository_unique_id,
                       salt=f"{study.source_id}|{config.responder.retrieve_ae_title}")


def document_entry(study: StudyInfo, config: Config, *, patient_id: str, unique_id: str,
                   kos_bytes: bytes | None = None) -> DocumentEntry:
    """The KOS DocumentEntry for ``study``; ``kos_bytes`` given ⇒ a Stable entry with size and hash."""
    r = config.responder
    stable = kos_bytes is not None
    title = study.StudyDescription.strip() or "Imaging study"
    if study.StudyDate:
        title = f"{title} ({study.StudyDate[:4]}-{study.StudyDate[4:6]}-{study.StudyDate[6:8]})"
    service_start = dtm_from_dicom(study.StudyDate, study.StudyTime) if study.StudyDate else None
    return DocumentEntry(
        entry_uuid=entry_uuid_for(unique_id),
        unique_id=unique_id,
        patient_id=format_cx(patient_id, config.gateway.assigning_authority),
        mime_type="application/dicom",
        object_type=STABLE if stable else ON_DEMAND,
        home_community_id=config.gateway.home_community_id,
        repository_unique_id=config.gateway.repository_unique_id,
        source_patient_id=format_cx(study.patient.PatientID,
                                    study.patient.IssuerOfPatientID or config.gateway.assigning_authority),
        source_patient_info=SourcePatientInfo.from_patient_record(
            study.patient, assigning_authority=config.gateway.assigning_authority),
        class_code=_code(r.class_code),
        type_code=_code(r.type_code),
        format_code=KOS_FORMAT_CODE,
        practice_setting_code=_code(r.practice_setting_code),
        healthcare_facility_type_code=_code(r.healthcare_facility_type_code),
        confidentiality_codes=(_code(r.confidentiality_code),),
        event_codes=event_codes(study),
        creation_time=service_start if stable else None,
        service_start_time=service_start,
        language_code=r.language_code,
        reference_ids=study_reference_ids(study),
        title=title[:128],
        comments=f"{study.instance_count} instances in {len(study.series)} series"
                 + (f" ({', '.join(study.modalities)})" if study.modalities else ""),
        size=len(kos_bytes) if kos_bytes is not None else None,
        hash=hashlib.sha1(kos_bytes).hexdigest() if kos_bytes is not None else None,  # noqa: S324 - XDS hash is SHA-1
    )


def manifest(study: StudyInfo, config: Config) -> tuple[str, bytes]:
    """``(kos uid, Part 10 bytes)`` of the study's KOS for its current content (byte-identical when unchanged)."""
    from gateway.dicom.kos import build_kos

    uid = kos_uid(study, config)
    data = build_kos(study, kos_uid=uid, retrieve_location_uid=study.source_id or config.gateway.imaging_source_id,
                     retrieve_ae_title=config.responder.retrieve_ae_title or study.RetrieveAETitle,
                     institution=config.gateway.name)
    return uid, data
