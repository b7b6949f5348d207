"""XDS DocumentEntry metadata as ebRIM 3.0 ``rim:ExtrinsicObject`` (ITI TF-3 §4.2.3.2, §4.2.5.2).

A :class:`DocumentEntry` is the typed model; :func:`build_extrinsic_object` and
:func:`parse_extrinsic_object` convert it to and from XML. The mapping follows ITI TF-3 Table
4.2.3.2-1 and the scheme UUIDs of IPF ``Vocabulary.java``:

* coded attributes (classCode, typeCode, formatCode, practiceSettingCode,
  healthcareFacilityTypeCode, confidentialityCode, eventCodeList) are ``rim:Classification``
  elements: ``nodeRepresentation`` = code, ``Slot codingScheme`` = scheme, ``Name`` = display name;
* author is a ``rim:Classification`` with an empty ``nodeRepresentation`` and the slots
  ``authorPerson`` / ``authorInstitution`` / ``authorRole`` / ``authorSpecialty`` /
  ``authorTelecommunication``;
* uniqueId and patientId are ``rim:ExternalIdentifier`` elements;
* everything else is a ``rim:Slot`` (``creationTime``, ``sourcePatientInfo``, the
  ``urn:ihe:iti:xds:2013:referenceIdList`` slot, ...); title and comments are ``rim:Name`` and
  ``rim:Description``.

Parsing is lenient where real peers are sloppy: ExtrinsicObject ids that are symbolic
(``Document01`` in submission metadata) or UUIDs without ``urn:uuid:`` (Metriport) are kept as
they are, ISO 8601 date-times (Metriport ``creationTime``) are accepted by :func:`normalize_dtm`,
unknown slots survive a round trip in :attr:`DocumentEntry.other_slots`.

Identifier helpers: CX (``id^^^&1.2.3&ISO``, HL7 v2.5 as profiled by ITI TF-3 §4.2.3.1.7), CXi
reference ids (ITI TF-3 §4.2.3.2.28), DTM (``YYYY[MM[DD[hh[mm[ss]]]]]`` in UTC, ITI TF-3 §4.2.3.1.4)
and homeCommunityId normalisation (``urn:oid:`` form, ITI TF-2 3.18.4.1.2.3.8).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from lxml import etree

from gateway.pacs.base import PatientRecord, StudyInfo
from gateway.soap import ns

# --------------------------------------------------------------------------------------------------
# Vocabulary (ITI TF-3 §4.2.5, IPF Vocabulary.java)
# --------------------------------------------------------------------------------------------------

#: ExtrinsicObject/@objectType of a Stable DocumentEntry [ITI TF-2 3.18.4.1.2.3.6.2].
STABLE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
#: ExtrinsicObject/@objectType of an On-Demand DocumentEntry.
ON_DEMAND = "urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248"
DOCUMENT_ENTRY_TYPES = frozenset({STABLE, ON_DEMAND})

STATUS_APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
STATUS_DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
AVAILABILITY_STATUSES = frozenset({STATUS_APPROVED, STATUS_DEPRECATED})

# DocumentEntry classification schemes
AUTHOR_SCHEME = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
CLASS_CODE_SCHEME = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
CONFIDENTIALITY_CODE_SCHEME = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
EVENT_CODE_SCHEME = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
FORMAT_CODE_SCHEME = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
HEALTHCARE_FACILITY_TYPE_CODE_SCHEME = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
PRACTICE_SETTING_CODE_SCHEME = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
TYPE_CODE_SCHEME = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
# DocumentEntry external identifiers
PATIENT_ID_SCHEME = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
UNIQUE_ID_SCHEME = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
PATIENT_ID_NAME = "XDSDocumentEntry.patientId"
UNIQUE_ID_NAME = "XDSDocumentEntry.uniqueId"

OBJECT_TYPE_CLASSIFICATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
OBJECT_TYPE_EXTERNAL_IDENTIFIER = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"

#: Slot holding DocumentEntry.referenceIdList (CXi values) [ITI TF-3 §4.2.3.2.28].
REFERENCE_ID_LIST_SLOT = "urn:ihe:iti:xds:2013:referenceIdList"
#: CXi identifier type codes (CX.5) [ITI TF-3 Table 4.2.3.2.28-1; IPF ReferenceId.java].
REFERENCE_ID_ACCESSION = "urn:ihe:iti:xds:2013:accession"
REFERENCE_ID_ORDER = "urn:ihe:iti:xds:2013:order"
REFERENCE_ID_REFERRAL = "urn:ihe:iti:xds:2013:referral"
REFERENCE_ID_UNIQUE_ID = "urn:ihe:iti:xds:2013:uniqueId"
REFERENCE_ID_STUDY_INSTANCE_UID = "urn:ihe:iti:xds:2016:studyInstanceUID"

MIME_DICOM = "application/dicom"
#: Coding schemes used by imaging metadata (RAD TF-3 §4.68.4.1.2.3.2; digest §5.1).
DICOM_UID_REGISTRY_OID = "1.2.840.10008.2.6.1"
DCM_OID = "1.2.840.10008.2.16.4"
LOINC_OID = "2.16.840.1.113883.6.1"
SNOMED_CT_OID = "2.16.840.1.113883.6.96"
CONFIDENTIALITY_OID = "2.16.840.1.113883.5.25"
KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"

#: SHA-1 of zero bytes: the Delayed Document Assembly hash [ITI TF-2 3.38.4.1.3].
EMPTY_SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"

_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_RIM_NSMAP = {"rim": ns.RIM}


def _rim(local: str) -> str:
    return ns.q(ns.RIM, local)


# --------------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------------

class MetadataError(ValueError):
    """DocumentEntry metadata that cannot be read (a required attribute missing, a malformed value)."""


@dataclass(frozen=True)
class Code:
    """A coded value: code, coding scheme (an OID or a scheme name) and display name."""

    code: str
    scheme: str
    display: str = ""

    def same_concept(self, other: Code) -> bool:
        """Codes are matched on code and coding scheme; the display name is irrelevant [ITI TF-2 3.18.4.1.2.3.4]."""
        return self.code == other.code and self.scheme == other.scheme

    @property
    def query_form(self) -> str:
        """The stored-query form ``code^^scheme``."""
        return f"{self.code}^^{self.scheme}"


#: The formatCode of a DICOM KOS manifest [RAD TF-3 §4.68.4.1.2.3.2 (RAD68-022)].
KOS_FORMAT_CODE = Code(KOS_SOP_CLASS_UID, DICOM_UID_REGISTRY_OID, "Key Object Selection Document")


@dataclass(frozen=True)
class CX:
    """An HL7 v2.5 CX identifier as XDS uses it: ``id^^^&<universal id>&<universal id type>``."""

    id: str
    assigning_authority: str = ""
    assigning_authority_type: str = "ISO"

    def __str__(self) -> str:
        return format_cx(self.id, self.assigning_authority, self.assigning_authority_type)

    def same_patient(self, other: CX) -> bool:
        return self.id == other.id and self.assigning_authority == other.assigning_authority


@dataclass(frozen=True)
class ReferenceId:
    """A CXi value of referenceIdList: id, assigning authority (optional) and identifier type (CX.5)."""

    id: str
    type_code: str
    assigning_authority: str = ""

    def __str__(self) -> str:
        return format_reference_id(self.id, self.type_code, self.assigning_authority)


@dataclass(frozen=True)
class Author:
    """XDSDocumentEntry.author: authorPerson (XCN), authorInstitution (XON) and friends, as strings."""

    person: str = ""
    institutions: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    specialties: tuple[str, ...] = ()
    telecommunications: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourcePatientInfo:
    """XDSDocumentEntry.sourcePatientInfo: the PID segment fields XDS uses, as HL7 v2 strings.

    ``identifiers`` are the PID-3 values (CX), ``name`` PID-5 (XPN), ``birth_date`` PID-7,
    ``sex`` PID-8. Any other ``PID-n|...`` value (e.g. PID-11 address) is kept verbatim in ``other``.
    """

    identifiers: tuple[str, ...] = ()
    name: str = ""
    birth_date: str = ""
    sex: str = ""
    other: tuple[str, ...] = ()

    @classmethod
    def from_patient_record(cls, patient: PatientRecord, *, assigning_authority: str | None = None,
                            ) -> SourcePatientInfo:
        """PID-3/5/7/8 from the DICOM patient module (RAD TF-3 §4.68.4.1.2.3.2, RAD68-033)."""
        authority = assigning_authority or patient.IssuerOfPatientID or ""
        return cls(
            identifiers=(format_cx(patient.PatientID, authority),) if patient.PatientID else (),
            name=patient.PatientName,
            birth_date=patient.PatientBirthDate,
            sex=patient.PatientSex,
        )

    def values(self) -> list[str]:
        out = [f"PID-3|{v}" for v in self.identifiers]
        if self.name:
            out.append(f"PID-5|{self.name}")
        if self.birth_date:
            out.append(f"PID-7|{self.birth_date}")
        if self.sex:
            out.append(f"PID-8|{self.sex}")
        out.extend(self.other)
        return out

    @classmethod
    def from_values(cls, values: Iterable[str]) -> SourcePatientInfo:
        ids: list[str] = []
        other: list[str] = []
        fields: dict[str, str] = {}
        for raw in values:
            head, sep, value = raw.partition("|")
            key = head.strip().upper()
            if sep and key == "PID-3":
                ids.append(value)
            elif sep and key in ("PID-5", "PID-7", "PID-8") and key not in fields:
                fields[key] = value
            else:
                other.append(raw)
        return cls(tuple(ids), fields.get("PID-5", ""), fields.get("PID-7", ""), fields.get("PID-8", ""),
                   tuple(other))


@dataclass(frozen=True, kw_only=True)
class DocumentEntry:
    """XDSDocumentEntry [ITI TF-3 §4.2.3.2]; names follow the metadata attribute names.

    Times are DTM strings (UTC). ``size`` and ``hash`` apply to Stable entries only: they are not
    written for On-Demand entries [ITI TF-3 Table 4.2.3.2-1 note], but are kept when a peer sends them.
    """

    entry_uuid: str
    unique_id: str
    patient_id: str
    mime_type: str
    object_type: str = STABLE
    availability_status: str = STATUS_APPROVED
    home_community_id: str | None = None
    repository_unique_id: str | None = None
    source_patient_id: str | None = None
    source_patient_info: SourcePatientInfo | None = None
    class_code: Code | None = None
    type_code: Code | None = None
    format_code: Code | None = None
    practice_setting_code: Code | None = None
    healthcare_facility_type_code: Code | None = None
    confidentiality_codes: tuple[Code, ...] = ()
    event_codes: tuple[Code, ...] = ()
    creation_time: str | None = None
    service_start_time: str | None = None
    service_stop_time: str | None = None
    language_code: str | None = None
    reference_ids: tuple[str, ...] = ()
    title: str | None = None
    comments: str | None = None
    authors: tuple[Author, ...] = ()
    size: int | None = None
    hash: str | None = None
    #: slots this model has no field for, ``(name, values)``, kept for round trips (e.g. ``URI``)
    other_slots: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    @property
    def is_on_demand(self) -> bool:
        return self.object_type == ON_DEMAND

    @property
    def patient_cx(self) -> CX:
        return parse_cx(self.patient_id)


# --------------------------------------------------------------------------------------------------
# Identifier helpers
# --------------------------------------------------------------------------------------------------

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def is_oid(value: str) -> bool:
    return bool(_OID.match(value))


def normalize_hcid(value: str) -> str:
    """A homeCommunityId in its URI form ``urn:oid:1.2.3`` [ITI TF-2 3.18.4.1.2.3.8].

    Accepts the bare OID (``AdhocQuery/@home`` without the prefix is seen in the wild) and any case
    of the ``urn:oid:`` prefix; surrounding whitespace is removed. Non-OID URIs are returned trimmed.
    """
    v = value.strip()
    if v[:8].lower() == "urn:oid:":
        return "urn:oid:" + v[8:].strip()
    if is_oid(v):
        return "urn:oid:" + v
    return v


def hcid_oid(value: str) -> str:
    """The bare OID of a homeCommunityId (``urn:oid:1.2.3`` → ``1.2.3``)."""
    v = normalize_hcid(value)
    return v[8:] if v.startswith("urn:oid:") else v


def same_hcid(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalize_hcid(a) == normalize_hcid(b)


def format_cx(id_: str, assigning_authority: str, authority_type: str = "ISO") -> str:
    """``id^^^&<oid>&ISO`` [ITI TF-3 §4.2.3.1.7]; without an authority just ``id``."""
    if not assigning_authority:
        return id_
    return f"{id_}^^^&{assigning_authority}&{authority_type}"


def parse_cx(value: str) -> CX:
    """Parse a CX value; the assigning authority is CX.4.2 (universal id), else CX.4.1 (namespace).

    Raises :class:`MetadataError` when there is no id.
    """
    comps = value.strip().split("^")
    id_ = comps[0].strip()
    if not id_:
        raise MetadataError(f"CX value {value!r} has no identifier")
    authority, authority_type = "", "ISO"
    if len(comps) > 3 and comps[3]:
        subs = comps[3].split("&")
        universal = subs[1].strip() if len(subs) > 1 else ""
        authority = universal or subs[0].strip()
        if len(subs) > 2 and subs[2].strip():
            authority_type = subs[2].strip()
    return CX(id_, authority, authority_type)


def format_reference_id(id_: str, type_code: str, assigning_authority: str = "") -> str:
    """A CXi value: ``id^^^&<oid>&ISO^<type>`` or, without an authority, ``id^^^^<type>``."""
    hd = f"&{assigning_authority}&ISO" if assigning_authority else ""
    return f"{id_}^^^{hd}^{type_code}"


def parse_reference_id(value: str) -> ReferenceId:
    comps = value.strip().split("^")
    if not comps[0]:
        raise MetadataError(f"CXi value {value!r} has no identifier")
    authority = ""
    if len(comps) > 3 and comps[3]:
        subs = comps[3].split("&")
        authority = (subs[1] if len(subs) > 1 and subs[1] else subs[0]).strip()
    type_code = comps[4].strip() if len(comps) > 4 else ""
    return ReferenceId(comps[0].strip(), type_code, authority)


def accession_reference_id(accession_number: str, issuer_oid: str = "") -> str:
    """referenceIdList value of an accession number (issuer: Issuer of Accession Number OID)."""
    return format_reference_id(accession_number, REFERENCE_ID_ACCESSION, issuer_oid)


def study_reference_id(study_instance_uid: str) -> str:
    """referenceIdList value of a Study Instance UID (``uid^^^^urn:ihe:iti:xds:2016:studyInstanceUID``)."""
    return format_reference_id(study_instance_uid, REFERENCE_ID_STUDY_INSTANCE_UID)


def study_reference_ids(study: StudyInfo) -> tuple[str, ...]:
    """referenceIdList of a per-study KOS: the Study Instance UID, and the accession number if any."""
    ids = [study_reference_id(study.StudyInstanceUID)]
    if study.AccessionNumber:
        ids.append(accession_reference_id(study.AccessionNumber, study.AccessionNumberIssuer or ""))
    return tuple(ids)


def entry_uuid_for(unique_id: str, namespace: uuid.UUID = uuid.NAMESPACE_OID) -> str:
    """A stable entryUUID derived from a uniqueId, so repeated queries return the same entryUUID."""
    return f"urn:uuid:{uuid.uuid5(namespace, unique_id)}"


# --------------------------------------------------------------------------------------------------
# DTM (HL7 v2 date/time, UTC) [ITI TF-3 §4.2.3.1.4]
# --------------------------------------------------------------------------------------------------

_DTM = re.compile(r"^\d{4}(\d{2}){0,5}$")
_ISO = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$"
)
_DTM_TZ = re.compile(r"^(\d{4,14})(?:\.\d+)?([+-]\d{4})$")


def normalize_dtm(value: str) -> str:
    """A DTM string ``YYYY[MM[DD[hh[mm[ss]]]]]`` in UTC from what peers send.

    Accepts DTM (4 to 14 digits, precision kept), DTM with fractional seconds (dropped), DTM with a
    ``+hhmm`` offset (converted to UTC, needs at least minutes precision) and ISO 8601 date-times
    (``2024-03-27T21:43:04.878Z``, as in Metriport's creationTime). Raises :class:`MetadataError`.
    """
    v = value.strip()
    if _DTM.match(v):
        return v
    m = _DTM_TZ.match(v)
    if m:
        digits, offset = m.group(1), m.group(2)
        if len(digits) < 12 or len(digits) % 2:
            raise MetadataError(f"date-time {value!r}: an offset needs hour and minute precision")
        return _to_utc_dtm(digits, offset)
    if re.match(r"^\d{4}(\d{2}){0,5}\.\d+$", v):
        return v.split(".", 1)[0]
    m = _ISO.match(v)
    if m:
        y, mo, d, hh, mm, ss, tz = m.groups()
        digits = y + mo + d + (hh or "") + (mm or "") + (ss or "")
        if tz and hh:
            return _to_utc_dtm(digits, tz.replace(":", "") if tz != "Z" else "+0000")
        return digits
    raise MetadataError(f"malformed date-time {value!r} (expected YYYY[MM[DD[hh[mm[ss]]]]])")


def _to_utc_dtm(digits: str, offset: str) -> str:
    padded = (digits + "00")[:14] if len(digits) == 12 else digits
    try:
        local = datetime.strptime(padded, "%Y%m%d%H%M%S")
    except ValueError:
        raise MetadataError(f"invalid date-time {digits}{offset}") from None
    sign = 1 if offset[0] == "+" else -1
    delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
    utc = (local - sign * delta).strftime("%Y%m%d%H%M%S")
    return utc[: len(digits)]


def dtm_from_datetime(dt: datetime) -> str:
    """DTM with seconds precision in UTC; a naive datetime is taken to be UTC already."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return dt.strftime("%Y%m%d%H%M%S")


def dtm_from_dicom(da: str, tm: str = "", offset: str | None = None) -> str:
    """DTM from DICOM DA (``YYYYMMDD``) + TM (``HH[MM[SS[.F]]]``, also legacy ``HH:MM:SS``).

    DICOM dates and times are local time; pass ``offset`` (Timezone Offset From UTC (0008,0201),
    ``+hhmm``/``-hhmm``) to convert to UTC as XDS requires. Without an offset the local time is used
    as is (the precision is what the PACS gave). An empty/invalid DA gives ``""``.
    """
    d = da.strip().replace("-", "").replace(".", "")
    if not re.match(r"^\d{8}$", d):
        return ""
    t = tm.strip().replace(":", "").split(".", 1)[0]
    if not re.match(r"^\d{2}(\d{2}){0,2}$", t):
        t = ""
    value = d + t
    if offset and t and re.match(r"^[+-]\d{4}$", offset.strip()):
        digits = value if len(value) >= 12 else value + "00"
        return _to_utc_dtm(digits, offset.strip())
    return value


def dtm_key(value: str) -> str:
    """A DTM padded to 14 digits for ordering comparisons of values with different precision."""
    return (normalize_dtm(value) + "0" * 14)[:14]


# --------------------------------------------------------------------------------------------------
# XML building
# --------------------------------------------------------------------------------------------------

def slot(parent: etree._Element, name: str, values: Iterable[str]) -> etree._Element:
    """Append ``<rim:Slot name=...><rim:ValueList><rim:Value>...`` to ``parent``."""
    s = etree.SubElement(parent, _rim("Slot"), name=name)
    vl = etree.SubElement(s, _rim("ValueList"))
    for v in values:
        etree.SubElement(vl, _rim("Value")).text = v
    return s


def localized(parent: etree._Element, local: str, value: str) -> etree._Element:
    """``<rim:Name>``/``<rim:Description>`` with one LocalizedString."""
    el = etree.SubElement(parent, _rim(local))
    ls = etree.SubElement(el, _rim("LocalizedString"))
    ls.set(_XML_LANG, "en-US")
    ls.set("charset", "UTF-8")
    ls.set("value", value)
    return el


def _child_id(entry_uuid: str, *parts: object) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, '/'.join([entry_uuid, *map(str, parts)]))}"


