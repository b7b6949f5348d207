"""Key Object Selection (KOS) manifests: build one from PACS data, read one from a partner.

The responding side answers ITI-39 for an on-demand imaging entry with a KOS that references
every instance of the study (RAD TF-3 4.68.4.1.2.3, XDS-I.b "manifest"); the initiating side
reads the Current Requested Procedure Evidence Sequence of a retrieved KOS into a RAD-75 plan.

Both directions are pure functions of their input (no clock, no I/O except reading a path).

Determinism (ITI TF-2 3.43.4.2.3): reusing a NewDocumentUniqueId promises byte-identical content,
so :func:`kos_uid_for` hashes everything of the study that reaches the bytes, and
:func:`build_kos` writes nothing that is not derived from its arguments:

* series and instances are written in a canonical order (number, then UID), not the order a
  PACS happened to answer in;
* Content Date/Time and Instance Creation Date/Time default to the study's own date/time
  (Study Date + Study Time; ``19700101``/``000000`` when the PACS has none) instead of the wall
  clock. The manifest is a view of the study, so "created when the study was" is the only
  instant that is the same at every build; pass ``content_datetime`` to pin another one
  (e.g. the first time this content was seen, kept in the database).
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from gateway.errors import XigError
from gateway.pacs.base import InstanceInfo, SeriesInfo, StudyInfo

__all__ = [
    "IMAGE_STORAGE_SOP_CLASSES",
    "KOS_SOP_CLASS_UID",
    "KosError",
    "KosManifest",
    "KosReference",
    "RetrieveGroup",
    "build_kos",
    "kos_series_uid_for",
    "kos_uid_for",
    "parse_kos",
    "value_type_for",
]

#: Key Object Selection Document Storage (PS3.4 B.5)
KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: XIG's Implementation Class UID (a 2.25 UUID-derived UID, PS3.5 B.2; uuid5 of "urn:xig:implementation-class")
IMPLEMENTATION_CLASS_UID = "2.25.74331281496203721845488361151974594141"
IMPLEMENTATION_VERSION_NAME = "XIG"
#: Bump whenever the bytes :func:`build_kos` writes for the same input change: it is hashed into
#: the KOS UID so that a new layout never reuses a UID issued for the old one.
KOS_LAYOUT_VERSION = "1"
#: Series Number of the manifest series (constant: the series UID does not change with content)
KOS_SERIES_NUMBER = 999
KOS_INSTANCE_NUMBER = 1
#: Fallback Content Date/Time when the study has no Study Date (see the module docstring)
FALLBACK_DATE = "19700101"
FALLBACK_TIME = "000000"

#: Waveform IODs (PS3.4 B.5: every Waveform Storage SOP Class lives under this arc)
_WAVEFORM_ARC = "1.2.840.10008.5.1.4.1.1.9."

#: Storage SOP Classes of image IODs (IODs with the Image Pixel module; PS3.4 B.5, PS3.6 Annex A),
#: retired ones included because archives still hold them. TID 2010 references these with Value
#: Type IMAGE; waveforms with WAVEFORM; everything else (SR, PR, KO, encapsulated documents,
#: RT plans/structures, raw data, private classes) with COMPOSITE.
IMAGE_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image (retired)
        "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image (retired)
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3",  # Digital Intra-Oral X-Ray Image - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image - For Processing
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image (retired)
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image (retired)
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image (retired)
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.6.3",  # Photoacoustic Image
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
        "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image
        "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image
        "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image
        "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image (retired)
        "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic Image
        "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial Image
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image
        "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image - For Presentation
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image - For Processing
        "1.2.840.10008.5.1.4.1.1.14.1",  # Intravascular OCT Image - For Presentation
        "1.2.840.10008.5.1.4.1.1.14.2",  # Intravascular OCT Image - For Processing
        "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
        "1.2.840.10008.5.1.4.1.1.66.8",  # Height Map Segmentation
        "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image - Trial (retired)
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.3",  # VL Slide-Coordinates Microscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.5",  # Wide Field Ophthalmic Photography Stereographic Projection Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.6",  # Wide Field Ophthalmic Photography 3D Coordinates Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.7",  # Ophthalmic OCT En Face Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic OCT B-scan Volume Analysis
        "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy Image
        "1.2.840.10008.5.1.4.1.1.77.1.7",  # Dermoscopic Photography Image
        "1.2.840.10008.5.1.4.1.1.77.1.8",  # Confocal Microscopy Image
        "1.2.840.10008.5.1.4.1.1.77.1.9",  # Confocal Microscopy Tiled Pyramidal Image
        "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image - Trial (retired)
        "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map
        "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map
        "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
        "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
        "1.2.840.10008.5.1.4.1.1.481.23",  # Enhanced RT Image
        "1.2.840.10008.5.1.4.1.1.481.24",  # Enhanced Continuous RT Image
        "1.2.840.10008.5.1.4.1.1.501.1",  # DICOS CT Image
        "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS Digital X-Ray Image - For Presentation
        "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS Digital X-Ray Image - For Processing
        "1.2.840.10008.5.1.4.1.1.601.1",  # Eddy Current Image
        "1.2.840.10008.5.1.4.1.1.601.2",  # Eddy Current Multi-frame Image
    }
)

_XIG_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:xig:kos")

ValueType = Literal["IMAGE", "WAVEFORM", "COMPOSITE"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DA_RE = re.compile(r"^[0-9]{8}$")
_TM_RE = re.compile(r"^([0-9]{2})([0-9]{2})?([0-9]{2})?(\.[0-9]{1,6})?$")


class KosError(XigError):
    """A manifest cannot be built from this study, or the bytes are not a usable KOS."""


def value_type_for(sop_class_uid: str) -> ValueType:
    """TID 2010 Value Type of a reference: IMAGE, WAVEFORM or COMPOSITE (PS3.16 TID 2010 rows 5-7)."""
    if sop_class_uid in IMAGE_STORAGE_SOP_CLASSES:
        return "IMAGE"
    if sop_class_uid.startswith(_WAVEFORM_ARC):
        return "WAVEFORM"
    return "COMPOSITE"


# --------------------------------------------------------------------------------------------
# UIDs


def _derived_uid(root: str, material: str) -> str:
    """``root.<decimal of sha256(material)>``: a valid UID (PS3.5 9.1) of at most 64 characters."""
    root = _bare_oid(root)
    if not _UID_RE.match(root):
        raise KosError(f"UID root {root!r} is not a UID (dotted numbers without leading zeros)")
    room = 64 - len(root) - 1
    if room < 20:  # fewer than ~64 bits left: collisions become plausible
        raise KosError(f"UID root {root!r} is too long: a derived UID needs at least 20 digits after it")
    if root == "2.25":  # PS3.5 B.2: the arc of UUID-derived UIDs takes a UUID, here a name-based one
        return f"2.25.{uuid.uuid5(_XIG_UUID_NAMESPACE, material).int}"
    digest = int.from_bytes(hashlib.sha256(material.encode()).digest(), "big")
    # at most 39 digits (~128 bits); int → str has no leading zero
    number = digest % (10 ** min(room, 39))
    return f"{root}.{number}"


def _header_fingerprint(study: StudyInfo) -> str:
    p = study.patient
    fields = (
        p.PatientID,
        p.IssuerOfPatientID or "",
        p.PatientName,
        p.PatientBirthDate,
        p.PatientSex,
        study.StudyDate,
        study.StudyTime,
        study.AccessionNumber,
        study.AccessionNumberIssuer or "",
        study.StudyID,
        study.StudyDescription,
        study.ReferringPhysicianName,
        study.source_id,
        study.RetrieveAETitle,
    )
    series = sorted(
        (
            s.SeriesInstanceUID,
            str(s.SeriesNumber),
            *sorted(f"{i.SOPInstanceUID}={i.InstanceNumber}" for i in s.instances),
        )
        for s in study.series
    )
    return repr((fields, series))


def kos_uid_for(study: StudyInfo, *, root: str, salt: str = "") -> str:
    """The SOP Instance UID (= XDS uniqueId) of the on-demand KOS for this study's current content.

    ``root`` + ``.`` + decimal digits of SHA-256 over the layout version, the Study Instance UID,
    :attr:`StudyInfo.content_digest` (the referenced SOP classes/instances) and every header value
    of the study that is written into the manifest. Same content ⇒ same UID; an added instance or
    a corrected patient name ⇒ a new UID (ITI TF-2 3.43.4.2.3: a reused NewDocumentUniqueId
    promises byte-identical content).

    ``salt`` folds in deployment parameters that also reach the bytes (retrieve location UID, AE
    title, manufacturer, institution) when they can change under a running system.
    """
    material = "|".join(
        ("xig-kos", KOS_LAYOUT_VERSION, study.StudyInstanceUID, study.content_digest, _header_fingerprint(study), salt)
    )
    return _derived_uid(root, material)


def kos_series_uid_for(study: StudyInfo, *, root: str) -> str:
    """Series Instance UID of XIG's manifest series in this study: one per study, content-independent.

    Every manifest XIG issues for a study (one per content version) is an instance of this series.
    """
    return _derived_uid(root, f"xig-kos-series|{KOS_LAYOUT_VERSION}|{study.StudyInstanceUID}")


# --------------------------------------------------------------------------------------------
# value hygiene: PACS values are copied, but never in a form that makes the KOS invalid


def _clean(value: str | None) -> str:
    return (value or "").replace("\x00", "").strip()


def _bare_oid(value: str) -> str:
    v = _clean(value)
    return v[8:] if v.lower().startswith("urn:oid:") else v


def _text(value: str | None, max_chars: int) -> str:
    """A single-valued string VR (LO, SH): no backslash or control characters, within the length limit."""
    v = "".join(ch for ch in _clean(value) if ch >= " " and ch != "\\")
    return v[:max_chars].rstrip()


def _person_name(value: str | None) -> str:
    """PN: at most 64 characters per component group, at most 5 components, no backslash."""
    v = "".join(ch for ch in _clean(value) if ch >= " " and ch != "\\")
    groups = v.split("=")[:3]
    return "=".join("^".join(g.split("^")[:5])[:64] for g in groups).rstrip("=^ ")


def _date(value: str | None) -> str:
    v = _clean(value).replace("-", "")
    return v if _DA_RE.match(v) else ""


def _time(value: str | None) -> str:
    v = _clean(value).replace(":", "")
    return v if _TM_RE.match(v) else ""


def _sex(value: str | None) -> str:
    v = _clean(value).upper()
    return v if v in ("M", "F", "O") else ""


def _needs_unicode(values: Iterable[str]) -> bool:
    return any(not v.isascii() for v in values)


# --------------------------------------------------------------------------------------------
# building


class _Data:
    """A dataset being encoded as Explicit VR Little Endian (PS3.5 7.1.2), element by element.

    XIG writes its manifests with this small encoder instead of ``pydicom.dcmwrite`` for two
    reasons: the byte layout is fixed by this file (a pydicom upgrade choosing, say, undefined
    sequence lengths would silently break the byte-identical promise behind a reused UID), and a
    2000-instance manifest encodes in milliseconds. Sequences and items use defined lengths.
    """

    __slots__ = ("_elements", "_codec")

    def __init__(self, codec: str = "ascii") -> None:
        self._elements: dict[int, bytes] = {}
        self._codec = codec

    def put(self, tag: int, vr: str, value: str) -> None:
        raw = value.encode(self._codec)
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        self._elements[tag] = _header(tag, vr, len(raw)) + raw

    def seq(self, tag: int, items: Iterable[bytes]) -> None:
        body = b"".join(_ITEM + len(item).to_bytes(4, "little") + item for item in items)
        self._elements[tag] = _header(tag, "SQ", len(body)) + body

    def child(self) -> _Data:
        return _Data(self._codec)

    def encode(self) -> bytes:
        return b"".join(self._elements[t] for t in sorted(self._elements))


_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = b"\xfe\xff\x00\xe0"


def _header(tag: int, vr: str, length: int) -> bytes:
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr.encode()
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + length.to_bytes(4, "little")
    if length > 0xFFFF:
        raise KosError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) is too long for VR {vr}")
    return head + length.to_bytes(2, "little")


def _code(parent: _Data, value: str, scheme: str, meaning: str) -> bytes:
    item = parent.child()
    item.put(0x00080100, "SH", value)  # Code Value
    item.put(0x00080102, "SH", scheme)  # Coding Scheme Designator
    item.put(0x00080104, "LO", meaning)  # Code Meaning
    return item.encode()


def _issuer_item(parent: _Data, issuer: str) -> bytes:
    """Issuer of Accession Number / Issuer of Patient ID Qualifiers item (HL7 v2 HD, PS3.3 10.17)."""
    item = parent.child()
    bare = _bare_oid(issuer)
    if _OID_RE.match(bare) and len(bare) <= 64:
        item.put(0x00400032, "UT", bare)  # Universal Entity ID
        item.put(0x00400033, "CS", "ISO")  # Universal Entity ID Type
    else:
        item.put(0x00400031, "UT", _text(issuer, 64))  # Local Namespace Entity ID
    return item.encode()


def _part10(dataset: bytes, sop_instance_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) in front of ``dataset``."""
    meta = _Data()
    meta._elements[0x00020001] = _header(0x00020001, "OB", 2) + b"\x00\x01"  # File Meta Information Version
    meta.put(0x00020002, "UI", KOS_SOP_CLASS_UID)
    meta.put(0x00020003, "UI", sop_instance_uid)
    meta.put(0x00020010, "UI", EXPLICIT_VR_LITTLE_ENDIAN)
    meta.put(0x00020012, "UI", IMPLEMENTATION_CLASS_UID)
    meta.put(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME)
    body = meta.encode()
    group_length = _header(0x00020000, "UL", 4) + len(body).to_bytes(4, "little")
    return b"\x00" * 128 + b"DICM" + group_length + body + dataset


