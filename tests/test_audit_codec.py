"""The DICOM PS3.15 A.5 audit message codec: serialize / parse / validate against the shipped schema."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lxml import etree

from gateway.audit import xml as audit_xml
from gateway.audit.model import (
    MINOR_FAILURE,
    AuditMessage,
    AuditSource,
    Code,
    Participant,
    ParticipantObject,
)
from gateway.audit.xml import AuditParseError, AuditSchemaError, parse, serialize, validate

DATA = Path(__file__).parent / "data" / "audit"
WHEN = dt.datetime(2024, 5, 1, 14, 3, 7, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def full_message() -> AuditMessage:
    """A message using every field of the model, with awkward values."""
    return AuditMessage(
        event_id=Code("110107", "DCM", "Import"),
        action="C",
        outcome=MINOR_FAILURE,
        when=WHEN,
        source=AuditSource("XIG-A", enterprise_site_id="urn:oid:2.999.1", type_codes=("4", "9")),
        participants=(
            Participant("https://b.example.org/ihe/xca/retrieve", False, (Code("110153", "DCM", "Source Role ID"),),
                        network_access_point="b.example.org", network_access_point_type="1"),
            Participant("http://www.w3.org/2005/08/addressing/anonymous", True,
                        (Code("110152", "DCM", "Destination Role ID"),), alternative_user_id="4242",
                        network_access_point="10.1.2.3", network_access_point_type="2"),
            Participant("Dr. Jane Q. Öztürk", True,
                        (Code("224608005", "SNOMED_CT", "Administrative healthcare staff"),
                         Code("R1", "2.999.9", "Second role")),
                        user_name="JQ<jane@idp.example.org>"),
        ),
        objects=(
            ParticipantObject("DOE-1^^^&2.999.1.1&ISO", Code("2", "RFC-3881", "Patient Number"), type_code="1",
                              role="1", name="DOE^JANE"),
            ParticipantObject("1.2.3.4.5", Code("9", "RFC-3881", "Report Number"), type_code="2", role="3",
                              lifecycle="2", name="1.2.3.4.5",
                              details=(("Repository Unique ID", b"2.999.1.2"),
                                       ("binary", b"\x00\xff<x>&\n"))),
            ParticipantObject("", Code("ITI-38", "IHE Transactions", "Cross Gateway Query"), type_code="2",
                              role="24", query=b"<AdhocQueryRequest>\x00 & </AdhocQueryRequest>",
                              details=(("QueryEncoding", b"UTF-8"),)),
            ParticipantObject("1.2.840.99.1", Code("110180", "DCM", "Study Instance UID"), type_code="2", role="3",
                              name="1.2.840.99.1", sop_classes=(("1.2.840.10008.5.1.4.1.1.2", 120), ("", 3)),
                              accession_numbers=("ACC-1", "ACC 2")),
        ),
        event_types=(Code("ITI-39", "IHE Transactions", "Cross Gateway Retrieve"),),
        purposes_of_use=(Code("TREATMENT", "2.16.840.1.113883.3.18.7.1", "Treatment"),
                         Code("EMERGENCY", "2.16.840.1.113883.3.18.7.1", "Emergency")),
        outcome_description="1 document not delivered:\n  XDSDocumentUniqueIdError <&> \"quoted\"",
    )


def test_round_trip_of_every_field_and_valid() -> None:
    message = full_message()
    data = serialize(message)
    validate(data)
    assert parse(data) == message
    # and again: the bytes are stable
    assert serialize(parse(data)) == data


def test_serialized_form_matches_the_schema_layout() -> None:
    data = serialize(full_message())
    assert not data.startswith(b"<?xml")
    root = etree.fromstring(data)
    assert [c.tag for c in root] == (["EventIdentification"] + ["ActiveParticipant"] * 3
                                     + ["AuditSourceIdentification"] + ["ParticipantObjectIdentification"] * 4)
    event = root[0]
    assert [c.tag for c in event] == ["EventID", "EventTypeCode", "EventOutcomeDescription", "PurposeOfUse",
                                      "PurposeOfUse"]
    assert event.get("EventDateTime") == "2024-05-01T14:03:07.123456+02:00"
    assert event.get("EventOutcomeIndicator") == "4"
    assert dict(event[0].attrib) == {"csd-code": "110107", "codeSystemName": "DCM", "originalText": "Import"}
    query = root.findall("ParticipantObjectIdentification")[2]
    assert [c.tag for c in query] == ["ParticipantObjectIDTypeCode", "ParticipantObjectQuery",
                                      "ParticipantObjectDetail"]
    assert base64.b64decode(query.findtext("ParticipantObjectQuery") or "") == \
        b"<AdhocQueryRequest>\x00 & </AdhocQueryRequest>"
    detail = root.findall("ParticipantObjectIdentification")[1].findall("ParticipantObjectDetail")[1]
    assert base64.b64decode(detail.get("value") or "") == b"\x00\xff<x>&\n"
    study = root.findall("ParticipantObjectIdentification")[3]
    description = study.find("ParticipantObjectDescription")
    assert description is not None
    assert [c.tag for c in description] == ["Accession", "Accession", "SOPClass", "SOPClass"]
    assert description[2].attrib == {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": "120"}
    assert "UID" not in description[3].attrib
    sources = root.find("AuditSourceIdentification")
    assert sources is not None and [t.get("csd-code") for t in sources] == ["4", "9"]


def test_characters_xml_cannot_carry_are_replaced_and_the_message_stays_valid() -> None:
    message = AuditMessage(Code("110112", "DCM", "Query"), "E", 8, WHEN, AuditSource("XIG"),
                           (Participant("peer\x01", True),), outcome_description="bad\x00byte\x1b")
    data = serialize(message)
    validate(data)
    back = parse(data)
    assert back.outcome_description == "bad\ufffdbyte\ufffd"
    assert back.participants[0].user_id == "peer\ufffd"


def test_serialize_refuses_what_the_schema_cannot_express() -> None:
    naive = AuditMessage(Code("110112", "DCM", "Query"), "E", 0, dt.datetime(2024, 1, 1), AuditSource("X"),
                         (Participant("a", True),))
    with pytest.raises(ValueError, match="time zone"):
        serialize(naive)
    both = AuditMessage(Code("110112", "DCM", "Query"), "E", 0, WHEN, AuditSource("X"), (Participant("a", True),),
                        objects=(ParticipantObject("q", Code("10", "RFC-3881", "Search Criteria"), name="n",
                                               query=b"q"),))
    with pytest.raises(ValueError, match="both a name and a query"):
        serialize(both)


def test_validate_rejects_a_message_without_event_identification() -> None:
    data = serialize(full_message())
    root = etree.fromstring(data)
    root.remove(root[0])
    with pytest.raises(AuditSchemaError) as err:
        validate(etree.tostring(root))
    # libxml2 reports where the sequence breaks: the first ActiveParticipant stands where
    # EventIdentification must be
    assert err.value.problems == ("line 1: Did not expect element ActiveParticipant there",)
    assert isinstance(err.value, ValueError)


def test_validate_rejects_a_bad_event_action_code() -> None:
    root = etree.fromstring(serialize(full_message()))
    root[0].set("EventActionCode", "X")
    with pytest.raises(AuditSchemaError) as err:
        validate(etree.tostring(root))
    assert any("EventActionCode" in p for p in err.value.problems), err.value.problems
    with pytest.raises(AuditParseError, match="EventActionCode 'X'"):
        parse(etree.tostring(root))


def test_validate_rejects_an_object_without_name_or_query_and_an_unknown_element() -> None:
    root = etree.fromstring(serialize(full_message()))
    patient = root.findall("ParticipantObjectIdentification")[0]
    patient.remove(patient.find("ParticipantObjectName"))
    with pytest.raises(AuditSchemaError, match="ParticipantObjectName"):
        validate(etree.tostring(root))
    root = etree.fromstring(serialize(full_message()))
    etree.SubElement(root[0], "Bogus")
    with pytest.raises(AuditSchemaError, match="Bogus"):
        validate(etree.tostring(root))


def test_purpose_of_use_is_the_ihe_extension_of_the_dicom_schema() -> None:
    with_purpose = serialize(full_message())
    validate(with_purpose)  # profile "ihe"
    with pytest.raises(AuditSchemaError, match="Element EventIdentification has extra content"):
        validate(with_purpose, profile="dicom")
    validate(serialize(dataclasses.replace(full_message(), purposes_of_use=())), profile="dicom")


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE AuditMessage [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<AuditMessage><EventIdentification EventActionCode="E" EventDateTime="2024-01-01T00:00:00Z"
 EventOutcomeIndicator="0"><EventID csd-code="110112" codeSystemName="DCM" originalText="&lol3;"/>
</EventIdentification></AuditMessage>"""