def _classification(parent: etree._Element, entry_uuid: str, scheme: str, index: int,
                    node: str) -> etree._Element:
    el = etree.SubElement(parent, _rim("Classification"))
    el.set("id", _child_id(entry_uuid, scheme, index))
    el.set("objectType", OBJECT_TYPE_CLASSIFICATION)
    el.set("classificationScheme", scheme)
    el.set("classifiedObject", entry_uuid)
    el.set("nodeRepresentation", node)
    return el


def _code_classification(parent: etree._Element, entry_uuid: str, scheme: str, index: int,
                         code: Code) -> None:
    el = _classification(parent, entry_uuid, scheme, index, code.code)
    slot(el, "codingScheme", [code.scheme])
    if code.display:
        localized(el, "Name", code.display)


def _external_identifier(parent: etree._Element, entry_uuid: str, scheme: str, value: str, name: str) -> None:
    el = etree.SubElement(parent, _rim("ExternalIdentifier"))
    el.set("id", _child_id(entry_uuid, scheme))
    el.set("objectType", OBJECT_TYPE_EXTERNAL_IDENTIFIER)
    el.set("identificationScheme", scheme)
    el.set("registryObject", entry_uuid)
    el.set("value", value)
    localized(el, "Name", name)


def build_extrinsic_object(entry: DocumentEntry, *, home_community_id: str | None = None) -> etree._Element:
    """``rim:ExtrinsicObject`` for ``entry``.

    ``home`` is ``entry.home_community_id`` or, failing that, ``home_community_id`` (a Responding
    Gateway must put its homeCommunityId on every ExtrinsicObject, ITI TF-2 3.38.4.1.3). Child ids
    (Classification, ExternalIdentifier) are UUIDv5 of the entryUUID, so the same entry always
    serialises to the same XML.
    """
    eo = etree.Element(_rim("ExtrinsicObject"), nsmap=_RIM_NSMAP)
    eo.set("id", entry.entry_uuid)
    home = entry.home_community_id or home_community_id
    if home:
        eo.set("home", normalize_hcid(home))
    eo.set("objectType", entry.object_type)
    eo.set("status", entry.availability_status)
    eo.set("mimeType", entry.mime_type)

    if entry.creation_time:
        slot(eo, "creationTime", [entry.creation_time])
    if entry.hash is not None and not entry.is_on_demand:
        slot(eo, "hash", [entry.hash])
    if entry.language_code:
        slot(eo, "languageCode", [entry.language_code])
    if entry.repository_unique_id:
        slot(eo, "repositoryUniqueId", [entry.repository_unique_id])
    if entry.service_start_time:
        slot(eo, "serviceStartTime", [entry.service_start_time])
    if entry.service_stop_time:
        slot(eo, "serviceStopTime", [entry.service_stop_time])
    if entry.size is not None and not entry.is_on_demand:
        slot(eo, "size", [str(entry.size)])
    if entry.source_patient_id:
        slot(eo, "sourcePatientId", [entry.source_patient_id])
    if entry.source_patient_info is not None:
        values = entry.source_patient_info.values()
        if values:
            slot(eo, "sourcePatientInfo", values)
    if entry.reference_ids:
        slot(eo, REFERENCE_ID_LIST_SLOT, entry.reference_ids)
    for name, other_values in entry.other_slots:
        slot(eo, name, other_values)
    if entry.title is not None:
        localized(eo, "Name", entry.title)
    if entry.comments is not None:
        localized(eo, "Description", entry.comments)

    uid = entry.entry_uuid
    for i, author in enumerate(entry.authors):
        el = _classification(eo, uid, AUTHOR_SCHEME, i, "")
        if author.person:
            slot(el, "authorPerson", [author.person])
        for slot_name, vals in (("authorInstitution", author.institutions), ("authorRole", author.roles),
                                ("authorSpecialty", author.specialties),
                                ("authorTelecommunication", author.telecommunications)):
            if vals:
                slot(el, slot_name, vals)
    single: Sequence[tuple[str, Code | None]] = (
        (CLASS_CODE_SCHEME, entry.class_code),
        (FORMAT_CODE_SCHEME, entry.format_code),
        (HEALTHCARE_FACILITY_TYPE_CODE_SCHEME, entry.healthcare_facility_type_code),
        (PRACTICE_SETTING_CODE_SCHEME, entry.practice_setting_code),
        (TYPE_CODE_SCHEME, entry.type_code),
    )
    for scheme, code in single:
        if code is not None:
            _code_classification(eo, uid, scheme, 0, code)
    for i, code in enumerate(entry.confidentiality_codes):
        _code_classification(eo, uid, CONFIDENTIALITY_CODE_SCHEME, i, code)
    for i, code in enumerate(entry.event_codes):
        _code_classification(eo, uid, EVENT_CODE_SCHEME, i, code)

    _external_identifier(eo, uid, PATIENT_ID_SCHEME, entry.patient_id, PATIENT_ID_NAME)
    _external_identifier(eo, uid, UNIQUE_ID_SCHEME, entry.unique_id, UNIQUE_ID_NAME)
    return eo


