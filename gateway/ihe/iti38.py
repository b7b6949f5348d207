"""ITI-38 Cross Gateway Query: AdhocQueryRequest / AdhocQueryResponse (ITI TF-2 3.38, 3.18).

Request side
    :func:`parse_query` reads an ``query:AdhocQueryRequest`` into a :class:`StoredQuery`: the return
    type, the stored-query UUID, the ``home`` attribute (normalised to ``urn:oid:``) and every
    ``rim:Slot`` decoded per ITI TF-2 3.18.4.1.2.3.4-5 (``'quoted'`` strings with ``''`` escapes,
    bare numbers, ``(a,b)`` lists, several ``Value`` elements of one Slot = one list, several Slots
    of the same name = AND of ORs where the metadata attribute is multi-valued). FindDocuments,
    FindDocumentsByReferenceId and GetDocuments are typed (:class:`FindDocumentsParams`,
    :class:`GetDocumentsParams`); the other stored queries are validated for their required
    parameters and kept raw (a Responding Gateway may answer them with zero results,
    ITI TF-2 Table 3.38.4.1.2.3-1). Violations raise :class:`QueryError` carrying the
    ITI TF-3 Table 4.2.4.1-2 code.

    :func:`build_query` is the initiating side's encoder for the typed parameters.

Response side
    :func:`build_response` writes the ``AdhocQueryResponse`` (LeafClass: full ExtrinsicObjects;
    ObjectRef: ``rim:ObjectRef``; ``home`` on each, ITI TF-2 3.38.4.1.3) and :func:`parse_response`
    reads one back, reporting unreadable entries in :attr:`QueryResult.problems` instead of failing.

Filtering
    :func:`filter_entries` applies every FindDocuments parameter to DocumentEntry models. Time
    ranges follow ITI TF-2 3.18.4.1.2.3.3: ``From <= value < To`` (From inclusive, To exclusive),
    values of different precision compared after zero-padding to 14 digits; a missing
    serviceStart/StopTime does not exclude an entry (3.18.4.1.2.3.3.1); creationTime bounds are
    ignored for On-Demand entries (3.18.4.1.2.3.7.1 note 6). Codes match on code + coding scheme;
    eventCodeList, confidentialityCode and referenceIdList have AND-of-OR semantics; authorPerson
    is an SQL LIKE pattern (``%``, ``_``), compared case-sensitively.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from lxml import etree

from gateway.errors import XigError
from gateway.ihe import ebrim
from gateway.ihe.ebrim import CX, Code, DocumentEntry, MetadataError
from gateway.ihe.registry import (
    RegistryError,
    RegistryErrorCode,
    parse_registry_errors,
    parse_status,
    registry_error_list,
    status_from_errors,
)
from gateway.soap import ns

ReturnType = Literal["LeafClass", "ObjectRef"]
RETURN_TYPES: tuple[ReturnType, ...] = ("LeafClass", "ObjectRef")


class StoredQueryId(StrEnum):
    """Stored query UUIDs [ITI TF-2 3.18.4.1.2.4; IPF QueryType.java]."""

    FindDocuments = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
    FindSubmissionSets = "urn:uuid:f26abbcb-ac74-4422-8a30-edb644bbc1a9"
    FindFolders = "urn:uuid:958f3006-baad-4929-a4de-ff1114824431"
    GetAll = "urn:uuid:10b545ea-725c-446d-9b95-8aeb444eddf3"
    GetDocuments = "urn:uuid:5c4f972b-d56b-40ac-a5fc-c8ca9b40b9d4"
    GetFolders = "urn:uuid:5737b14c-8a1a-4539-b659-e03a34a5e1e4"
    GetAssociations = "urn:uuid:a7ae438b-4bc2-4642-93e9-be891f7bb155"
    GetDocumentsAndAssociations = "urn:uuid:bab9529a-4a10-40b3-a01f-f68a615d247a"
    GetSubmissionSets = "urn:uuid:51224314-5390-4169-9b91-b1980040715a"
    GetSubmissionSetAndContents = "urn:uuid:e8e3cb2c-e39c-46b9-99e4-c12f57260b83"
    GetFolderAndContents = "urn:uuid:b909a503-523d-4517-8acf-8e5834dfc4c7"
    GetFoldersForDocument = "urn:uuid:10cae35a-c7f9-4cf5-b61e-fc3278ffb578"
    GetRelatedDocuments = "urn:uuid:d90e5407-b356-4d91-a89f-873917b4b0e6"
    FindDocumentsByReferenceId = "urn:uuid:12941a89-e02e-4be5-967c-ce4bfc8fe492"


# Parameter names [ITI TF-2 3.18.4.1.2.3.7]
P_PATIENT_ID = "$XDSDocumentEntryPatientId"
P_STATUS = "$XDSDocumentEntryStatus"
P_CLASS_CODE = "$XDSDocumentEntryClassCode"
P_TYPE_CODE = "$XDSDocumentEntryTypeCode"
P_PRACTICE_SETTING_CODE = "$XDSDocumentEntryPracticeSettingCode"
P_CREATION_TIME_FROM = "$XDSDocumentEntryCreationTimeFrom"
P_CREATION_TIME_TO = "$XDSDocumentEntryCreationTimeTo"
P_SERVICE_START_TIME_FROM = "$XDSDocumentEntryServiceStartTimeFrom"
P_SERVICE_START_TIME_TO = "$XDSDocumentEntryServiceStartTimeTo"
P_SERVICE_STOP_TIME_FROM = "$XDSDocumentEntryServiceStopTimeFrom"
P_SERVICE_STOP_TIME_TO = "$XDSDocumentEntryServiceStopTimeTo"
P_HEALTHCARE_FACILITY_TYPE_CODE = "$XDSDocumentEntryHealthcareFacilityTypeCode"
P_EVENT_CODE_LIST = "$XDSDocumentEntryEventCodeList"
P_CONFIDENTIALITY_CODE = "$XDSDocumentEntryConfidentialityCode"
P_AUTHOR_PERSON = "$XDSDocumentEntryAuthorPerson"
P_FORMAT_CODE = "$XDSDocumentEntryFormatCode"
P_ENTRY_TYPE = "$XDSDocumentEntryType"
P_REFERENCE_ID_LIST = "$XDSDocumentEntryReferenceIdList"
P_ENTRY_UUID = "$XDSDocumentEntryEntryUUID"
P_UNIQUE_ID = "$XDSDocumentEntryUniqueId"
P_HOME_COMMUNITY_ID = "$homeCommunityId"

_DOC_ID_PAIR = (P_ENTRY_UUID, P_UNIQUE_ID)
_FOLDER_ID_PAIR = ("$XDSFolderEntryUUID", "$XDSFolderUniqueId")
_SS_ID_PAIR = ("$XDSSubmissionSetEntryUUID", "$XDSSubmissionSetUniqueId")


@dataclass(frozen=True)
class _QueryRule:
    required: tuple[str, ...] = ()
    either: tuple[str, str] | None = None
    #: no patient id parameter ⇒ the Initiating Gateway must send ``home`` [ITI TF-2 3.38.4.1.2.1]
    needs_home: bool = False


_RULES: Mapping[StoredQueryId, _QueryRule] = {
    StoredQueryId.FindDocuments: _QueryRule((P_PATIENT_ID, P_STATUS)),
    StoredQueryId.FindSubmissionSets: _QueryRule(("$XDSSubmissionSetPatientId", "$XDSSubmissionSetStatus")),
    StoredQueryId.FindFolders: _QueryRule(("$XDSFolderPatientId", "$XDSFolderStatus")),
    StoredQueryId.GetAll: _QueryRule(("$patientId", P_STATUS, "$XDSSubmissionSetStatus", "$XDSFolderStatus")),
    StoredQueryId.GetDocuments: _QueryRule(either=_DOC_ID_PAIR, needs_home=True),
    StoredQueryId.GetFolders: _QueryRule(either=_FOLDER_ID_PAIR, needs_home=True),
    StoredQueryId.GetAssociations: _QueryRule(("$uuid",), needs_home=True),
    StoredQueryId.GetDocumentsAndAssociations: _QueryRule(either=_DOC_ID_PAIR, needs_home=True),
    StoredQueryId.GetSubmissionSets: _QueryRule(("$uuid",), needs_home=True),
    StoredQueryId.GetSubmissionSetAndContents: _QueryRule(either=_SS_ID_PAIR, needs_home=True),
    StoredQueryId.GetFolderAndContents: _QueryRule(either=_FOLDER_ID_PAIR, needs_home=True),
    StoredQueryId.GetFoldersForDocument: _QueryRule(either=_DOC_ID_PAIR, needs_home=True),
    StoredQueryId.GetRelatedDocuments: _QueryRule(("$AssociationTypes",), either=_DOC_ID_PAIR, needs_home=True),
    StoredQueryId.FindDocumentsByReferenceId: _QueryRule((P_PATIENT_ID, P_STATUS, P_REFERENCE_ID_LIST)),
}

#: Multi-valued metadata whose parameter may be repeated as several Slots (AND of ORs) [3.18.4.1.2.3.5].
AND_OR_PARAMETERS = frozenset({P_EVENT_CODE_LIST, P_CONFIDENTIALITY_CODE, P_REFERENCE_ID_LIST})


class QueryError(XigError):
    """A stored-query request the Responding Gateway rejects with an ITI TF-3 Table 4.2.4.1-2 code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_registry_error(self, location: str | None = None) -> RegistryError:
        return RegistryError(self.code, self.message, location)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueryParameter:
    """One ``rim:Slot`` of the query, its values decoded (all Value elements of the Slot, in order)."""

    name: str
    values: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class FindDocumentsParams:
    """FindDocuments / FindDocumentsByReferenceId parameters [ITI TF-2 3.18.4.1.2.3.7.1, .14].

    Single-code lists are OR; ``event_codes``, ``confidentiality_codes`` and ``reference_ids`` are AND
    of OR groups. An empty tuple means "not given". ``entry_types`` defaults to Stable only
    [3.18.4.1.2.3.6.2]. Times are DTM strings.
    """

    patient_id: CX
    statuses: tuple[str, ...] = (ebrim.STATUS_APPROVED,)
    class_codes: tuple[Code, ...] = ()
    type_codes: tuple[Code, ...] = ()
    practice_setting_codes: tuple[Code, ...] = ()
    healthcare_facility_type_codes: tuple[Code, ...] = ()
    format_codes: tuple[Code, ...] = ()
    event_codes: tuple[tuple[Code, ...], ...] = ()
    confidentiality_codes: tuple[tuple[Code, ...], ...] = ()
    creation_time_from: str | None = None
    creation_time_to: str | None = None
    service_start_time_from: str | None = None
    service_start_time_to: str | None = None
    service_stop_time_from: str | None = None
    service_stop_time_to: str | None = None
    author_persons: tuple[str, ...] = ()
    entry_types: tuple[str, ...] = (ebrim.STABLE,)
    #: only for FindDocumentsByReferenceId (required there); AND of OR groups, exact matches
    reference_ids: tuple[tuple[str, ...], ...] = ()

    @property
    def query_id(self) -> StoredQueryId:
        return StoredQueryId.FindDocumentsByReferenceId if self.reference_ids else StoredQueryId.FindDocuments