XXE = b"""<!DOCTYPE AuditMessage [<!ENTITY x SYSTEM "file:///etc/passwd">]><AuditMessage>&x;</AuditMessage>"""


@pytest.mark.parametrize("data", [BILLION_LAUGHS, XXE], ids=["billion-laughs", "xxe"])
def test_parse_and_validate_refuse_dtds_and_entities(data: bytes) -> None:
    with pytest.raises(AuditParseError, match="DTDs and entity declarations are not allowed"):
        parse(data)
    with pytest.raises(AuditSchemaError, match="DTDs and entity declarations are not allowed"):
        validate(data)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.replace(b"<AuditMessage>", b"<Audit>").replace(b"</AuditMessage>", b"</Audit>"),
     "root element is 'Audit'"),
    (lambda d: d[:-20], "not well-formed"),
    (lambda d: d.replace(b'UserID="https://b.example.org/ihe/xca/retrieve" ', b""), "ActiveParticipant has no UserID"),
    (lambda d: d.replace(b'EventOutcomeIndicator="4"', b'EventOutcomeIndicator="5"'), "EventOutcomeIndicator '5'"),
    (lambda d: d.replace(b'value="Mi45OTkuMS4y"', b'value="not base64!"'), "not base64"),
    (lambda d: d.replace(b"2024-05-01T14:03:07.123456+02:00", b"yesterday"), "not an xsd:dateTime"),
    (lambda d: d.replace(b'UserIsRequestor="true"', b'UserIsRequestor="yes"', 1), "not an xsd:boolean"),
    (lambda d: b"", "empty XML document"),
])
def test_parse_names_the_problem(mutate: object, message: str) -> None:
    data = mutate(serialize(full_message()))  # type: ignore[operator]
    with pytest.raises(AuditParseError, match=message):
        parse(data)


