"""ITI-38 codec: real requests/responses, every QueryError code, builders against the XSD, filter semantics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.ihe import ebrim, iti38
from gateway.ihe.ebrim import CX, ON_DEMAND, STABLE, STATUS_APPROVED, STATUS_DEPRECATED, Author, Code, DocumentEntry
from gateway.ihe.iti38 import FindDocumentsParams, GetDocumentsParams, QueryError, StoredQueryId
from gateway.ihe.registry import (
    FAILURE,
    PARTIAL_SUCCESS,
    SEVERITY_WARNING,
    SUCCESS,
    RegistryError,
    RegistryErrorCode,
)
from gateway.soap import ns, xml
from gateway.soap.schema import default_schemas

XCQ = "messages/iti38-xca-query"
HCID = "urn:oid:2.999.1"
PID = CX("PAT-1", "2.999.1.1")
FD = StoredQueryId.FindDocuments.value


def load(samples: Path, name: str) -> etree._Element:
    root = xml.parse((samples / name).read_bytes())
    if etree.QName(root).localname == "Envelope":
        return root.find(ns.q(ns.SOAP12, "Body"))[0]
    return root


def adhoc(query_id: str, slots: Sequence[tuple[str, Sequence[str]]], *, home: str | None = None,
          return_type: str | None = "LeafClass") -> etree._Element:
    """An AdhocQueryRequest with the given raw Slot values (each tuple = one Slot)."""
    root = etree.Element(ns.q(ns.QUERY, "AdhocQueryRequest"), nsmap={"query": ns.QUERY, "rim": ns.RIM})
    opt = etree.SubElement(root, ns.q(ns.QUERY, "ResponseOption"))
    if return_type is not None:
        opt.set("returnType", return_type)
    q = etree.SubElement(root, ns.q(ns.RIM, "AdhocQuery"), id=query_id)
    if home is not None:
        q.set("home", home)
    for name, values in slots:
        ebrim.slot(q, name, values)
    return root


BASE = [("$XDSDocumentEntryPatientId", ["'PAT-1^^^&2.999.1.1&ISO'"]),
        ("$XDSDocumentEntryStatus", ["('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')"])]


# ------------------------------------------------------------------------------------------------
# Real requests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nist-toolkit/soap-xcq-req.xml", "nist-toolkit/sq-req.xml"])
def test_nist_requests_parse(samples: Path, name: str) -> None:
    q = iti38.parse_query(load(samples, f"{XCQ}/{name}"))
    assert q.query_id is StoredQueryId.FindDocuments and q.name == "FindDocuments"
    assert q.return_type == "LeafClass" and q.home_community_id is None
    f = q.find_documents
    assert f is not None
    assert f.patient_id == CX("c4d77e21d0dd487", "1.3.6.1.4.1.21367.2005.3.7")
    assert f.statuses == (STATUS_APPROVED,)
    assert f.class_codes == (Code("value", "scheme"),)
    assert f.entry_types == (STABLE,)  # absent ⇒ Stable only [ITI TF-2 3.18.4.1.2.3.6.2]


def test_epic_request_parses(samples: Path) -> None:
    q = iti38.parse_query(load(samples, f"{XCQ}/metriport-carequality/epic-iti-38-request.xml"))
    # home without urn:oid: on the wire, normalised
    assert q.home_community_id == "urn:oid:1.2.840.114350.1.13.11511.3.7.3.688884.100.1000"
    assert q.request_id == "0357bea4-617b-4a95-b631-03373250e78b"
    f = q.find_documents
    assert f is not None
    assert f.patient_id == CX("EV10045900", "1.2.840.114350.1.13.11511.3.7.3.688884.100.1000")
    assert (f.creation_time_from, f.creation_time_to) == ("20180101000000", "20231201000000")
    assert f.entry_types == (STABLE, ON_DEMAND)
    assert [p.name for p in q.parameters][:2] == ["$XDSDocumentEntryPatientId", "$XDSDocumentEntryStatus"]


# ------------------------------------------------------------------------------------------------
# Slot value coding
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("'a'", ["a"]),
    ("('a')", ["a"]),
    ("('a','b')", ["a", "b"]),
    (" ( 'a' , 'b' ) ", ["a", "b"]),
    ("'Children''s Hospital'", ["Children's Hospital"]),
    ("('x,y','z')", ["x,y", "z"]),
    ("20180101000000", ["20180101000000"]),
    ("(1,2)", ["1", "2"]),
    ("()", []),
    ("id^^^&1.2&ISO", ["id^^^&1.2&ISO"]),
])
def test_decode_slot_value(text: str, expected: list[str]) -> None:
    assert iti38.decode_slot_value(text) == expected


@pytest.mark.parametrize("text", ["'abc", "('a',)", "('a' 'b')", "('a'", "'a','b'", "(a'b)"])
def test_decode_slot_value_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        iti38.decode_slot_value(text)


def test_encode_list_splits_long_lists_and_round_trips() -> None:
    values = [f"urn:uuid:{i:08d}-0000-4000-8000-000000000000" for i in range(20)]
    chunks = iti38.encode_list(values)
    assert len(chunks) > 1 and all(len(c) <= 256 for c in chunks)
    assert [v for c in chunks for v in iti38.decode_slot_value(c)] == values
    assert iti38.decode_slot_value(iti38.encode_list(["it's"])[0]) == ["it's"]


# ------------------------------------------------------------------------------------------------
# Validation errors
# ------------------------------------------------------------------------------------------------

def raises_code(el: etree._Element, code: str) -> QueryError:
    with pytest.raises(QueryError) as info:
        iti38.parse_query(el)
    assert info.value.code == code, info.value.message
    return info.value


def test_unknown_stored_query() -> None:
    raises_code(adhoc("urn:uuid:00000000-0000-0000-0000-000000000000", BASE), "XDSUnknownStoredQuery")


def test_query_id_without_urn_prefix_is_accepted() -> None:
    assert iti38.parse_query(adhoc(FD.removeprefix("urn:uuid:").upper(), BASE)).query_id is StoredQueryId.FindDocuments


def test_missing_patient_id() -> None:
    e = raises_code(adhoc(FD, BASE[1:]), "XDSStoredQueryMissingParam")
    assert "$XDSDocumentEntryPatientId" in e.message


def test_missing_status_and_status_with_only_unknown_values() -> None:
    raises_code(adhoc(FD, BASE[:1]), "XDSStoredQueryMissingParam")
    raises_code(adhoc(FD, [BASE[0], ("$XDSDocumentEntryStatus", ["('urn:x:Submitted')"])]),
                "XDSStoredQueryMissingParam")
    # unknown values are ignored when a known one is present [ITI TF-2 3.18.4.1.2.3.6]
    q = iti38.parse_query(adhoc(FD, [BASE[0], ("$XDSDocumentEntryStatus",
                                               ["('urn:x:Submitted','urn:oasis:names:tc:ebxml-regrep:StatusType:"
                                                "Deprecated')"])]))
    assert q.find_documents is not None and q.find_documents.statuses == (STATUS_DEPRECATED,)


def test_single_valued_parameter_given_twice() -> None:
    raises_code(adhoc(FD, [*BASE, BASE[0]]), "XDSStoredQueryParamNumber")
    raises_code(adhoc(FD, [*BASE, ("$XDSDocumentEntryCreationTimeFrom", ["2016", "2017"])]),
                "XDSStoredQueryParamNumber")
    raises_code(adhoc(FD, [("$XDSDocumentEntryPatientId", ["('a^^^&1.2&ISO','b^^^&1.2&ISO')"]), BASE[1]]),
                "XDSStoredQueryParamNumber")


def test_or_only_code_parameter_repeated_as_slots() -> None:
    slot = ("$XDSDocumentEntryClassCode", ["('a^^s')"])
    raises_code(adhoc(FD, [*BASE, slot, slot]), "XDSStoredQueryParamNumber")


def test_get_documents_with_uuid_and_unique_id() -> None:
    el = adhoc(StoredQueryId.GetDocuments, [("$XDSDocumentEntryEntryUUID", ["('urn:uuid:1')"]),
                                            ("$XDSDocumentEntryUniqueId", ["('1.2.3')"])], home=HCID)
    raises_code(el, "XDSStoredQueryParamNumber")


def test_get_documents_with_neither_id() -> None:
    raises_code(adhoc(StoredQueryId.GetDocuments, [], home=HCID), "XDSStoredQueryMissingParam")


def test_get_documents_without_home() -> None:
    el = adhoc(StoredQueryId.GetDocuments, [("$XDSDocumentEntryUniqueId", ["('1.2.3')"])])
    raises_code(el, "XDSMissingHomeCommunityId")


@pytest.mark.parametrize("query", [StoredQueryId.GetAssociations, StoredQueryId.GetSubmissionSets])
def test_other_no_patient_queries_need_home(query: StoredQueryId) -> None:
    raises_code(adhoc(query, [("$uuid", ["('urn:uuid:1')"])]), "XDSMissingHomeCommunityId")
    q = iti38.parse_query(adhoc(query, [("$uuid", ["('urn:uuid:1')"])], home="1.2.3"))
    assert q.home_community_id == "urn:oid:1.2.3" and q.values("$uuid") == [("urn:uuid:1",)]


def test_home_from_parameter_and_conflicting_homes() -> None:
    el = adhoc(StoredQueryId.GetDocuments, [("$XDSDocumentEntryUniqueId", ["('1.2.3')"]),
                                            ("$homeCommunityId", ["'urn:oid:2.999.1'"])])
    assert iti38.parse_query(el).home_community_id == HCID
    el = adhoc(StoredQueryId.GetDocuments, [("$XDSDocumentEntryUniqueId", ["('1.2.3')"]),
                                            ("$homeCommunityId", ["'urn:oid:2.999.9'"])], home=HCID)
    raises_code(el, "XDSStoredQueryParamNumber")


@pytest.mark.parametrize(("slot", "needle"), [
    (("$XDSDocumentEntryClassCode", ["('a^^s"]), "$XDSDocumentEntryClassCode"),
    (("$XDSDocumentEntryClassCode", ["('justacode')"]), "code^^codingScheme"),
    (("$XDSDocumentEntryEventCodeList", ["('a^^')"]), "$XDSDocumentEntryEventCodeList"),
    (("$XDSDocumentEntryServiceStartTimeFrom", ["'yesterday'"]), "$XDSDocumentEntryServiceStartTimeFrom"),
])
def test_malformed_values_are_registry_errors(slot: tuple[str, list[str]], needle: str) -> None:
    e = raises_code(adhoc(FD, [*BASE, slot]), "XDSRegistryError")
    assert needle in e.message


def test_malformed_patient_id() -> None:
    e = raises_code(adhoc(FD, [("$XDSDocumentEntryPatientId", ["'no-authority'"]), BASE[1]]), "XDSRegistryError")
    assert "CX" in e.message


def test_unsupported_return_type() -> None:
    raises_code(adhoc(FD, BASE, return_type="RegistryObject"), "XDSRegistryError")
    assert iti38.parse_query(adhoc(FD, BASE, return_type=None)).return_type == "LeafClass"


def test_find_by_reference_id_requires_list() -> None:
    raises_code(adhoc(StoredQueryId.FindDocumentsByReferenceId, BASE), "XDSStoredQueryMissingParam")
    ref = ("$XDSDocumentEntryReferenceIdList", ["('1.2.3^^^^urn:ihe:iti:xds:2016:studyInstanceUID')"])
    q = iti38.parse_query(adhoc(StoredQueryId.FindDocumentsByReferenceId, [*BASE, ref, ref]))
    assert q.find_documents is not None
    assert q.find_documents.reference_ids == (("1.2.3^^^^urn:ihe:iti:xds:2016:studyInstanceUID",),) * 2


def test_query_error_to_registry_error() -> None:
    e = QueryError(RegistryErrorCode.XDSUnknownStoredQuery, "nope")
    assert e.to_registry_error() == RegistryError("XDSUnknownStoredQuery", "nope")


def test_and_or_parsing_of_event_codes() -> None:
    el = adhoc(FD, [*BASE, ("$XDSDocumentEntryEventCodeList", ["('CT^^1.2.840.10008.2.16.4')",
                                                               "('MR^^1.2.840.10008.2.16.4')"]),
                    ("$XDSDocumentEntryEventCodeList", ["('T-D4909^^SNM3')"])])
    f = iti38.parse_query(el).find_documents
    assert f is not None
    assert f.event_codes == ((Code("CT", ebrim.DCM_OID), Code("MR", ebrim.DCM_OID)), (Code("T-D4909", "SNM3"),))


# ------------------------------------------------------------------------------------------------
# Building requests
# ------------------------------------------------------------------------------------------------

FULL = FindDocumentsParams(
    patient_id=PID,
    statuses=(STATUS_APPROVED, STATUS_DEPRECATED),
    class_codes=(Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1"),),
    type_codes=(Code("18748-4", ebrim.LOINC_OID), Code("24627-2", ebrim.LOINC_OID)),
    practice_setting_codes=(Code("394914008", ebrim.SNOMED_CT_OID),),
    healthcare_facility_type_codes=(Code("22232009", ebrim.SNOMED_CT_OID),),
    format_codes=(Code(ebrim.KOS_SOP_CLASS_UID, ebrim.DICOM_UID_REGISTRY_OID),),
    event_codes=((Code("CT", ebrim.DCM_OID), Code("MR", ebrim.DCM_OID)), (Code("T-D4909", "SNM3"),)),
    confidentiality_codes=((Code("N", ebrim.CONFIDENTIALITY_OID),),),
    creation_time_from="2016", creation_time_to="20240101",
    service_start_time_from="20150101", service_start_time_to="2025",
    service_stop_time_from="201501", service_stop_time_to="20250101120000",
    author_persons=("%Smitty%", "O''Brien"),
    entry_types=(STABLE, ON_DEMAND),
)


@pytest.mark.parametrize("params", [
    FULL,
    FindDocumentsParams(patient_id=PID),
    iti38.find_documents_for_kos("PAT-1^^^&2.999.1.1&ISO"),
    iti38.find_documents_for_kos(PID, service_start_time_from="20200101"),
    dataclasses.replace(FULL, reference_ids=(("A^^^&2.999&ISO^urn:ihe:iti:xds:2013:accession", "B^^^^x"),
                                             ("1.2.3^^^^urn:ihe:iti:xds:2016:studyInstanceUID",))),
])
def test_find_documents_round_trip_and_schema(params: FindDocumentsParams) -> None:
    el = iti38.build_query(params, home_community_id="2.999.9")
    assert default_schemas().errors(el) == []
    q = iti38.parse_query(el)
    assert q.query_id is params.query_id
    assert q.find_documents == params
    assert q.home_community_id == "urn:oid:2.999.9"


def test_kos_query_content() -> None:
    f = iti38.find_documents_for_kos(PID)
    assert f.format_codes[0].same_concept(ebrim.KOS_FORMAT_CODE) and f.entry_types == (STABLE, ON_DEMAND)
    el = iti38.build_query(f)
    values = {s.get("name"): [v.text for v in s.iter(ns.q(ns.RIM, "Value"))] for s in el.iter(ns.q(ns.RIM, "Slot"))}
    assert values["$XDSDocumentEntryFormatCode"] == ["('1.2.840.10008.5.1.4.1.1.88.59^^1.2.840.10008.2.6.1')"]
    assert values["$XDSDocumentEntryPatientId"] == ["'PAT-1^^^&2.999.1.1&ISO'"]
    assert values["$XDSDocumentEntryType"] == [f"('{STABLE}','{ON_DEMAND}')"]


def test_get_documents_round_trip_and_schema() -> None:
    params = GetDocumentsParams(home_community_id="urn:oid:2.999.1", unique_ids=tuple(f"2.25.{i}" * 3
                                                                                       for i in range(30)))
    el = iti38.build_query(params, return_type="ObjectRef")
    assert default_schemas().errors(el) == []
    assert el.find(ns.q(ns.RIM, "AdhocQuery")).get("home") == "urn:oid:2.999.1"
    q = iti38.parse_query(el)
    assert q.get_documents == params and q.return_type == "ObjectRef"
    by_uuid = GetDocumentsParams(home_community_id="urn:oid:2.999.1", entry_uuids=("urn:uuid:1",))
    assert iti38.parse_query(iti38.build_query(by_uuid)).get_documents == by_uuid
    with pytest.raises(ValueError):
        iti38.build_query(GetDocumentsParams(home_community_id=HCID))


# ------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------

def entry(n: int, **changes: Any) -> DocumentEntry:
    e = DocumentEntry(
        entry_uuid=ebrim.entry_uuid_for(f"2.25.{n}"), unique_id=f"2.25.{n}", patient_id=str(PID),
        mime_type=ebrim.MIME_DICOM, object_type=ON_DEMAND, repository_unique_id="2.999.1.2",
        class_code=Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1"), type_code=Code("18748-4", ebrim.LOINC_OID),
        format_code=ebrim.KOS_FORMAT_CODE, practice_setting_code=Code("394914008", ebrim.SNOMED_CT_OID),
        healthcare_facility_type_code=Code("22232009", ebrim.SNOMED_CT_OID),
        confidentiality_codes=(Code("N", ebrim.CONFIDENTIALITY_OID),), event_codes=(Code("CT", ebrim.DCM_OID),),
        creation_time="20240101120000", service_start_time="20231231", language_code="en-US",
        reference_ids=(ebrim.study_reference_id(f"1.2.3.{n}"),),
        source_patient_info=ebrim.SourcePatientInfo(("L1^^^&2.999.7&ISO",), "Doe^Jane", "19700101", "F"),
        authors=(Author(person="^Smitty^Gerald", institutions=("Radiology",)),),
    )
    return dataclasses.replace(e, **changes) if changes else e


def test_leafclass_response_schema_and_round_trip() -> None:
    entries = [entry(1), entry(2, object_type=STABLE, size=0, hash=ebrim.EMPTY_SHA1)]
    el = iti38.build_response(entries, return_type="LeafClass", home_community_id="2.999.1")
    assert default_schemas().errors(el) == []
    assert el.get("status") == SUCCESS
    homes = [eo.get("home") for eo in el.iter(ns.q(ns.RIM, "ExtrinsicObject"))]
    assert homes == [HCID, HCID]
    r = iti38.parse_response(el)
    assert r.status == SUCCESS and r.errors == [] and r.problems == []
    assert r.entries == [dataclasses.replace(e, home_community_id=HCID) for e in entries]
    assert r.entries_without_home == []


def test_objectref_response() -> None:
    el = iti38.build_response([entry(1), entry(2)], return_type="ObjectRef", home_community_id=HCID)
    assert default_schemas().errors(el) == []
    assert list(el.iter(ns.q(ns.RIM, "ExtrinsicObject"))) == []
    r = iti38.parse_response(el)
    assert r.object_refs == [iti38.ObjectRef(entry(1).entry_uuid, HCID), iti38.ObjectRef(entry(2).entry_uuid, HCID)]


@pytest.mark.parametrize(("n_entries", "errors", "status"), [
    (0, [], SUCCESS),
    (1, [RegistryError("XDSRegistryError", "PACS C-FIND failed")], PARTIAL_SUCCESS),
    (0, [RegistryError("XDSUnknownPatientId", "no such patient")], FAILURE),
    (2, [RegistryError("XDSRegistryError", "slow", severity=SEVERITY_WARNING)], SUCCESS),
])
def test_response_status_and_error_locations(n_entries: int, errors: list[RegistryError], status: str) -> None:
    el = iti38.build_response([entry(i) for i in range(n_entries)], return_type="LeafClass",
                              home_community_id=HCID, errors=errors)
    assert default_schemas().errors(el) == []
    r = iti38.parse_response(el)
    assert r.status == status and len(r.entries) == n_entries
    assert [(e.code, e.context, e.severity) for e in r.errors] == [(e.code, e.context, e.severity) for e in errors]
    assert all(e.location == HCID for e in r.errors)  # ITI TF-2 3.38.4.1.3


def test_query_error_becomes_failure_response() -> None:
    with pytest.raises(QueryError) as info:
        iti38.parse_query(adhoc(StoredQueryId.GetDocuments, [("$XDSDocumentEntryUniqueId", ["('1')"])]))
    el = iti38.build_response([], return_type="LeafClass", home_community_id=HCID,
                              errors=[info.value.to_registry_error()])
    assert default_schemas().errors(el) == []
    r = iti38.parse_response(el)
    assert r.status == FAILURE and r.errors[0].code == "XDSMissingHomeCommunityId"


@pytest.mark.parametrize(("name", "status", "n_entries", "codes"), [
    ("nist-toolkit/soap-xcq-resp.xml", SUCCESS, 2, []),
    ("nist-toolkit/soap-xcq-resp-error.xml", FAILURE, 2, ["MyBigError"]),
    ("metriport-carequality/dq_multiple_docs.xml", SUCCESS, 2, []),
    ("metriport-carequality/dq_empty.xml", SUCCESS, 0, []),
    ("metriport-carequality/dq_error.xml", PARTIAL_SUCCESS, 0, ["XDSRegistryError"]),
])
def test_sample_responses_parse(samples: Path, name: str, status: str, n_entries: int, codes: list[str]) -> None:
    r = iti38.parse_response(load(samples, f"{XCQ}/{name}"))
    assert r.status == status and len(r.entries) == n_entries and r.problems == []
    assert [e.code for e in r.errors] == codes


def test_unreadable_entry_is_reported_not_raised() -> None:
    el = iti38.build_response([entry(1), entry(2)], return_type="LeafClass", home_community_id=HCID)
    second = list(el.iter(ns.q(ns.RIM, "ExtrinsicObject")))[1]
    for ei in list(second.iter(ns.q(ns.RIM, "ExternalIdentifier"))):
        second.remove(ei)
    r = iti38.parse_response(el)
    assert [e.unique_id for e in r.entries] == ["2.25.1"] and len(r.problems) == 1


def test_entries_without_home_are_flagged() -> None:
    el = iti38.build_response([entry(1)], return_type="LeafClass", home_community_id=HCID)
    del next(el.iter(ns.q(ns.RIM, "ExtrinsicObject"))).attrib["home"]
    assert [e.unique_id for e in iti38.parse_response(el).entries_without_home] == ["2.25.1"]


# ------------------------------------------------------------------------------------------------
# filter_entries
# ------------------------------------------------------------------------------------------------

def unique_ids(entries: list[DocumentEntry], **params: Any) -> list[str]:
    f = FindDocumentsParams(patient_id=PID, entry_types=(STABLE, ON_DEMAND))
    return [e.unique_id for e in iti38.filter_entries(entries, dataclasses.replace(f, **params))]


def test_filter_patient_status_and_type() -> None:
    entries = [entry(1), entry(2, patient_id="OTHER^^^&2.999.1.1&ISO"), entry(3, patient_id="PAT-1^^^&9.9&ISO"),
               entry(4, availability_status=STATUS_DEPRECATED), entry(5, object_type=STABLE)]
    assert unique_ids(entries) == ["2.25.1", "2.25.5"]
    assert unique_ids(entries, statuses=(STATUS_DEPRECATED,)) == ["2.25.4"]
    assert unique_ids(entries, statuses=(STATUS_APPROVED, STATUS_DEPRECATED)) == ["2.25.1", "2.25.4", "2.25.5"]
    assert unique_ids(entries, entry_types=(STABLE,)) == ["2.25.5"]
    assert unique_ids(entries, entry_types=(ON_DEMAND,)) == ["2.25.1"]
    # default entry type (parameter absent) is Stable only
    q = iti38.parse_query(adhoc(FD, BASE))
    assert [e.unique_id for e in iti38.filter_entries(entries, q)] == ["2.25.5"]


@pytest.mark.parametrize(("field", "param"), [
    ("class_code", "class_codes"), ("type_code", "type_codes"), ("format_code", "format_codes"),
    ("practice_setting_code", "practice_setting_codes"),
    ("healthcare_facility_type_code", "healthcare_facility_type_codes"),
])
def test_filter_single_codes_match_code_and_scheme(field: str, param: str) -> None:
    a, b, a_other_scheme = Code("A", "1.1"), Code("B", "1.1"), Code("A", "9.9")
    entries = [entry(1, **{field: a}), entry(2, **{field: b}), entry(3, **{field: a_other_scheme}),
               entry(4, **{field: None})]
    assert unique_ids(entries, **{param: (Code("A", "1.1", "display ignored"),)}) == ["2.25.1"]
    assert unique_ids(entries, **{param: (a, b)}) == ["2.25.1", "2.25.2"]
    assert unique_ids(entries, **{param: ()}) == ["2.25.1", "2.25.2", "2.25.3", "2.25.4"]


@pytest.mark.parametrize(("field", "param"), [("event_codes", "event_codes"),
                                              ("confidentiality_codes", "confidentiality_codes")])
def test_filter_and_of_ors(field: str, param: str) -> None:
    a, b, c = Code("a", "s"), Code("b", "s"), Code("c", "s")
    entries = [entry(1, **{field: (a,)}), entry(2, **{field: (b, c)}), entry(3, **{field: (a, c)}),
               entry(4, **{field: ()})]
    assert unique_ids(entries, **{param: ((a, b),)}) == ["2.25.1", "2.25.2", "2.25.3"]
    assert unique_ids(entries, **{param: ((a,), (c,))}) == ["2.25.3"]
    assert unique_ids(entries, **{param: ((a, b), (c,))}) == ["2.25.2", "2.25.3"]


@pytest.mark.parametrize(("low", "high", "expected"), [
    ("20240101120000", None, ["2.25.2", "2.25.3"]),            # From inclusive
    (None, "20240101120000", ["2.25.1"]),                       # To exclusive
    ("2024", "2025", ["2.25.2", "2.25.3"]),                     # coarser precision padded
    ("20240101", "20240101120001", ["2.25.2"]),
    ("2030", None, []),
])
def test_filter_creation_time_range(low: str | None, high: str | None, expected: list[str]) -> None:
    entries = [entry(1, object_type=STABLE, creation_time="20231231235959"),
               entry(2, object_type=STABLE, creation_time="20240101120000"),
               entry(3, object_type=STABLE, creation_time="2024-06-01T00:00:00Z"),
               entry(4, object_type=STABLE, creation_time=None)]
    assert unique_ids(entries, creation_time_from=low, creation_time_to=high) == expected


def test_filter_creation_time_ignored_for_on_demand() -> None:
    entries = [entry(1, object_type=ON_DEMAND, creation_time="19990101"), entry(2, object_type=STABLE,
                                                                                creation_time="19990101")]
    assert unique_ids(entries, creation_time_from="2020") == ["2.25.1"]


@pytest.mark.parametrize(("field", "low_p", "high_p"), [
    ("service_start_time", "service_start_time_from", "service_start_time_to"),
    ("service_stop_time", "service_stop_time_from", "service_stop_time_to"),
])
def test_filter_service_times(field: str, low_p: str, high_p: str) -> None:
    entries = [entry(1, **{field: "20200101"}), entry(2, **{field: "202001011200"}), entry(3, **{field: "2021"}),
               entry(4, service_start_time=None, service_stop_time=None)]
    # missing service time ⇒ parameter not used for that entry [ITI TF-2 3.18.4.1.2.3.3.1]
    assert unique_ids(entries, **{low_p: "202001011200"}) == ["2.25.2", "2.25.3", "2.25.4"]
    assert unique_ids(entries, **{high_p: "202001011200"}) == ["2.25.1", "2.25.4"]
    assert unique_ids(entries, **{low_p: "2020", high_p: "2021"}) == ["2.25.1", "2.25.2", "2.25.4"]


def test_filter_author_person_like() -> None:
    entries = [entry(1, authors=(Author(person="^Smitty^Gerald^^^"),)),
               entry(2, authors=(Author(person="^Dopplemeyer^Sherry^^^"), Author(person="^Smith^Ann"))),
               entry(3, authors=())]
    assert unique_ids(entries, author_persons=("%Smitty%",)) == ["2.25.1"]
    assert unique_ids(entries, author_persons=("^Smit__%",)) == ["2.25.1", "2.25.2"]
    assert unique_ids(entries, author_persons=("%Sherry%", "%Gerald%")) == ["2.25.1", "2.25.2"]
    assert unique_ids(entries, author_persons=("%smitty%",)) == []  # case-sensitive
    assert unique_ids(entries, author_persons=("^Smith",)) == []  # whole-value match


def test_filter_reference_ids() -> None:
    acc = ebrim.accession_reference_id("ACC1", "2.999.3")
    entries = [entry(1), entry(2, reference_ids=(ebrim.study_reference_id("1.2.3.2"), acc)), entry(3, reference_ids=())]
    study2 = ebrim.study_reference_id("1.2.3.2")
    assert unique_ids(entries, reference_ids=((study2,),)) == ["2.25.2"]
    assert unique_ids(entries, reference_ids=((study2, ebrim.study_reference_id("1.2.3.1")),)) == ["2.25.1", "2.25.2"]
    assert unique_ids(entries, reference_ids=((study2,), (acc,))) == ["2.25.2"]
    assert unique_ids(entries, reference_ids=((ebrim.study_reference_id("1.2.3.1"),), (acc,))) == []


def test_filter_from_parsed_query_and_get_documents_selection() -> None:
    entries = [entry(1), entry(2, format_code=Code("urn:ihe:pcc:xphr:2007", "1.3.6.1.4.1.19376.1.2.3"))]
    q = iti38.parse_query(iti38.build_query(iti38.find_documents_for_kos(PID)))
    assert [e.unique_id for e in iti38.filter_entries(entries, q)] == ["2.25.1"]
    g = iti38.parse_query(iti38.build_query(GetDocumentsParams(home_community_id=HCID, unique_ids=("2.25.2",))))
    assert [e.unique_id for e in iti38.select_entries(entries, g)] == ["2.25.2"]
    with pytest.raises(ValueError):
        iti38.filter_entries(entries, g)