def _canonical_tree(study: StudyInfo) -> list[tuple[SeriesInfo, list[InstanceInfo]]]:
    """Series and instances in a canonical order, duplicates merged (a PACS answer order is not stable)."""
    by_series: dict[str, tuple[SeriesInfo, dict[str, InstanceInfo]]] = {}
    for s in study.series:
        uid = _clean(s.SeriesInstanceUID)
        if not uid:
            raise KosError(f"study {study.StudyInstanceUID}: a series has no Series Instance UID")
        _, insts = by_series.setdefault(uid, (s, {}))
        for i in s.instances:
            iuid = _clean(i.SOPInstanceUID)
            if not iuid or not _clean(i.SOPClassUID):
                raise KosError(
                    f"study {study.StudyInstanceUID}, series {uid}: an instance lacks its SOP Class/Instance UID"
                )
            insts.setdefault(iuid, i)

    def num(n: int | None) -> tuple[int, int]:
        return (0, n) if n is not None else (1, 0)

    tree = []
    for _uid, (s, insts) in sorted(by_series.items(), key=lambda kv: (num(kv[1][0].SeriesNumber), kv[0])):
        ordered = sorted(insts.values(), key=lambda i: (num(i.InstanceNumber), _clean(i.SOPInstanceUID)))
        if ordered:
            tree.append((s, ordered))
    return tree