@dataclass(frozen=True, kw_only=True)
class GetDocumentsParams:
    """GetDocuments: exactly one of entryUUIDs / uniqueIds, and the homeCommunityId [3.18.4.1.2.3.7.5]."""

    home_community_id: str
    entry_uuids: tuple[str, ...] = ()
    unique_ids: tuple[str, ...] = ()

    @property
    def query_id(self) -> StoredQueryId:
        return StoredQueryId.GetDocuments


@dataclass(frozen=True)
class StoredQuery:
    """A parsed AdhocQueryRequest. ``find_documents``/``get_documents`` are set for those queries."""

    query_id: StoredQueryId
    return_type: ReturnType = "LeafClass"
    home_community_id: str | None = None
    parameters: tuple[QueryParameter, ...] = ()
    request_id: str | None = None
    find_documents: FindDocumentsParams | None = None
    get_documents: GetDocumentsParams | None = None

    @property
    def name(self) -> str:
        return self.query_id.name

    def values(self, name: str) -> list[tuple[str, ...]]:
        """The decoded values of every Slot named ``name`` (one tuple per Slot)."""
        return [p.values for p in self.parameters if p.name == name]


@dataclass(frozen=True)
class ObjectRef:
    id: str
    home: str | None = None


@dataclass
class QueryResult:
    """A parsed AdhocQueryResponse.

    ``errors`` are the partner's RegistryErrors; ``problems`` are entries XIG could not read
    (reported, not raised, so one bad entry does not hide the others).
    """

    status: str
    entries: list[DocumentEntry] = field(default_factory=list)
    object_refs: list[ObjectRef] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    total_result_count: int | None = None

    @property
    def entries_without_home(self) -> list[DocumentEntry]:
        """Entries lacking ``home``: an Initiating Gateway reports these as XDSMissingHomeCommunityId."""
        return [e for e in self.entries if not e.home_community_id]