# --------------------------------------------------------------------------------------------------
# XML parsing
# --------------------------------------------------------------------------------------------------

def _children(el: etree._Element, local: str) -> list[etree._Element]:
    """Child elements by local name (rim namespace or none: peers differ in prefix handling, not in names)."""
    return [c for c in el if isinstance(c.tag, str) and ns.local(c) == local]


def slot_values(el: etree._Element) -> dict[str, list[str]]:
    """``{slot name: values}`` of the direct ``rim:Slot`` children (values stripped, empties dropped)."""
    out: dict[str, list[str]] = {}
    for s in _children(el, "Slot"):
        name = (s.get("name") or "").strip()
        values = [(v.text or "").strip() for vl in _children(s, "ValueList") for v in _children(vl, "Value")]
        out.setdefault(name, []).extend(v for v in values if v)
    return out


def localized_value(el: etree._Element, local: str) -> str | None:
    """The first LocalizedString value of the ``Name``/``Description`` child, None if absent/empty."""
    for container in _children(el, local):
        for ls in _children(container, "LocalizedString"):
            value = ls.get("value")
            if value is not None:
                return str(value)
    return None


def _code_from(cl: etree._Element, what: str) -> Code:
    code = (cl.get("nodeRepresentation") or "").strip()
    schemes = slot_values(cl).get("codingScheme", [])
    if not code:
        raise MetadataError(f"{what} classification without nodeRepresentation")
    if not schemes:
        raise MetadataError(f"{what} code {code!r} without codingScheme slot")
    return Code(code, schemes[0], localized_value(cl, "Name") or "")