def _content_datetime(study: StudyInfo, override: datetime | None) -> tuple[str, str]:
    if override is not None:
        return override.strftime("%Y%m%d"), override.strftime("%H%M%S")
    date = _date(study.StudyDate)
    if not date:
        return FALLBACK_DATE, FALLBACK_TIME
    return date, _time(study.StudyTime) or FALLBACK_TIME


def build_kos(
    study: StudyInfo,
    *,
    kos_uid: str,
    retrieve_location_uid: str,
    retrieve_ae_title: str = "",
    institution: str = "",
    manufacturer: str = "XIG",
    content_datetime: datetime | None = None,
    series_uid: str | None = None,
) -> bytes:
    """A Key Object Selection Document (Part 10, Explicit VR Little Endian) referencing every instance.

    IOD: PS3.3 A.35.4 (Patient, General Study, Key Object Document Series, General Equipment, Key
    Object Document, SR Document Content, SOP Common); content: TID 2010 with the document title
    (113030, DCM, "Manifest") as XDS-I.b uses it (RAD TF-3 4.68.4.1.2.3).

    ``retrieve_location_uid`` (the Imaging Document Source's RepositoryUniqueId, RAD TF-3
    4.69.4.1.2) goes into every Referenced Series item as Retrieve Location UID (0040,E011);
    ``retrieve_ae_title`` (or the study's :attr:`~StudyInfo.RetrieveAETitle`) as Retrieve AE Title.
    ``series_uid`` defaults to a UID derived from ``kos_uid``'s root (see :func:`kos_series_uid_for`).
    Byte-identical output for identical input (see the module docstring for the dates).
    """
    study_uid = _clean(study.StudyInstanceUID)
    if not study_uid:
        raise KosError("the study has no Study Instance UID")
    kos_uid = _clean(kos_uid)
    if not _UID_RE.match(kos_uid) or len(kos_uid) > 64:
        raise KosError(f"KOS SOP Instance UID {kos_uid!r} is not a valid UID")
    location = _bare_oid(retrieve_location_uid)
    if not _UID_RE.match(location) or len(location) > 64:
        raise KosError(f"Retrieve Location UID {retrieve_location_uid!r} is not a valid UID")
    tree = _canonical_tree(study)
    if not tree:
        raise KosError(f"study {study_uid} has no instances: a manifest must reference at least one")
    if series_uid is None:
        try:
            series_uid = kos_series_uid_for(study, root=kos_uid.rsplit(".", 1)[0])
        except KosError:  # kos_uid was not made by kos_uid_for and its root leaves no room
            series_uid = kos_series_uid_for(study, root="2.25")
    ae_title = _text(retrieve_ae_title or study.RetrieveAETitle, 16)
    content_date, content_time = _content_datetime(study, content_datetime)

    p = study.patient
    patient_name = _person_name(p.PatientName)
    referring = _person_name(study.ReferringPhysicianName)
    patient_id = _text(p.PatientID, 64)
    issuer_pid = _text(p.IssuerOfPatientID, 64)
    accession = _text(study.AccessionNumber, 16)
    accession_issuer = _clean(study.AccessionNumberIssuer) if accession else ""
    study_description = _text(study.StudyDescription, 64)
    institution = _text(institution, 64)
    manufacturer = _text(manufacturer, 64)
    texts = (patient_name, referring, patient_id, issuer_pid, accession, accession_issuer, study_description)
    unicode = _needs_unicode((*texts, institution, manufacturer))

    ds = _Data("utf-8" if unicode else "ascii")
    if unicode:
        ds.put(0x00080005, "CS", "ISO_IR 192")  # Specific Character Set (SOP Common, 1C)
    # SOP Common
    ds.put(0x00080012, "DA", content_date)  # Instance Creation Date
    ds.put(0x00080013, "TM", content_time)  # Instance Creation Time
    ds.put(0x00080016, "UI", KOS_SOP_CLASS_UID)
    ds.put(0x00080018, "UI", kos_uid)
    # General Study
    ds.put(0x00080020, "DA", _date(study.StudyDate))
    ds.put(0x00080030, "TM", _time(study.StudyTime))
    ds.put(0x00080050, "SH", accession)
    if accession_issuer:
        ds.seq(0x00080051, [_issuer_item(ds, accession_issuer)])  # Issuer of Accession Number Sequence
    ds.put(0x00080090, "PN", referring)
    if study_description:
        ds.put(0x00081030, "LO", study_description)
    ds.put(0x0020000D, "UI", study_uid)
    ds.put(0x00200010, "SH", _text(study.StudyID, 16))
    # Key Object Document Series
    ds.put(0x00080060, "CS", "KO")
    ds.seq(0x00081111, [])  # Referenced Performed Procedure Step Sequence (Type 2: present, empty)
    ds.put(0x0020000E, "UI", series_uid)
    ds.put(0x00200011, "IS", str(KOS_SERIES_NUMBER))
    # General Equipment
    ds.put(0x00080070, "LO", manufacturer)
    if institution:
        ds.put(0x00080080, "LO", institution)
    # Patient
    ds.put(0x00100010, "PN", patient_name)
    ds.put(0x00100020, "LO", patient_id)
    if issuer_pid:
        ds.put(0x00100021, "LO", issuer_pid)
        if _OID_RE.match(_bare_oid(p.IssuerOfPatientID or "")):
            ds.seq(0x00100024, [_issuer_item(ds, p.IssuerOfPatientID or "")])  # Issuer of PID Qualifiers
    ds.put(0x00100030, "DA", _date(p.PatientBirthDate))
    ds.put(0x00100040, "CS", _sex(p.PatientSex))
    # Key Object Document
    ds.put(0x00200013, "IS", str(KOS_INSTANCE_NUMBER))
    ds.put(0x00080023, "DA", content_date)  # Content Date
    ds.put(0x00080033, "TM", content_time)  # Content Time
    if accession:
        request = ds.child()
        request.put(0x00080050, "SH", accession)
        if accession_issuer:
            request.seq(0x00080051, [_issuer_item(ds, accession_issuer)])
        request.seq(0x00081110, [])  # Referenced Study Sequence (Type 2)
        request.put(0x0020000D, "UI", study_uid)
        request.put(0x00321060, "LO", study_description)  # Requested Procedure Description (Type 2)
        request.seq(0x00321064, [])  # Requested Procedure Code Sequence (Type 2)
        request.put(0x00401001, "SH", "")  # Requested Procedure ID (Type 2)
        request.put(0x00402016, "LO", "")  # Placer Order Number / Imaging Service Request (Type 2)
        request.put(0x00402017, "LO", "")  # Filler Order Number / Imaging Service Request (Type 2)
        ds.seq(0x0040A370, [request.encode()])  # Referenced Request Sequence
    evidence_series: list[bytes] = []
    content: list[bytes] = []
    for s, instances in tree:
        sop_items: list[bytes] = []
        for inst in instances:
            sop_class = _clean(inst.SOPClassUID)
            ref = ds.child()
            ref.put(0x00081150, "UI", sop_class)  # Referenced SOP Class UID
            ref.put(0x00081155, "UI", _clean(inst.SOPInstanceUID))  # Referenced SOP Instance UID
            ref_bytes = ref.encode()
            sop_items.append(ref_bytes)
            item = ds.child()
            item.seq(0x00081199, [ref_bytes])  # Referenced SOP Sequence
            item.put(0x0040A010, "CS", "CONTAINS")  # Relationship Type
            item.put(0x0040A040, "CS", value_type_for(sop_class))  # Value Type
            content.append(item.encode())
        series_item = ds.child()
        if ae_title:
            series_item.put(0x00080054, "AE", ae_title)  # Retrieve AE Title
        series_item.seq(0x00081199, sop_items)  # Referenced SOP Sequence
        series_item.put(0x0020000E, "UI", _clean(s.SeriesInstanceUID))
        series_item.put(0x0040E011, "UI", location)  # Retrieve Location UID
        evidence_series.append(series_item.encode())
    evidence = ds.child()
    evidence.seq(0x00081115, evidence_series)  # Referenced Series Sequence
    evidence.put(0x0020000D, "UI", study_uid)
    ds.seq(0x0040A375, [evidence.encode()])  # Current Requested Procedure Evidence Sequence
    # SR Document Content: the root CONTAINER of TID 2010 titled (113030, DCM, "Manifest")
    ds.put(0x0040A040, "CS", "CONTAINER")  # Value Type
    ds.seq(0x0040A043, [_code(ds, "113030", "DCM", "Manifest")])  # Concept Name Code Sequence
    ds.put(0x0040A050, "CS", "SEPARATE")  # Continuity Of Content
    template = ds.child()
    template.put(0x00080105, "CS", "DCMR")  # Mapping Resource
    template.put(0x0040DB00, "CS", "2010")  # Template Identifier
    ds.seq(0x0040A504, [template.encode()])  # Content Template Sequence
    ds.seq(0x0040A730, content)  # Content Sequence
    return _part10(ds.encode(), kos_uid)