# --------------------------------------------------------------------------------------------------
# Slot value coding [ITI TF-2 3.18.4.1.2.3.4-5]
# --------------------------------------------------------------------------------------------------

def _read_items(text: str) -> list[str]:
    """Comma-separated items: ``'quoted'`` (``''`` = one quote) or bare tokens (numbers, sloppy peers)."""
    items: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            if items:
                raise ValueError("empty item after ','")
            return items
        if text[i] == "'":
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted string")
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        buf.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(text[i])
                i += 1
            items.append("".join(buf))
            while i < n and text[i].isspace():
                i += 1
        else:
            j = text.find(",", i)
            token = (text[i:] if j < 0 else text[i:j]).strip()
            if not token or "'" in token:
                raise ValueError(f"malformed value {token!r}")
            items.append(token)
            i = n if j < 0 else j
        if i >= n:
            return items
        if text[i] != ",":
            raise ValueError(f"expected ',' at {text[i:i + 10]!r}")
        i += 1
        if i >= n or not text[i:].strip():
            raise ValueError("trailing ','")


def decode_slot_value(text: str) -> list[str]:
    """Decode one ``rim:Value``: ``('a','b')`` → ``[a, b]``, ``'a'`` → ``[a]``, ``123`` → ``["123"]``."""
    s = text.strip()
    if s.startswith("("):
        if not s.endswith(")"):
            raise ValueError("list without closing ')'")
        return _read_items(s[1:-1])
    if s.startswith("'"):
        items = _read_items(s)
        if len(items) != 1:
            raise ValueError("several values outside a (...) list")
        return items
    return [s] if s else []


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def encode_list(values: Sequence[str], *, max_length: int = 256) -> list[str]:
    """``('a','b',...)`` split across several Value texts so none exceeds ``max_length`` (rim:LongName)."""
    chunks: list[str] = []
    current: list[str] = []
    for v in values:
        q = quote(v)
        if current and len("(" + ",".join([*current, q]) + ")") > max_length:
            chunks.append("(" + ",".join(current) + ")")
            current = []
        current.append(q)
    if current:
        chunks.append("(" + ",".join(current) + ")")
    return chunks


