"""ITI-38 answers: the query response (family ``iti38``) and the KOS DocumentEntry metadata of RAD TF-3 4.68
(family ``metadata``), one check per rule over all returned entries."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from conformance import spec
from conformance.checks.common import check, listing
from conformance.model import Check
from gateway.ihe import ebrim, iti38
from gateway.ihe.ebrim import CX, DocumentEntry, MetadataError
from gateway.ihe.registry import FAILURE, PARTIAL_SUCCESS, SUCCESS

Rule = tuple[str, str, str, Callable[[DocumentEntry], str | None]]


def _coded(code: ebrim.Code | None, what: str) -> str | None:
    if code is None:
        return f"no {what}"
    if not code.code or not code.scheme:
        return f"{what} without code or codingScheme"
    return None


def _oid(value: str | None, what: str, *, urn: bool = False) -> str | None:
    if not value:
        return f"no {what}"
    bare = value.removeprefix("urn:oid:") if urn else value
    if urn and not value.startswith("urn:oid:"):
        return f"{what} {value!r} is not in urn:oid: form"
    if not ebrim.is_oid(bare) or len(bare) > 64:
        return f"{what} {value!r} is not an OID of at most 64 characters"
    return None


def _format(e: DocumentEntry) -> str | None:
    if e.format_code is None:
        return "no formatCode"
    if not e.format_code.same_concept(ebrim.KOS_FORMAT_CODE):
        return (f"formatCode {e.format_code.code}^^{e.format_code.scheme}, expected "
                f"{ebrim.KOS_FORMAT_CODE.code}^^{ebrim.KOS_FORMAT_CODE.scheme}")
    return None


def _events(e: DocumentEntry) -> str | None:
    if not e.event_codes:
        return "no eventCodeList"
    if not any(c.scheme == ebrim.DCM_OID for c in e.event_codes):
        schemes = ", ".join(sorted({c.scheme for c in e.event_codes}))
        return f"no acquisition modality (DCM {ebrim.DCM_OID}) in eventCodeList (schemes: {schemes})"
    return None


def _source_patient(e: DocumentEntry) -> str | None:
    if not e.source_patient_id:
        return "no sourcePatientId"
    info = e.source_patient_info
    if info is None or not info.name or not info.birth_date:
        return "sourcePatientInfo lacks PID-5 (name) or PID-7 (birth date)"
    return None


def _stable(e: DocumentEntry) -> str | None:
    if e.is_on_demand:
        return None
    missing = [n for n, v in (("size", e.size), ("hash", e.hash), ("creationTime", e.creation_time)) if v is None]
    return f"Stable entry without {', '.join(missing)}" if missing else None


RULES: Sequence[Rule] = (
    ("metadata.mime-type", "mimeType is application/dicom", spec.KOS_METADATA,
     lambda e: None if e.mime_type == ebrim.MIME_DICOM else f"mimeType {e.mime_type!r}"),
    ("metadata.format-code", f"formatCode is {ebrim.KOS_FORMAT_CODE.code} ({ebrim.DICOM_UID_REGISTRY_OID})",
     f"{spec.KOS_METADATA}; {spec.CQ_METADATA}", _format),
    ("metadata.type-code", "typeCode is present", f"{spec.KOS_METADATA}; {spec.CQ_METADATA}",
     lambda e: _coded(e.type_code, "typeCode")),
    ("metadata.class-code", "classCode is present", f"{spec.DOCUMENT_ENTRY}; {spec.CQ_METADATA}",
     lambda e: _coded(e.class_code, "classCode")),
    ("metadata.event-codes", "eventCodeList names the acquisition modalities (DCM, CID 29)",
     f"{spec.KOS_METADATA}; {spec.CQ_METADATA}", _events),
    ("metadata.confidentiality-code", "confidentialityCode is present", spec.DOCUMENT_ENTRY,
     lambda e: None if e.confidentiality_codes else "no confidentialityCode"),
    ("metadata.facility-type-code", "healthcareFacilityTypeCode is present", spec.DOCUMENT_ENTRY,
     lambda e: _coded(e.healthcare_facility_type_code, "healthcareFacilityTypeCode")),
    ("metadata.practice-setting-code", "practiceSettingCode is present", spec.DOCUMENT_ENTRY,
     lambda e: _coded(e.practice_setting_code, "practiceSettingCode")),
    ("metadata.language-code", "languageCode is present", spec.DOCUMENT_ENTRY,
     lambda e: None if e.language_code else "no languageCode"),
    ("metadata.source-patient", "sourcePatientId and sourcePatientInfo (PID-5, PID-7) describe the patient",
     spec.KOS_METADATA, _source_patient),
    ("metadata.unique-id", "uniqueId is an OID of at most 64 characters", spec.DOCUMENT_ENTRY,
     lambda e: _oid(e.unique_id, "uniqueId")),
    ("metadata.repository", "repositoryUniqueId is present (needed to retrieve it)", spec.DOCUMENT_ENTRY,
     lambda e: _oid(e.repository_unique_id, "repositoryUniqueId")),
    ("metadata.home", "the entry names its homeCommunityId (home)", spec.XCA_HOME,
     lambda e: _oid(e.home_community_id, "home", urn=True)),
    ("metadata.stable-attributes", "Stable entries carry size, hash and creationTime", spec.DOCUMENT_ENTRY,
     _stable),
)


def entry_checks(entries: Sequence[DocumentEntry], *, patient_id: CX | None = None,
                 entry_types: Sequence[str] = (ebrim.STABLE, ebrim.ON_DEMAND)) -> list[Check]:
    """Every rule of :data:`RULES` over ``entries`` plus what the query asked for (patient, status, type)."""
    rules: list[Rule] = list(RULES)
    if patient_id is not None:
        rules.append(("metadata.patient-id", "entries belong to the queried patient", spec.FIND_DOCUMENTS,
                      lambda e: None if _same_patient(e, patient_id) else f"patientId {e.patient_id}"))
    rules.append(("metadata.status", "entries are Approved (as queried)", spec.FIND_DOCUMENTS,
                  lambda e: None if e.availability_status == ebrim.STATUS_APPROVED else f"status "
                                                                                          f"{e.availability_status}"))
    rules.append(("metadata.entry-type", "objectType is Stable or On-Demand, as queried", spec.ENTRY_TYPE,
                  lambda e: None if e.object_type in entry_types else f"objectType {e.object_type}"))
    out: list[Check] = []
    for check_id, title, clause, rule in rules:
        bad = [f"{e.unique_id}: {why}" for e in entries if (why := rule(e)) is not None]
        out.append(check(check_id, "metadata", title, clause, not bad,
                         listing(bad) if bad else f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"))
    return out


def _same_patient(entry: DocumentEntry, patient_id: CX) -> bool:
    try:
        return entry.patient_cx.same_patient(patient_id)
    except (MetadataError, ValueError):
        return False


def query_checks(result: iti38.QueryResult, return_type: iti38.ReturnType, *, expect_entries: bool = True,
                 ) -> list[Check]:
    """The AdhocQueryResponse as a whole: status, errors, return type, ``home`` on every object."""
    out: list[Check] = []
    errors = [e for e in result.errors if e.is_error]
    ok = result.status == SUCCESS and not errors
    detail = "" if ok else f"status {result.status or 'missing'}" + (
        f"; {listing([f'{e.code}: {e.context}' for e in errors])}" if errors else "")
    out.append(check("iti38.status", "iti38", "the query succeeds (status Success, no RegistryError)", spec.STATUS,
                     ok, detail))
    if result.status not in (SUCCESS, PARTIAL_SUCCESS, FAILURE):
        out.append(check("iti38.status-value", "iti38", "status is one of the ebXML/IHE status URNs", spec.STATUS,
                         False, f"status {result.status!r}"))
    out.append(check("iti38.readable", "iti38", "every returned ExtrinsicObject is readable DocumentEntry metadata",
                     spec.DOCUMENT_ENTRY, not result.problems, listing(result.problems)))
    if return_type == "LeafClass":
        ok = not result.object_refs
        out.append(check("iti38.return-type", "iti38", "the answer has the requested returnType (LeafClass: "
                         "ExtrinsicObjects; ObjectRef: rim:ObjectRef only)",
                         spec.RETURN_TYPE, ok, "" if ok else f"{len(result.object_refs)} ObjectRef(s) returned"))
        missing = [e.unique_id for e in result.entries if not e.home_community_id]
    else:
        ok = not result.entries
        out.append(check("iti38.return-type", "iti38", "the answer has the requested returnType (LeafClass: "
                         "ExtrinsicObjects; ObjectRef: rim:ObjectRef only)",
                         spec.RETURN_TYPE, ok, "" if ok else f"{len(result.entries)} ExtrinsicObject(s) returned"))
        missing = [r.id for r in result.object_refs if not r.home]
    out.append(check("iti38.home", "iti38", "every returned object carries the home attribute", spec.XCA_HOME,
                     not missing, f"without home: {listing(missing)}" if missing else ""))
    if expect_entries:
        n = len(result.entries) if return_type == "LeafClass" else len(result.object_refs)
        out.append(check("iti38.found", "iti38", "the test patient's imaging manifests are listed",
                         spec.FIND_DOCUMENTS, n > 0, f"{n} returned"))
    return out


__all__ = ["RULES", "entry_checks", "query_checks"]