def _one(values: list[str] | None) -> str | None:
    return values[0] if values else None


_KNOWN_SLOTS = frozenset({
    "creationTime", "hash", "languageCode", "repositoryUniqueId", "serviceStartTime", "serviceStopTime", "size",
    "sourcePatientId", "sourcePatientInfo", REFERENCE_ID_LIST_SLOT,
})
_SINGLE_CODE_FIELDS = {
    CLASS_CODE_SCHEME: "class_code",
    FORMAT_CODE_SCHEME: "format_code",
    HEALTHCARE_FACILITY_TYPE_CODE_SCHEME: "healthcare_facility_type_code",
    PRACTICE_SETTING_CODE_SCHEME: "practice_setting_code",
    TYPE_CODE_SCHEME: "type_code",
}


def parse_extrinsic_object(el: etree._Element) -> DocumentEntry:
    """Read a DocumentEntry from a ``rim:ExtrinsicObject`` (query response or submission metadata).

    Raises :class:`MetadataError` if the uniqueId or patientId external identifier is missing or a
    coded classification has no code/scheme. ``status`` defaults to Approved (submission metadata
    carries none), ``mimeType`` to the ebRIM default ``application/octet-stream``.
    """
    entry_uuid = (el.get("id") or "").strip()
    if not entry_uuid:
        raise MetadataError("ExtrinsicObject without id")
    slots = slot_values(el)

    ext: dict[str, str] = {}
    for ei in _children(el, "ExternalIdentifier"):
        scheme = (ei.get("identificationScheme") or "").strip()
        value = ei.get("value")
        if scheme and value is not None and scheme not in ext:
            ext[scheme] = value.strip()
    if UNIQUE_ID_SCHEME not in ext:
        raise MetadataError(f"ExtrinsicObject {entry_uuid}: no XDSDocumentEntry.uniqueId external identifier")
    if PATIENT_ID_SCHEME not in ext:
        raise MetadataError(f"ExtrinsicObject {entry_uuid}: no XDSDocumentEntry.patientId external identifier")

    codes: dict[str, Code] = {}
    confidentiality: list[Code] = []
    events: list[Code] = []
    authors: list[Author] = []
    for cl in _children(el, "Classification"):
        scheme = (cl.get("classificationScheme") or "").strip()
        if scheme == AUTHOR_SCHEME:
            a = slot_values(cl)
            authors.append(Author(
                person=_one(a.get("authorPerson")) or "",
                institutions=tuple(a.get("authorInstitution", [])),
                roles=tuple(a.get("authorRole", [])),
                specialties=tuple(a.get("authorSpecialty", [])),
                telecommunications=tuple(a.get("authorTelecommunication", [])),
            ))
        elif scheme in _SINGLE_CODE_FIELDS:
            codes.setdefault(scheme, _code_from(cl, _SINGLE_CODE_FIELDS[scheme]))
        elif scheme == CONFIDENTIALITY_CODE_SCHEME:
            confidentiality.append(_code_from(cl, "confidentialityCode"))
        elif scheme == EVENT_CODE_SCHEME:
            events.append(_code_from(cl, "eventCodeList"))

    size_text = _one(slots.get("size"))
    try:
        size = int(size_text) if size_text is not None else None
    except ValueError:
        raise MetadataError(f"ExtrinsicObject {entry_uuid}: size {size_text!r} is not a number") from None
    spi = slots.get("sourcePatientInfo")
    home = el.get("home")
    return DocumentEntry(
        entry_uuid=entry_uuid,
        unique_id=ext[UNIQUE_ID_SCHEME],
        patient_id=ext[PATIENT_ID_SCHEME],
        mime_type=(el.get("mimeType") or "application/octet-stream").strip(),
        object_type=(el.get("objectType") or STABLE).strip(),
        availability_status=(el.get("status") or STATUS_APPROVED).strip(),
        home_community_id=home.strip() if home and home.strip() else None,
        repository_unique_id=_one(slots.get("repositoryUniqueId")),
        source_patient_id=_one(slots.get("sourcePatientId")),
        source_patient_info=SourcePatientInfo.from_values(spi) if spi else None,
        class_code=codes.get(CLASS_CODE_SCHEME),
        type_code=codes.get(TYPE_CODE_SCHEME),
        format_code=codes.get(FORMAT_CODE_SCHEME),
        practice_setting_code=codes.get(PRACTICE_SETTING_CODE_SCHEME),
        healthcare_facility_type_code=codes.get(HEALTHCARE_FACILITY_TYPE_CODE_SCHEME),
        confidentiality_codes=tuple(confidentiality),
        event_codes=tuple(events),
        creation_time=_one(slots.get("creationTime")),
        service_start_time=_one(slots.get("serviceStartTime")),
        service_stop_time=_one(slots.get("serviceStopTime")),
        language_code=_one(slots.get("languageCode")),
        reference_ids=tuple(slots.get(REFERENCE_ID_LIST_SLOT, [])),
        title=localized_value(el, "Name"),
        comments=localized_value(el, "Description"),
        authors=tuple(authors),
        size=size,
        hash=_one(slots.get("hash")),
        other_slots=tuple((name, tuple(values)) for name, values in slots.items()
                          if name not in _KNOWN_SLOTS and values),
    )