# --------------------------------------------------------------------------------------------------
# Parsing the request
# --------------------------------------------------------------------------------------------------

def _child(el: etree._Element, local: str) -> etree._Element | None:
    for c in el:
        if ns.local(c) == local:
            return c
    return None


def _registry_error(message: str) -> QueryError:
    return QueryError(RegistryErrorCode.XDSRegistryError, message)


class _Params:
    """Slots of one query, grouped by name, with the single/OR/AND-of-OR accessors."""

    def __init__(self, params: Sequence[QueryParameter]) -> None:
        self.by_name: dict[str, list[tuple[str, ...]]] = {}
        for p in params:
            self.by_name.setdefault(p.name, []).append(p.values)

    def given(self, name: str) -> bool:
        return any(vals for vals in self.by_name.get(name, []))

    def single(self, name: str) -> str | None:
        slots = [v for v in self.by_name.get(name, []) if v]
        if not slots:
            return None
        if len(slots) > 1 or len(slots[0]) > 1:
            raise QueryError(RegistryErrorCode.XDSStoredQueryParamNumber,
                             f"parameter {name} takes a single value but was given {sum(map(len, slots))}")
        return slots[0][0]

    def or_list(self, name: str) -> tuple[str, ...]:
        slots = [v for v in self.by_name.get(name, []) if v]
        if len(slots) > 1:
            raise QueryError(RegistryErrorCode.XDSStoredQueryParamNumber,
                             f"parameter {name} may appear in only one Slot (AND semantics apply only to "
                             "eventCodeList, confidentialityCode and referenceIdList)")
        return slots[0] if slots else ()

    def and_or(self, name: str) -> tuple[tuple[str, ...], ...]:
        return tuple(v for v in self.by_name.get(name, []) if v)


def _codes(name: str, values: Iterable[str]) -> tuple[Code, ...]:
    out: list[Code] = []
    for v in values:
        comps = v.split("^")
        if len(comps) < 3 or not comps[0].strip() or not comps[2].strip():
            raise _registry_error(f"parameter {name}: {v!r} is not a code^^codingScheme value")
        out.append(Code(comps[0].strip(), comps[2].strip()))
    return tuple(out)


def _time(p: _Params, name: str) -> str | None:
    value = p.single(name)
    if value is None:
        return None
    try:
        return ebrim.normalize_dtm(value)
    except MetadataError:
        raise _registry_error(f"parameter {name}: {value!r} is not a DTM date/time (YYYY[MM[DD[hh[mm[ss]]]]])",
                              ) from None


def _patient_id(p: _Params) -> CX:
    value = p.single(P_PATIENT_ID)
    if value is None:
        raise QueryError(RegistryErrorCode.XDSStoredQueryMissingParam, f"required parameter {P_PATIENT_ID} missing")
    try:
        cx = ebrim.parse_cx(value)
    except MetadataError:
        cx = None
    if cx is None or not cx.assigning_authority:
        raise _registry_error(f"parameter {P_PATIENT_ID}: {value!r} is not a CX value id^^^&<OID>&ISO")
    return cx