# --------------------------------------------------------------------------------------------
# parsing


@dataclass(frozen=True)
class KosReference:
    """One instance a manifest points at, with where to fetch it (RAD-75 DocumentRequest)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    #: Retrieve Location UID (0040,E011) = RAD-75 RepositoryUniqueId; "" when the KOS names none
    retrieve_location_uid: str
    retrieve_ae_title: str = ""


@dataclass(frozen=True)
class RetrieveGroup:
    """The references of one series held by one Imaging Document Source (one RAD-75 SeriesRequest)."""

    retrieve_location_uid: str
    study_uid: str
    series_uid: str
    references: tuple[KosReference, ...]


@dataclass(frozen=True)
class KosManifest:
    """What the initiating side needs from a retrieved KOS: who, which study, and the evidence."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    content_date: str
    content_time: str
    #: the document title's Code Meaning, e.g. "Manifest"
    title: str
    references: tuple[KosReference, ...] = field(default=())

    def plan(self) -> list[RetrieveGroup]:
        """References grouped by (retrieve location, study, series), in manifest order."""
        groups: dict[tuple[str, str, str], list[KosReference]] = {}
        for ref in self.references:
            groups.setdefault((ref.retrieve_location_uid, ref.study_uid, ref.series_uid), []).append(ref)
        return [RetrieveGroup(loc, st, se, tuple(refs)) for (loc, st, se), refs in groups.items()]

    @property
    def retrieve_locations(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for ref in self.references:
            seen.setdefault(ref.retrieve_location_uid, None)
        return tuple(seen)


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = ds.get(keyword)
    if value is None:
        return []
    return list(value)


def _iter_evidence(ds: Dataset) -> Iterator[KosReference]:
    studies = _items(ds, "CurrentRequestedProcedureEvidenceSequence")
    if not studies:
        raise KosError("the KOS has no Current Requested Procedure Evidence Sequence (0040,A375) items")
    for si, study in enumerate(studies, 1):
        study_uid = _str(study, "StudyInstanceUID")
        if not study_uid:
            raise KosError(f"evidence item {si} has no Study Instance UID")
        series_items = _items(study, "ReferencedSeriesSequence")
        if not series_items:
            raise KosError(f"evidence for study {study_uid} has no Referenced Series Sequence items")
        for series in series_items:
            series_uid = _str(series, "SeriesInstanceUID")
            if not series_uid:
                raise KosError(f"a Referenced Series item of study {study_uid} has no Series Instance UID")
            location = _str(series, "RetrieveLocationUID")
            ae = _str(series, "RetrieveAETitle")
            sops = _items(series, "ReferencedSOPSequence")
            if not sops:
                raise KosError(f"evidence for series {series_uid} has no Referenced SOP Sequence items")
            for sop in sops:
                cls = _str(sop, "ReferencedSOPClassUID")
                uid = _str(sop, "ReferencedSOPInstanceUID")
                if not cls or not uid:
                    raise KosError(f"a Referenced SOP item of series {series_uid} lacks its SOP Class/Instance UID")
                yield KosReference(study_uid, series_uid, cls, uid, location, ae)


def parse_kos(data: bytes | Path) -> KosManifest:
    """Read a KOS (Part 10) into its header and evidence; :class:`KosError` when it is not a usable one."""
    try:
        if isinstance(data, Path):
            ds = dcmread(data, stop_before_pixels=True)
        else:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise KosError(f"not a DICOM Part 10 file: {exc}") from exc
    except (OSError, ValueError, KeyError, IndexError, EOFError, TypeError) as exc:
        raise KosError(f"unreadable DICOM file: {exc}") from exc
    try:
        sop_class = _str(ds, "SOPClassUID") or _str(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
        if sop_class != KOS_SOP_CLASS_UID:
            raise KosError(
                f"not a Key Object Selection Document: SOP Class UID is {sop_class or 'absent'}, "
                f"expected {KOS_SOP_CLASS_UID}"
            )
        refs: dict[str, KosReference] = {}
        for ref in _iter_evidence(ds):
            refs.setdefault(ref.sop_instance_uid, ref)
        titles = _items(ds, "ConceptNameCodeSequence")
        return KosManifest(
            sop_instance_uid=_str(ds, "SOPInstanceUID"),
            series_instance_uid=_str(ds, "SeriesInstanceUID"),
            study_instance_uid=_str(ds, "StudyInstanceUID"),
            patient_id=_str(ds, "PatientID"),
            issuer_of_patient_id=_str(ds, "IssuerOfPatientID"),
            patient_name=_str(ds, "PatientName"),
            patient_birth_date=_str(ds, "PatientBirthDate"),
            patient_sex=_str(ds, "PatientSex"),
            study_date=_str(ds, "StudyDate"),
            study_time=_str(ds, "StudyTime"),
            accession_number=_str(ds, "AccessionNumber"),
            study_description=_str(ds, "StudyDescription"),
            content_date=_str(ds, "ContentDate"),
            content_time=_str(ds, "ContentTime"),
            title=_str(titles[0], "CodeMeaning") if titles else "",
            references=tuple(refs.values()),
        )
    except KosError:
        raise
    except (ValueError, KeyError, IndexError, EOFError, TypeError, AttributeError) as exc:
        # a damaged element deep in a sequence only surfaces when pydicom parses it lazily
        raise KosError(f"malformed KOS: {exc}") from exc