def test_parse_is_lenient_where_editions_differ() -> None:
    old = (b'<AuditMessage><EventIdentification EventActionCode="R" EventDateTime="2010-03-09T10:17:39"'
           b' EventOutcomeIndicator="0"><EventID code="110106" codeSystemName="DCM" displayName="Export"/>'
           b'</EventIdentification><ActiveParticipant UserID="a" UserIsRequestor="1"/>'
           b'<AuditSourceIdentification AuditSourceID="s"><AuditSourceTypeCode code="4"/>'
           b'</AuditSourceIdentification></AuditMessage>')
    message = parse(old)
    assert message.event_id == Code("110106", "DCM", "Export")
    assert message.when == dt.datetime(2010, 3, 9, 10, 17, 39, tzinfo=dt.UTC)
    assert message.participants[0].is_requestor is True
    assert message.source.type_codes == ("4",)
    # but it is not the current schema: RFC 3881's "code" is no csd-code attribute
    with pytest.raises(AuditSchemaError, match="Element EventID failed to validate attributes"):
        validate(old)


def test_real_application_start_sample_validates_and_parses() -> None:
    data = (DATA / "ipf-start.xml").read_bytes()
    validate(data)
    validate(data, profile="dicom")
    message = parse(data)
    assert message.event_id.code == "110100" and message.action == "E" and message.outcome == 0
    assert message.event_types == (Code("110120", "DCM", "Application Start"),)
    assert message.when == dt.datetime(2020, 3, 9, 10, 17, 39, 575000, tzinfo=dt.UTC)
    assert [(p.user_id, p.is_requestor, p.roles[0].code) for p in message.participants] == [
        ("", False, "110150"), ("WDF-LAP-1237$", True, "110151")]
    assert message.participants[0].network_access_point_type == "2"
    assert message.source.source_id == "app-connect" and message.source.type_codes == ("9",)
    validate(serialize(message))
    assert parse(serialize(message)) == message


def test_real_xcpd_sample_parses_and_only_lacks_the_patient_name() -> None:
    data = (DATA / "ipf-xcpd.xml").read_bytes()
    message = parse(data)
    assert message.event_types[0].code == "ITI-55"
    patient, query = message.objects
    assert (patient.object_id, patient.type_code, patient.role) == \
        ("IHERED-1040^^^IHERED&1.3.6.1.4.1.21367.13.20.1000&ISO", "1", "1")
    assert patient.name is None and patient.query is None
    assert query.query is not None and query.query.startswith(b"<queryByParameter>")
    assert query.details == (("ihe:homeCommunityID", b"1.3.6.1.4.1.21367.2011.2.6.181"),)
    assert message.outcome_description == ""
    with pytest.raises(AuditSchemaError) as err:
        validate(data)
    assert "line 17: Expecting an element ParticipantObjectName, got nothing" in err.value.problems
    # the only deviation: with the patient object named, IPF's message is valid
    root = etree.fromstring(data.split(b"?>", 1)[1])
    name = etree.Element("ParticipantObjectName")
    name.text = patient.object_id
    root.findall("ParticipantObjectIdentification")[0].append(name)
    validate(etree.tostring(root))


def test_validation_is_safe_from_several_threads() -> None:
    good = serialize(full_message())
    bad_root = etree.fromstring(good)
    bad_root[0].set("EventActionCode", "X")
    bad = etree.tostring(bad_root)

    def check(i: int) -> bool:
        try:
            validate(good if i % 2 else bad)
        except AuditSchemaError as exc:
            assert any("EventActionCode" in p for p in exc.problems)
            return False
        return True

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, range(200)))
    assert results == [i % 2 == 1 for i in range(200)]


def test_schema_files_are_the_shipped_ones() -> None:
    assert audit_xml.schema_path().name == "ihe-audit-message.rng"
    assert audit_xml.schema_path("dicom").read_bytes().count(b'<element name="PurposeOfUse">') == 0
    assert b'<include href="dicom-audit-message.rng"/>' in audit_xml.schema_path().read_bytes()