def _find_documents(p: _Params, by_reference: bool) -> FindDocumentsParams:
    patient = _patient_id(p)
    statuses = tuple(s for s in p.or_list(P_STATUS) if s in ebrim.AVAILABILITY_STATUSES)
    if not statuses:  # unknown values are ignored; none left = the required parameter is missing [3.18.4.1.2.3.6]
        raise QueryError(RegistryErrorCode.XDSStoredQueryMissingParam,
                         f"required parameter {P_STATUS} missing or without a known status value")
    entry_types = tuple(t for t in p.or_list(P_ENTRY_TYPE) if t in ebrim.DOCUMENT_ENTRY_TYPES)
    reference_ids = p.and_or(P_REFERENCE_ID_LIST) if by_reference else ()
    if by_reference and not reference_ids:
        raise QueryError(RegistryErrorCode.XDSStoredQueryMissingParam,
                         f"required parameter {P_REFERENCE_ID_LIST} missing")
    return FindDocumentsParams(
        patient_id=patient,
        statuses=statuses,
        class_codes=_codes(P_CLASS_CODE, p.or_list(P_CLASS_CODE)),
        type_codes=_codes(P_TYPE_CODE, p.or_list(P_TYPE_CODE)),
        practice_setting_codes=_codes(P_PRACTICE_SETTING_CODE, p.or_list(P_PRACTICE_SETTING_CODE)),
        healthcare_facility_type_codes=_codes(P_HEALTHCARE_FACILITY_TYPE_CODE,
                                              p.or_list(P_HEALTHCARE_FACILITY_TYPE_CODE)),
        format_codes=_codes(P_FORMAT_CODE, p.or_list(P_FORMAT_CODE)),
        event_codes=tuple(_codes(P_EVENT_CODE_LIST, g) for g in p.and_or(P_EVENT_CODE_LIST)),
        confidentiality_codes=tuple(_codes(P_CONFIDENTIALITY_CODE, g) for g in p.and_or(P_CONFIDENTIALITY_CODE)),
        creation_time_from=_time(p, P_CREATION_TIME_FROM),
        creation_time_to=_time(p, P_CREATION_TIME_TO),
        service_start_time_from=_time(p, P_SERVICE_START_TIME_FROM),
        service_start_time_to=_time(p, P_SERVICE_START_TIME_TO),
        service_stop_time_from=_time(p, P_SERVICE_STOP_TIME_FROM),
        service_stop_time_to=_time(p, P_SERVICE_STOP_TIME_TO),
        author_persons=p.or_list(P_AUTHOR_PERSON),
        entry_types=entry_types or (ebrim.STABLE,),
        reference_ids=reference_ids,
    )