def find_extrinsic_objects(root: etree._Element) -> list[etree._Element]:
    """Every ``rim:ExtrinsicObject`` under ``root`` (a RegistryObjectList, response or submission)."""
    return list(root.iter(_rim("ExtrinsicObject")))


__all__ = [
    "AUTHOR_SCHEME", "AVAILABILITY_STATUSES", "CLASS_CODE_SCHEME", "CONFIDENTIALITY_CODE_SCHEME",
    "CONFIDENTIALITY_OID", "CX", "DCM_OID", "DICOM_UID_REGISTRY_OID", "DOCUMENT_ENTRY_TYPES", "EMPTY_SHA1",
    "EVENT_CODE_SCHEME", "FORMAT_CODE_SCHEME", "HEALTHCARE_FACILITY_TYPE_CODE_SCHEME", "KOS_FORMAT_CODE",
    "KOS_SOP_CLASS_UID", "LOINC_OID", "MIME_DICOM", "ON_DEMAND", "PATIENT_ID_SCHEME", "PRACTICE_SETTING_CODE_SCHEME",
    "REFERENCE_ID_ACCESSION", "REFERENCE_ID_LIST_SLOT", "REFERENCE_ID_ORDER", "REFERENCE_ID_REFERRAL",
    "REFERENCE_ID_STUDY_INSTANCE_UID", "REFERENCE_ID_UNIQUE_ID", "SNOMED_CT_OID", "STABLE", "STATUS_APPROVED",
    "STATUS_DEPRECATED", "TYPE_CODE_SCHEME", "UNIQUE_ID_SCHEME", "Author", "Code", "DocumentEntry",
    "MetadataError", "ReferenceId", "SourcePatientInfo", "accession_reference_id", "build_extrinsic_object",
    "dtm_from_datetime", "dtm_from_dicom", "dtm_key", "entry_uuid_for", "find_extrinsic_objects", "format_cx",
    "format_reference_id", "hcid_oid", "is_oid", "localized", "localized_value", "normalize_dtm",
    "normalize_hcid", "parse_cx", "parse_extrinsic_object", "parse_reference_id", "same_hcid", "slot",
    "slot_values", "study_reference_id", "study_reference_ids",
]
