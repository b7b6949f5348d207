"""DocumentEntry ↔ rim:ExtrinsicObject: real metadata samples, round trips, identifier and DTM helpers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.ihe import ebrim, iti38
from gateway.ihe.ebrim import (
    CX,
    ON_DEMAND,
    STABLE,
    Author,
    Code,
    DocumentEntry,
    MetadataError,
    SourcePatientInfo,
)
from gateway.pacs.base import PatientRecord, StudyInfo
from gateway.soap import ns, xml
from gateway.soap.schema import default_schemas

XCQ = "messages/iti38-xca-query"
MANIFEST = f"{XCQ}/nist-toolkit/xdsi-manifest/metadata-IDCDEPT001-a.xml"
HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.201"


def load(samples: Path, name: str) -> etree._Element:
    root = xml.parse((samples / name).read_bytes())
    if etree.QName(root).localname == "Envelope":
        return root.find(ns.q(ns.SOAP12, "Body"))[0]
    return root


def kos_entry(**changes: Any) -> DocumentEntry:
    entry = DocumentEntry(
        entry_uuid="urn:uuid:1f0c6b52-8f3e-4c1c-9a39-3f1c2b9a6d10",
        unique_id="2.25.1234567890",
        patient_id="PAT-1^^^&2.999.1.1&ISO",
        mime_type=ebrim.MIME_DICOM,
        object_type=ON_DEMAND,
        home_community_id="urn:oid:2.999.1",
        repository_unique_id="2.999.1.2",
        source_patient_id="LOCAL-7^^^&2.999.7&ISO",
        source_patient_info=SourcePatientInfo(("LOCAL-7^^^&2.999.7&ISO",), "Doe^Jane", "19700101", "F"),
        class_code=Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images"),
        type_code=Code("18748-4", ebrim.LOINC_OID, "Diagnostic imaging study"),
        format_code=ebrim.KOS_FORMAT_CODE,
        practice_setting_code=Code("394914008", ebrim.SNOMED_CT_OID, "Radiology"),
        healthcare_facility_type_code=Code("22232009", ebrim.SNOMED_CT_OID, "Hospital"),
        confidentiality_codes=(Code("N", ebrim.CONFIDENTIALITY_OID, "Normal"),),
        event_codes=(Code("CT", ebrim.DCM_OID, "Computed Tomography"), Code("MR", ebrim.DCM_OID)),
        creation_time="20240102030405",
        service_start_time="20231231",
        service_stop_time="202312312359",
        language_code="en-US",
        reference_ids=(ebrim.study_reference_id("1.2.3.4.5"), ebrim.accession_reference_id("ACC1", "2.999.3")),
        title="CT chest",
        comments="manifest of study 1.2.3.4.5",
        authors=(Author(person="^Smitty^Gerald", institutions=("Radiology Dept^^^^^^^^^2.999.4",),
                        roles=("Radiologist",), specialties=("Radiology",), telecommunications=("^^Internet^a@b.c",)),),
    )
    return dataclasses.replace(entry, **changes) if changes else entry


def in_response(*objects: etree._Element) -> etree._Element:
    """An AdhocQueryResponse wrapping ExtrinsicObjects, for XSD validation."""
    resp = etree.Element(ns.q(ns.QUERY, "AdhocQueryResponse"), nsmap={"query": ns.QUERY, "rim": ns.RIM},
                         status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success")
    lst = etree.SubElement(resp, ns.q(ns.RIM, "RegistryObjectList"))
    for o in objects:
        lst.append(o)
    return resp


# ------------------------------------------------------------------------------------------------
# Real metadata
# ------------------------------------------------------------------------------------------------

def test_nist_xdsi_manifest_metadata_parses_with_classifications(samples: Path) -> None:
    root = load(samples, MANIFEST)
    [eo] = ebrim.find_extrinsic_objects(root)
    e = ebrim.parse_extrinsic_object(eo)
    assert e.entry_uuid == "Document01"  # symbolic id of submission metadata kept verbatim
    assert e.unique_id == "2.25.90214658647374166344513344800740950001"
    assert e.patient_cx == CX("IDCAD001-a", "1.3.6.1.4.1.21367.2005.13.20.1000")
    assert e.mime_type == "application/dicom"
    assert e.object_type == STABLE
    assert e.class_code == Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")
    assert e.type_code == Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic Imaging Study")
    assert e.format_code is not None and e.format_code.same_concept(ebrim.KOS_FORMAT_CODE)
    assert e.confidentiality_codes == (Code("R", "2.16.840.1.113883.5.25", "Restricted"),)
    assert e.healthcare_facility_type_code == Code("22232009", "2.16.840.1.113883.6.96", "Hospital")
    assert e.practice_setting_code == Code("Practice-A", "1.3.6.1.4.1.21367.2017.3", "Radiology")
    assert e.event_codes == (Code("CT", "1.2.840.10008.2.16.4", "Computed Tomography"),
                             Code("R-FAB55", "2.16.840.1.113883.6.96", "Chest and Abdomen"))
    assert [a.person for a in e.authors] == ["^Smitty^Gerald^^^", "^Dopplemeyer^Sherry^^^"]
    assert e.authors[0].institutions == ("Cleveland Clinic", "Parma Community")
    assert e.authors[1].roles == ("Radiologist",) and e.authors[1].specialties == ("Radiology",)
    assert e.creation_time == "20160922153918"
    assert (e.service_start_time, e.service_stop_time) == ("200612230800", "200612230900")
    assert e.language_code == "en-us" and e.title == "DocA" and e.comments is None
    assert e.source_patient_id == "IDCDEPT001-a^^^&1.3.6.1.4.1.21367.1800.13.20.1000&ISO"
    spi = e.source_patient_info
    assert spi is not None
    assert spi.identifiers == ("IDCDEPT001-a^^^&1.3.6.1.4.1.21367.1800.13.20.1000&ISO",)
    assert (spi.name, spi.birth_date, spi.sex) == ("Computed-Radiography^Single^a^^^", "19780201", "M")
    assert spi.other == ("PID-11|100 Main St^^Metropolis^Il^44130^USA",)
    assert e.size is None and e.hash is None and e.repository_unique_id is None and e.home_community_id is None


def test_nist_query_response_entries_parse(samples: Path) -> None:
    root = load(samples, f"{XCQ}/nist-toolkit/soap-xcq-resp.xml")
    entries = [ebrim.parse_extrinsic_object(eo) for eo in ebrim.find_extrinsic_objects(root)]
    assert [e.title for e in entries] == ["DocA", "DocF"]
    e = entries[0]
    assert e.entry_uuid == "urn:uuid:974330cc-26ff-4ef8-aca5-f71efc3f1fb0"
    assert e.home_community_id == "urn:oid:2.3.4"
    assert e.unique_id == "1.42.20100312104638.15"
    assert e.size == 36 and e.hash == "e543712c0e10501972de13a5bfcbe826c49feb75"
    assert e.repository_unique_id == "1.19.6.24.109.42.1"
    assert e.class_code == Code("History and Physical", "Connect-a-thon classCodes", "History and Physical")
    assert [c.code for c in e.event_codes] == ["T-D4909", "T-62002"]
    assert len(e.authors) == 2
    assert e.other_slots == (("URI", ("http://129.6.24.109:9080/XdsDocs/testdata/my_document.txt",)),)


def test_metriport_on_demand_entries_parse(samples: Path) -> None:
    root = load(samples, f"{XCQ}/metriport-carequality/dq_multiple_docs.xml")
    entries = [ebrim.parse_extrinsic_object(eo) for eo in ebrim.find_extrinsic_objects(root)]
    assert len(entries) == 2
    e = entries[0]
    assert e.is_on_demand and e.entry_uuid == "018e81dd-ddaf-7d7c-b02c-d8a145ebb0c8"
    assert e.creation_time == "2024-03-27T21:43:04.878Z"
    assert ebrim.normalize_dtm(e.creation_time) == "20240327214304"
    assert e.format_code == Code("urn:ihe:pcc:xphr:2007", "1.3.6.1.4.1.19376.1.2.3", "Continuity of Care Document")
    assert e.authors[0].person.startswith("Jonah Inc")
    assert e.patient_cx == CX("123456789", "2.16.840.1.113883.3.9621")


@pytest.mark.parametrize("name", [MANIFEST, f"{XCQ}/nist-toolkit/soap-xcq-resp.xml",
                                  f"{XCQ}/metriport-carequality/dq_multiple_docs.xml"])
def test_sample_entries_survive_build_parse(samples: Path, name: str) -> None:
    for eo in ebrim.find_extrinsic_objects(load(samples, name)):
        entry = ebrim.parse_extrinsic_object(eo)
        if entry.is_on_demand:  # size/hash are not written for On-Demand entries
            entry = dataclasses.replace(entry, size=None, hash=None)
        entry = dataclasses.replace(entry, entry_uuid=ebrim.entry_uuid_for(entry.unique_id))
        built = ebrim.build_extrinsic_object(entry, home_community_id=HCID)
        again = ebrim.parse_extrinsic_object(built)
        assert again == dataclasses.replace(entry, home_community_id=entry.home_community_id or HCID)
        assert default_schemas().errors(in_response(built)) == []


# ------------------------------------------------------------------------------------------------
# Round trips of our own entries
# ------------------------------------------------------------------------------------------------

def test_full_kos_entry_round_trip_and_schema() -> None:
    entry = kos_entry()
    el = ebrim.build_extrinsic_object(entry)
    assert ebrim.parse_extrinsic_object(el) == entry
    assert default_schemas().errors(in_response(el)) == []
    # exact scheme UUIDs on the wire
    schemes = {c.get("classificationScheme") for c in el.iter(ns.q(ns.RIM, "Classification"))}
    assert schemes == {ebrim.AUTHOR_SCHEME, ebrim.CLASS_CODE_SCHEME, ebrim.CONFIDENTIALITY_CODE_SCHEME,
                       ebrim.EVENT_CODE_SCHEME, ebrim.FORMAT_CODE_SCHEME, ebrim.HEALTHCARE_FACILITY_TYPE_CODE_SCHEME,
                       ebrim.PRACTICE_SETTING_CODE_SCHEME, ebrim.TYPE_CODE_SCHEME}
    ids = {e.get("identificationScheme"): e.get("value") for e in el.iter(ns.q(ns.RIM, "ExternalIdentifier"))}
    assert ids == {ebrim.PATIENT_ID_SCHEME: "PAT-1^^^&2.999.1.1&ISO", ebrim.UNIQUE_ID_SCHEME: "2.25.1234567890"}
    slots = {s.get("name") for s in el.iterchildren(ns.q(ns.RIM, "Slot"))}
    assert "urn:ihe:iti:xds:2013:referenceIdList" in slots
    assert el.get("home") == "urn:oid:2.999.1" and el.get("objectType") == ON_DEMAND
    # deterministic serialisation (stable child ids)
    assert etree.tostring(ebrim.build_extrinsic_object(entry)) == etree.tostring(ebrim.build_extrinsic_object(entry))


def test_on_demand_entry_omits_size_and_hash_stable_keeps_them() -> None:
    od = ebrim.build_extrinsic_object(kos_entry(size=10, hash="ab" * 20))
    names = {s.get("name") for s in od.iterchildren(ns.q(ns.RIM, "Slot"))}
    assert "size" not in names and "hash" not in names
    stable = kos_entry(object_type=STABLE, size=0, hash=ebrim.EMPTY_SHA1)
    assert ebrim.parse_extrinsic_object(ebrim.build_extrinsic_object(stable)) == stable


def test_minimal_entry_round_trip() -> None:
    e = DocumentEntry(entry_uuid="urn:uuid:00000000-0000-4000-8000-000000000001", unique_id="1.2.3",
                      patient_id="p^^^&1.2&ISO", mime_type="text/xml")
    el = ebrim.build_extrinsic_object(e, home_community_id="1.2.3")
    assert el.get("home") == "urn:oid:1.2.3"
    assert ebrim.parse_extrinsic_object(el) == dataclasses.replace(e, home_community_id="urn:oid:1.2.3")


def test_missing_unique_id_or_patient_id_is_a_metadata_error() -> None:
    el = ebrim.build_extrinsic_object(kos_entry())
    for scheme in (ebrim.UNIQUE_ID_SCHEME, ebrim.PATIENT_ID_SCHEME):
        copy = etree.fromstring(etree.tostring(el))
        for ei in list(copy.iter(ns.q(ns.RIM, "ExternalIdentifier"))):
            if ei.get("identificationScheme") == scheme:
                copy.remove(ei)
        with pytest.raises(MetadataError):
            ebrim.parse_extrinsic_object(copy)


def test_code_without_coding_scheme_is_a_metadata_error() -> None:
    el = ebrim.build_extrinsic_object(kos_entry())
    for cl in el.iter(ns.q(ns.RIM, "Classification")):
        if cl.get("classificationScheme") == ebrim.TYPE_CODE_SCHEME:
            cl.remove(cl.find(ns.q(ns.RIM, "Slot")))
    with pytest.raises(MetadataError, match="codingScheme"):
        ebrim.parse_extrinsic_object(el)


# ------------------------------------------------------------------------------------------------
# Identifier and time helpers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("c4d77e21d0dd487^^^&1.3.6.1.4.1.21367.2005.3.7&ISO", CX("c4d77e21d0dd487", "1.3.6.1.4.1.21367.2005.3.7")),
    ("id^^^NS&1.2.3&ISO", CX("id", "1.2.3")),
    ("id^^^NS", CX("id", "NS")),
    ("id", CX("id", "")),
    (" id^^^&1.2&ISO ", CX("id", "1.2")),
])
def test_parse_cx(value: str, expected: CX) -> None:
    assert ebrim.parse_cx(value) == expected


def test_format_cx_and_errors() -> None:
    assert ebrim.format_cx("A1", "1.2.3") == "A1^^^&1.2.3&ISO"
    assert str(CX("A1", "1.2.3")) == "A1^^^&1.2.3&ISO"
    assert ebrim.parse_cx(str(CX("x&y", "1.2"))).id == "x&y"
    with pytest.raises(MetadataError):
        ebrim.parse_cx("^^^&1.2&ISO")


def test_reference_ids() -> None:
    assert ebrim.study_reference_id("1.2.3") == "1.2.3^^^^urn:ihe:iti:xds:2016:studyInstanceUID"
    assert ebrim.accession_reference_id("ACC9", "2.999.3") == "ACC9^^^&2.999.3&ISO^urn:ihe:iti:xds:2013:accession"
    r = ebrim.parse_reference_id("ACC9^^^&2.999.3&ISO^urn:ihe:iti:xds:2013:accession")
    assert r == ebrim.ReferenceId("ACC9", ebrim.REFERENCE_ID_ACCESSION, "2.999.3")
    assert str(r) == "ACC9^^^&2.999.3&ISO^urn:ihe:iti:xds:2013:accession"
    study = StudyInfo("1.2.840.1", PatientRecord("P1"), AccessionNumber="A77", AccessionNumberIssuer="2.999.5")
    assert ebrim.study_reference_ids(study) == ("1.2.840.1^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
                                                "A77^^^&2.999.5&ISO^urn:ihe:iti:xds:2013:accession")
    assert ebrim.study_reference_ids(StudyInfo("1.2.840.2", PatientRecord("P1"))) == (
        "1.2.840.2^^^^urn:ihe:iti:xds:2016:studyInstanceUID",)


@pytest.mark.parametrize(("value", "expected"), [
    ("1.2.3", "urn:oid:1.2.3"),
    ("urn:oid:1.2.3", "urn:oid:1.2.3"),
    (" URN:OID:1.2.3 ", "urn:oid:1.2.3"),
    ("\n  urn:oid:2.16.840.1.113883.3.9621\n", "urn:oid:2.16.840.1.113883.3.9621"),
    ("urn:uuid:abc", "urn:uuid:abc"),
])
def test_normalize_hcid(value: str, expected: str) -> None:
    assert ebrim.normalize_hcid(value) == expected
    assert ebrim.same_hcid(value, expected)


def test_hcid_oid() -> None:
    assert ebrim.hcid_oid("urn:oid:1.2.3") == "1.2.3" and ebrim.hcid_oid("1.2.3") == "1.2.3"


@pytest.mark.parametrize(("value", "expected"), [
    ("2016", "2016"),
    ("20160922153918", "20160922153918"),
    ("20160922153918.123", "20160922153918"),
    ("2024-03-27T21:43:04.878Z", "20240327214304"),
    ("2024-03-27T21:43:04+02:00", "20240327194304"),
    ("2024-03-27", "20240327"),
    ("202403272143+0100", "202403272043"),
    ("20240101003000-0130", "20240101020000"),
])
def test_normalize_dtm(value: str, expected: str) -> None:
    assert ebrim.normalize_dtm(value) == expected


@pytest.mark.parametrize("value", ["", "20", "2016-1", "yesterday", "201609221", "2016092215391800"])
def test_normalize_dtm_rejects(value: str) -> None:
    with pytest.raises(MetadataError):
        ebrim.normalize_dtm(value)


@pytest.mark.parametrize(("da", "tm", "offset", "expected"), [
    ("20240102", "", None, "20240102"),
    ("20240102", "0304", None, "202401020304"),
    ("20240102", "030405.123456", None, "20240102030405"),
    ("20240102", "03:04:05", None, "20240102030405"),
    ("20240102", "0030", "+0100", "202401012330"),
    ("20240102", "233000", "-0500", "20240103043000"),
    ("", "1200", None, ""),
    ("2024010", "", None, ""),
])
def test_dtm_from_dicom(da: str, tm: str, offset: str | None, expected: str) -> None:
    assert ebrim.dtm_from_dicom(da, tm, offset) == expected


def test_dtm_key_pads_precision() -> None:
    assert ebrim.dtm_key("2016") == "20160000000000"
    assert ebrim.dtm_key("2016") < ebrim.dtm_key("201601") <= ebrim.dtm_key("20160100")


def test_source_patient_info_from_patient_record() -> None:
    spi = SourcePatientInfo.from_patient_record(
        PatientRecord("MRN1", "2.999.7", "Doe^Jane", "19700101", "F"))
    assert spi.values() == ["PID-3|MRN1^^^&2.999.7&ISO", "PID-5|Doe^Jane", "PID-7|19700101", "PID-8|F"]
    assert SourcePatientInfo.from_values(spi.values()) == spi


def test_entry_uuid_for_is_stable_urn_uuid() -> None:
    a = ebrim.entry_uuid_for("2.25.1")
    assert a == ebrim.entry_uuid_for("2.25.1") != ebrim.entry_uuid_for("2.25.2")
    assert a.startswith("urn:uuid:") and len(a) == 45


def test_entries_in_a_query_response_parse_back(samples: Path) -> None:
    entries = [kos_entry(), kos_entry(entry_uuid="urn:uuid:1f0c6b52-8f3e-4c1c-9a39-3f1c2b9a6d11", unique_id="2.25.2")]
    resp = iti38.build_response(entries, return_type="LeafClass", home_community_id="urn:oid:2.999.1")
    assert iti38.parse_response(resp).entries == entries