def parse_query(el: etree._Element) -> StoredQuery:
    """Parse a ``query:AdhocQueryRequest`` (or a bare ``rim:AdhocQuery``) into a :class:`StoredQuery`.

    Raises :class:`QueryError`: XDSUnknownStoredQuery, XDSStoredQueryMissingParam,
    XDSStoredQueryParamNumber (a single-valued parameter given twice, both of an either/or pair, two
    different homeCommunityIds), XDSMissingHomeCommunityId (a query without patient id and without
    ``home``), XDSRegistryError (malformed structure or values; the message names the parameter).
    """
    if ns.local(el) == "AdhocQuery":
        request, query = None, el
    else:
        request, query = el, _child(el, "AdhocQuery")
    if query is None:
        raise _registry_error("AdhocQueryRequest without AdhocQuery")

    return_type: str = "LeafClass"
    if request is not None:
        option = _child(request, "ResponseOption")
        # absent: the schema default would be RegistryObject, which IHE does not use; read it as LeafClass
        return_type = ((option.get("returnType") if option is not None else None) or "LeafClass").strip()
    if return_type not in RETURN_TYPES:
        raise _registry_error(f"returnType {return_type!r} is not supported (use LeafClass or ObjectRef)")

    raw_id = (query.get("id") or "").strip()
    candidate = raw_id.lower()
    if candidate and not candidate.startswith("urn:uuid:"):
        candidate = "urn:uuid:" + candidate
    try:
        query_id = StoredQueryId(candidate)
    except ValueError:
        raise QueryError(RegistryErrorCode.XDSUnknownStoredQuery, f"unknown stored query id {raw_id!r}") from None

    params: list[QueryParameter] = []
    for s in query:
        if ns.local(s) != "Slot":
            continue
        name = (s.get("name") or "").strip()
        values: list[str] = []
        for vl in s:
            for v in vl if ns.local(vl) == "ValueList" else ():
                if ns.local(v) != "Value":
                    continue
                try:
                    values.extend(decode_slot_value(v.text or ""))
                except ValueError as exc:
                    raise _registry_error(f"parameter {name}: malformed value {v.text!r} ({exc})") from None
        params.append(QueryParameter(name, tuple(values)))
    p = _Params(params)

    rule = _RULES[query_id]
    for name in rule.required:
        if not p.given(name):
            raise QueryError(RegistryErrorCode.XDSStoredQueryMissingParam,
                             f"{query_id.name}: required parameter {name} missing")
    if rule.either is not None:
        a, b = rule.either
        if p.given(a) and p.given(b):
            raise QueryError(RegistryErrorCode.XDSStoredQueryParamNumber,
                             f"{query_id.name}: only one of {a} and {b} may be given")
        if not p.given(a) and not p.given(b):
            raise QueryError(RegistryErrorCode.XDSStoredQueryMissingParam,
                             f"{query_id.name}: one of {a} or {b} is required")

    home_attr = (query.get("home") or "").strip()
    home = ebrim.normalize_hcid(home_attr) if home_attr else None
    home_param = p.single(P_HOME_COMMUNITY_ID)
    if home_param:
        if home is not None and ebrim.normalize_hcid(home_param) != home:
            raise QueryError(RegistryErrorCode.XDSStoredQueryParamNumber,
                             f"two different homeCommunityIds: home={home!r} and {P_HOME_COMMUNITY_ID}={home_param!r}")
        home = ebrim.normalize_hcid(home_param)
    if rule.needs_home and home is None:
        raise QueryError(RegistryErrorCode.XDSMissingHomeCommunityId,
                         f"{query_id.name} has no patient id, so AdhocQuery/@home is required (ITI TF-2 3.38.4.1.2.1)")

    find: FindDocumentsParams | None = None
    get: GetDocumentsParams | None = None
    if query_id in (StoredQueryId.FindDocuments, StoredQueryId.FindDocumentsByReferenceId):
        find = _find_documents(p, query_id is StoredQueryId.FindDocumentsByReferenceId)
    elif query_id is StoredQueryId.GetDocuments:
        assert home is not None
        get = GetDocumentsParams(home_community_id=home, entry_uuids=p.or_list(P_ENTRY_UUID),
                                 unique_ids=p.or_list(P_UNIQUE_ID))
    request_id = request.get("id") if request is not None else None
    return StoredQuery(
        query_id=query_id,
        return_type="ObjectRef" if return_type == "ObjectRef" else "LeafClass",
        home_community_id=home,
        parameters=tuple(params),
        request_id=request_id.strip() if request_id else None,
        find_documents=find,
        get_documents=get,
    )


# --------------------------------------------------------------------------------------------------
# Building the request (initiating side)
# --------------------------------------------------------------------------------------------------

def _slot(parent: etree._Element, name: str, values: Sequence[str]) -> None:
    ebrim.slot(parent, name, values)


def find_documents_for_kos(patient_id: CX | str, **changes: Any) -> FindDocumentsParams:
    """FindDocuments for imaging manifests: KOS formatCode, Approved, Stable and On-Demand entries.

    ``changes`` override any other :class:`FindDocumentsParams` field (e.g. ``service_start_time_from``).
    """
    cx = patient_id if isinstance(patient_id, CX) else ebrim.parse_cx(patient_id)
    kos = Code(ebrim.KOS_FORMAT_CODE.code, ebrim.KOS_FORMAT_CODE.scheme)  # the query form carries no display name
    params = FindDocumentsParams(patient_id=cx, format_codes=(kos,),
                                 entry_types=(ebrim.STABLE, ebrim.ON_DEMAND))
    return replace(params, **changes) if changes else params


def build_query(params: FindDocumentsParams | GetDocumentsParams, *, return_type: ReturnType = "LeafClass",
                home_community_id: str | None = None, request_id: str | None = None) -> etree._Element:
    """``query:AdhocQueryRequest`` for FindDocuments(ByReferenceId) or GetDocuments.

    ``home`` is set from ``home_community_id`` (FindDocuments) or the GetDocuments parameter, always in
    ``urn:oid:`` form. Long lists are split over several ``Value`` elements (ITI TF-2 3.18.4.1.2.3.5).
    """
    root = etree.Element(ns.q(ns.QUERY, "AdhocQueryRequest"), nsmap={"query": ns.QUERY, "rim": ns.RIM})
    if request_id:
        root.set("id", request_id)
    option = etree.SubElement(root, ns.q(ns.QUERY, "ResponseOption"))
    option.set("returnComposedObjects", "true")
    option.set("returnType", return_type)
    query = etree.SubElement(root, ns.q(ns.RIM, "AdhocQuery"))
    query.set("id", params.query_id.value)
    home = params.home_community_id if isinstance(params, GetDocumentsParams) else home_community_id
    if home:
        query.set("home", ebrim.normalize_hcid(home))

    if isinstance(params, GetDocumentsParams):
        if bool(params.entry_uuids) == bool(params.unique_ids):
            raise ValueError("GetDocuments needs exactly one of entry_uuids / unique_ids")
        if params.entry_uuids:
            _slot(query, P_ENTRY_UUID, encode_list(params.entry_uuids))
        else:
            _slot(query, P_UNIQUE_ID, encode_list(params.unique_ids))
        return root

    f = params
    _slot(query, P_PATIENT_ID, [quote(str(f.patient_id))])
    _slot(query, P_STATUS, encode_list(f.statuses))
    for ref_group in f.reference_ids:
        _slot(query, P_REFERENCE_ID_LIST, encode_list(ref_group))
    for name, codes in ((P_CLASS_CODE, f.class_codes), (P_TYPE_CODE, f.type_codes),
                        (P_PRACTICE_SETTING_CODE, f.practice_setting_codes),
                        (P_HEALTHCARE_FACILITY_TYPE_CODE, f.healthcare_facility_type_codes),
                        (P_FORMAT_CODE, f.format_codes)):
        if codes:
            _slot(query, name, encode_list([c.query_form for c in codes]))
    for name, groups in ((P_EVENT_CODE_LIST, f.event_codes), (P_CONFIDENTIALITY_CODE, f.confidentiality_codes)):
        for group in groups:
            _slot(query, name, encode_list([c.query_form for c in group]))
    for name, value in ((P_CREATION_TIME_FROM, f.creation_time_from), (P_CREATION_TIME_TO, f.creation_time_to),
                        (P_SERVICE_START_TIME_FROM, f.service_start_time_from),
                        (P_SERVICE_START_TIME_TO, f.service_start_time_to),
                        (P_SERVICE_STOP_TIME_FROM, f.service_stop_time_from),
                        (P_SERVICE_STOP_TIME_TO, f.service_stop_time_to)):
        if value:
            _slot(query, name, [ebrim.normalize_dtm(value)])
    if f.author_persons:
        _slot(query, P_AUTHOR_PERSON, encode_list(f.author_persons))
    if tuple(f.entry_types) != (ebrim.STABLE,):
        _slot(query, P_ENTRY_TYPE, encode_list(f.entry_types))
    return root


# --------------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------------

def build_response(entries: Sequence[DocumentEntry], *, return_type: ReturnType, home_community_id: str,
                   errors: Sequence[RegistryError] = ()) -> etree._Element:
    """``query:AdhocQueryResponse``: LeafClass → ExtrinsicObjects, ObjectRef → ``rim:ObjectRef``.

    Every object carries ``home`` (the entry's own, else ``home_community_id``) and every
    RegistryError's location our homeCommunityId (ITI TF-2 3.38.4.1.3). Status: Success without
    errors, PartialSuccess with entries and errors, Failure with errors only (warnings do not count).
    """
    root = etree.Element(ns.q(ns.QUERY, "AdhocQueryResponse"),
                         nsmap={"query": ns.QUERY, "rim": ns.RIM, "rs": ns.RS})
    root.set("status", status_from_errors(len(entries), errors))
    if errors:
        root.append(registry_error_list(errors, home_community_id))
    objects = etree.SubElement(root, ns.q(ns.RIM, "RegistryObjectList"))
    home = ebrim.normalize_hcid(home_community_id)
    for entry in entries:
        if return_type == "ObjectRef":
            ref = etree.SubElement(objects, ns.q(ns.RIM, "ObjectRef"))
            ref.set("id", entry.entry_uuid)
            ref.set("home", ebrim.normalize_hcid(entry.home_community_id or home))
        else:
            objects.append(ebrim.build_extrinsic_object(entry, home_community_id=home))
    etree.cleanup_namespaces(root, top_nsmap={"query": ns.QUERY, "rim": ns.RIM, "rs": ns.RS})
    return root


def parse_response(el: etree._Element) -> QueryResult:
    """Read an ``AdhocQueryResponse``: status, DocumentEntries, ObjectRefs and RegistryErrors."""
    result = QueryResult(status=parse_status(el), errors=parse_registry_errors(el))
    count = el.get("totalResultCount")
    if count is not None and count.strip().lstrip("-").isdigit():
        result.total_result_count = int(count)
    objects = _child(el, "RegistryObjectList")
    if objects is None:
        return result
    for obj in objects:
        kind = ns.local(obj)
        if kind == "ExtrinsicObject":
            try:
                result.entries.append(ebrim.parse_extrinsic_object(obj))
            except MetadataError as exc:
                result.problems.append(str(exc))
        elif kind == "ObjectRef":
            oid = (obj.get("id") or "").strip()
            if oid:
                home = (obj.get("home") or "").strip()
                result.object_refs.append(ObjectRef(oid, home or None))
    return result


# --------------------------------------------------------------------------------------------------
# Filtering (responding side)
# --------------------------------------------------------------------------------------------------

def _like(pattern: str) -> re.Pattern[str]:
    parts = [".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern]
    return re.compile("".join(parts), re.DOTALL)


def _in_codes(code: Code | None, allowed: tuple[Code, ...]) -> bool:
    return code is not None and any(code.same_concept(a) for a in allowed)


def _in_range(value: str | None, low: str | None, high: str | None, *, missing_matches: bool) -> bool:
    if low is None and high is None:
        return True
    if not value:
        return missing_matches
    try:
        key = ebrim.dtm_key(value)
    except MetadataError:
        return False
    if low is not None and key < ebrim.dtm_key(low):
        return False
    return not (high is not None and key >= ebrim.dtm_key(high))


def matches(entry: DocumentEntry, f: FindDocumentsParams) -> bool:
    """Whether ``entry`` satisfies every FindDocuments(ByReferenceId) parameter (see the module docstring)."""
    try:
        if not entry.patient_cx.same_patient(f.patient_id):
            return False
    except MetadataError:
        return False
    if entry.availability_status not in f.statuses or entry.object_type not in f.entry_types:
        return False
    for code, allowed in ((entry.class_code, f.class_codes), (entry.type_code, f.type_codes),
                          (entry.practice_setting_code, f.practice_setting_codes),
                          (entry.healthcare_facility_type_code, f.healthcare_facility_type_codes),
                          (entry.format_code, f.format_codes)):
        if allowed and not _in_codes(code, allowed):
            return False
    for have, groups in ((entry.event_codes, f.event_codes), (entry.confidentiality_codes, f.confidentiality_codes)):
        for group in groups:
            if not any(_in_codes(c, group) for c in have):
                return False
    for ref_group in f.reference_ids:
        if not set(ref_group) & set(entry.reference_ids):
            return False
    if not entry.is_on_demand and not _in_range(entry.creation_time, f.creation_time_from, f.creation_time_to,
                                                missing_matches=False):
        return False
    if not _in_range(entry.service_start_time, f.service_start_time_from, f.service_start_time_to,
                     missing_matches=True):
        return False
    if not _in_range(entry.service_stop_time, f.service_stop_time_from, f.service_stop_time_to,
                     missing_matches=True):
        return False
    if f.author_persons:
        patterns = [_like(p) for p in f.author_persons]
        if not any(pat.fullmatch(a.person) for a in entry.authors if a.person for pat in patterns):
            return False
    return True


def filter_entries(entries: Iterable[DocumentEntry], query: FindDocumentsParams | StoredQuery,
                   ) -> list[DocumentEntry]:
    """The entries matching a FindDocuments / FindDocumentsByReferenceId query, in input order."""
    f = query.find_documents if isinstance(query, StoredQuery) else query
    if f is None:
        raise ValueError("filter_entries needs a FindDocuments or FindDocumentsByReferenceId query")
    return [e for e in entries if matches(e, f)]


def select_entries(entries: Iterable[DocumentEntry], query: GetDocumentsParams | StoredQuery,
                   ) -> list[DocumentEntry]:
    """GetDocuments: the entries whose entryUUID / uniqueId is asked for, in input order."""
    g = query.get_documents if isinstance(query, StoredQuery) else query
    if g is None:
        raise ValueError("select_entries needs a GetDocuments query")
    uuids, uids = set(g.entry_uuids), set(g.unique_ids)
    return [e for e in entries if e.entry_uuid in uuids or e.unique_id in uids]


__all__ = [
    "AND_OR_PARAMETERS", "RETURN_TYPES", "FindDocumentsParams", "GetDocumentsParams", "ObjectRef", "QueryError",
    "QueryParameter", "QueryResult", "ReturnType", "StoredQuery", "StoredQueryId", "build_query", "build_response",
    "decode_slot_value", "encode_list", "filter_entries", "find_documents_for_kos", "matches", "parse_query",
    "parse_response", "quote", "select_entries",
]
