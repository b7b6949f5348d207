"""ITI-55 (XCPD) codec: gateway.ihe.iti55 against the public IHE/NIST/Metriport samples and mutations."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime

import pytest
from lxml import etree

from gateway.errors import XIG_MALFORMED, SoapFault
from gateway.ihe import iti55
from gateway.ihe.iti55 import (
    II,
    Address,
    BirthTime,
    CannotAnswer,
    Iti55RequestError,
    Iti55ResponseError,
    MatchedPatient,
    Matches,
    MoreAttributesRequested,
    NoMatch,
    PatientDemographics,
    PatientDiscoveryQuery,
    PersonName,
    Telecom,
)
from gateway.soap import ns
from gateway.soap import xml as soap_xml
from gateway.soap.schema import default_schemas
from tests.conftest import SAMPLES

XCPD = SAMPLES / "messages" / "iti55-xcpd"
H = {"h": ns.HL7}
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def respond(q: PatientDiscoveryQuery, outcome: iti55.Outcome, now: datetime | None = NOW) -> etree._Element:
    """Our response as the responding gateway 2.999.1 (device 2.999.1.9, patient ids in 2.999.1.1)."""
    return iti55.build_response(
        q, outcome, responder_device_id="2.999.1.9", home_community_id="urn:oid:2.999.1",
        assigning_authority="2.999.1.1", now=now,
    )


def load(relative: str) -> etree._Element:
    return soap_xml.parse((XCPD / relative).read_bytes())


def body(relative: str) -> etree._Element:
    root = load(relative)
    if root.tag == ns.q(ns.SOAP12, "Envelope"):
        found = root.find(f"{{{ns.SOAP12}}}Body/*")
        assert found is not None
        return found
    return root


def x(el: etree._Element, path: str) -> list[etree._Element]:
    found = el.xpath(path, namespaces=H)
    assert isinstance(found, list)
    return [f for f in found if isinstance(f, etree._Element)]


def one(el: etree._Element, path: str) -> etree._Element:
    found = x(el, path)
    assert len(found) == 1, f"{path}: {len(found)} matches"
    return found[0]


def shape(el: etree._Element) -> list[tuple[object, dict[str, str], str]]:
    """Element tree as (tag, attributes, text) in document order: equality regardless of prefixes."""
    return [(e.tag, dict(e.attrib), (e.text or "").strip()) for e in el.iter() if isinstance(e.tag, str)]


def assert_valid(el: etree._Element) -> None:
    assert default_schemas().errors(el) == []


def fill_template(text: str) -> str:
    """The NIST findpatient.xml template with its $placeholders$ filled in."""
    values = {
        "$gender_id$": "F", "$pobAddress1_id$": "12 Rue de la Paix", "$pobAddress2_id$": "Bât. B",
        "$pobCity_id$": "Lyon", "$pobState_id$": "ARA", "$pobZip_id$": "69001", "$pobCountry_id$": "FR",
        "$pob_id$": "Hôpital Édouard Herriot", "$dob_id$": "19700312", "$ssn_id$": "TXT",
        "$firstName_id$": "Anna", "$secondName_id$": "Maria", "$lastName_id$": "Müller-Lüdenscheidt",
        "$suffix_id$": "Jr", "$mothersFirstName_id$": "Greta", "$mothersSecondName_id$": "Ilse",
        "$mothersLastName_id$": "Schmidt", "$mothersSuffix_id$": "Sr", "$homeAddress1_id$": "1 Main Street",
        "$homeAddress2_id$": "Apt 4", "$homeCity_id$": "Springfield", "$homeState_id$": "IL",
        "$homeZip_id$": "62701", "$homeCountry_id$": "US", "$homePhone_id$": "tel:+1-217-555-0100",
        "$workPhone_id$": "tel:+1-217-555-0199", "$principleCareProvider_id$": "NPI42",
    }
    for key, value in values.items():
        text = text.replace(key, value)
    assert "$" not in text
    return text


def full_template() -> etree._Element:
    raw = (XCPD / "nist-toolkit/xcpd/FindPatient/XCA/findpatient.xml").read_text()
    return soap_xml.parse(fill_template(raw).encode())


def mutate(relative: str, edit: str) -> etree._Element:
    """The IPF request with one edit: ``drop:<xpath>`` or ``birth:<xml of the IVL_TS value>``."""
    el = body(relative)
    kind, _, arg = edit.partition(":")
    if kind == "drop":
        for found in x(el, arg):
            parent = found.getparent()
            assert parent is not None
            parent.remove(found)
    elif kind == "birth":
        value = one(el, "//h:livingSubjectBirthTime/h:value")
        new = etree.fromstring(f'<value xmlns="{ns.HL7}" {arg}')
        parent = value.getparent()
        assert parent is not None
        parent.replace(value, new)
    return el


# ------------------------------------------------------------------------------------------ parse_request


def test_parse_ipf_request() -> None:
    q = iti55.parse_request(body("ipf/iti55-sample-request.xml"))
    assert q.message_id == II("1.2.840.114350.1.13.0.1.7.1.1", "35423")
    assert q.creation_time == "20090417150301"
    assert q.sender_device_id == II("1.2.840.114350.1.13.999.567")
    assert q.sender_home_community_id == "urn:oid:1.2.3.928.955"
    assert q.receiver_device_id == II("1.2.840.114350.1.13.999.234")
    assert q.receiver_home_community_id is None
    assert q.assigning_authority == "1.2.840.114350.1.13.99997.2.3412"
    assert q.query_id == II("1.2.840.114350.1.13.28.1.18.5.999", "18204")
    assert (q.processing_code, q.processing_mode_code, q.accept_ack_code) == ("T", "T", "AL")
    assert (q.response_priority_code, q.response_modality_code) == ("I", "R")
    assert (q.match_algorithm, q.minimum_degree_match) == ("hund", 100)
    assert q.names == (PersonName(family=("Jones",), given=("Jimmy",)),)
    assert q.birth_time == BirthTime("19630805")
    assert q.gender == "M"
    assert q.ids == (II("1.2.840.114350.1.13.99997.2.3412", "1234"), II("2.16.840.1.113883.4.1", "58910"))
    assert q.initiator_patient_id == II("1.2.840.114350.1.13.99997.2.3412", "1234")
    assert (q.addresses, q.telecoms, q.mothers_maiden_names) == ((), (), ())
    assert etree.QName(q.query_by_parameter).localname == "queryByParameter"


def test_parse_deferred_request_keeps_priority_and_respond_to() -> None:
    q = iti55.parse_request(body("ipf/iti55-sample-request-deferred.xml"))
    assert q.response_priority_code == "D"
    assert q.processing_mode_code == "I"
    assert q.respond_to == "***REPLACEME***"


def test_parse_epic_request_with_unnamespaced_hl7_elements() -> None:
    envelope = load("metriport-carequality/epic-iti-55-request.xml")
    el = body("metriport-carequality/epic-iti-55-request.xml")
    before = etree.tostring(el)
    assert el.find("receiver") is not None  # the quirk: no namespace on receiver/sender
    assert default_schemas().errors(el) != []
    assert_valid(iti55.normalise_hl7(el))

    q = iti55.parse_request(el)
    assert etree.tostring(el) == before  # the caller's element is untouched
    assert q.message_id == II("2.16.840.1.113883.3.9621", "2e304916-539f-4a0e-8c13-07347b38609a")
    assert q.sender_home_community_id == "urn:oid:2.16.840.1.113883.3.9621"
    assert q.sender_device_id == II("2.16.840.1.113883.3.9621")
    assert q.receiver_device_id == II("2.16.840.1.113883.3.564.1")
    assert q.receiver_home_community_id == "urn:oid:2.16.840.1.113883.3.564.1"
    assert (q.processing_code, q.accept_ack_code) == ("P", "AL")
    assert q.assigning_authority is None
    assert q.names == (PersonName(family=("NWHINZZZTESTPATIENT",), given=("NWHINONE",)),)
    assert q.birth_time == BirthTime("19810101")
    assert q.gender == "M"
    assert q.ids == (II("2.16.840.1.113883.4.1", "666-10-0001"),)
    assert q.addresses == (Address(("1100 Test Street",), "Helena", "AL", "35080", "USA"),)
    assert q.telecoms == (Telecom("tel:205-111-1111"),)
    assert q.principal_care_provider_ids == (
        II("2.16.840.1.113883.4.6", "1689055451"),
        II("2.16.840.1.113883.4.6", "1689055467"),
    )
    # the whole envelope is accepted too
    assert iti55.parse_request(envelope).message_id == q.message_id


def test_parse_request_without_any_namespace() -> None:
    text = etree.tostring(body("ipf/iti55-sample-request.xml")).replace(b'xmlns="urn:hl7-org:v3"', b"")
    el = etree.fromstring(text)
    assert el.tag == "PRPA_IN201305UV02"
    q = iti55.parse_request(el)
    assert q.query_id == II("1.2.840.114350.1.13.28.1.18.5.999", "18204")
    assert q.names == (PersonName(family=("Jones",), given=("Jimmy",)),)
    assert_valid(respond(q, NoMatch()))  # the echo is in urn:hl7-org:v3


def test_parse_nist_request_without_birth_time() -> None:
    q = iti55.parse_request(body("nist-toolkit/tests/15500/test2_findpatient_gender_name_failure.xml"))
    assert q.birth_time is None
    assert q.names == (PersonName(family=("Moore",), given=("Chip",)),)
    assert (q.gender, q.accept_ack_code, q.processing_code) == ("M", "NE", "T")
    assert q.sender_home_community_id == "urn:oid:1.2.840.114350.1.13.99998"
    assert q.receiver_home_community_id == "urn:oid:2.16.840.1.113883.3.72.6.1"


def test_parse_every_parameter_of_the_full_nist_template() -> None:
    el = full_template()
    assert_valid(el)
    q = iti55.parse_request(el)
    assert q.gender == "F"
    assert q.birth_time == BirthTime("19700312")
    assert q.names == (
        PersonName(family=("Müller-Lüdenscheidt",), given=("Anna", "Maria"), suffix=("Jr",)),
    )
    assert q.mothers_maiden_names == (
        PersonName(family=("Schmidt",), given=("Greta", "Ilse"), suffix=("Sr",)),
    )
    assert q.birth_place_addresses == (
        Address(("12 Rue de la Paix", "Bât. B"), "Lyon", "ARA", "69001", "FR"),
    )
    assert q.birth_place_names == ("Hôpital Édouard Herriot",)
    assert q.addresses == (Address(("1 Main Street", "Apt 4"), "Springfield", "IL", "62701", "US"),)
    assert q.telecoms == (Telecom("tel:+1-217-555-0100", "HP"), Telecom("tel:+1-217-555-0199", "WP"))
    assert q.principal_care_provider_ids == (II("1.2.3.4.5.6", "NPI42"),)
    assert q.ids == (II("1.2.3.4.5.1000", "801"), II("2.16.840.1.113883.4.1", "001111111"))
    assert q.assigning_authority == "1.2.3.4.5.1000"
    assert q.initiator_patient_id == II("1.2.3.4.5.1000", "801")


@pytest.mark.parametrize(
    "name", ["test1_findpatient_dob_gender_name.xml", "test3_findpatient_dob_gender_name_failure.xml"]
)
def test_nist_impossible_birth_time_is_an_ae_error(name: str) -> None:
    with pytest.raises(Iti55RequestError) as info:
        iti55.parse_request(body(f"nist-toolkit/tests/15500/{name}"))
    err = info.value
    assert not err.is_fault
    assert "19849711" in err.reason and "month 97" in err.reason
    assert err.query is not None and err.query.query_id.extension == "3809840989"
    outcome = err.outcome()
    assert outcome == CannotAnswer(code=None, text=err.reason, detail_code="SYN102")
    response = respond(err.query, outcome)
    assert_valid(response)
    assert one(response, "h:acknowledgement/h:typeCode").get("code") == "AE"
    assert one(response, "h:acknowledgement/h:acknowledgementDetail/h:code").get("code") == "SYN102"
    assert "19849711" in (one(response, "h:acknowledgement/h:acknowledgementDetail/h:text").text or "")
    assert one(response, "//h:queryAck/h:queryResponseCode").get("code") == "AE"
    assert x(response, "//h:reasonOf") == []


@pytest.mark.parametrize(
    ("edit", "fault", "words"),
    [
        ("drop://h:controlActProcess/h:queryByParameter", True, "queryByParameter"),
        ("drop://h:queryByParameter/h:queryId", True, "queryId"),
        ("drop://h:queryByParameter/h:parameterList", True, "parameterList"),
        ("drop:/h:PRPA_IN201305UV02/h:id", True, "no id"),
        ("drop://h:sender", True, "sender/device/id"),
        ("drop://h:controlActProcess", True, "controlActProcess"),
        ("drop://h:livingSubjectName | //h:livingSubjectId", False, "neither a livingSubjectName nor"),
        ('birth:value="19631305"/>', False, "month 13"),
        ('birth:value="19630230"/>', False, "day 30"),
        ('birth:value="$dob$"/>', False, "not an HL7 date"),
        ('birth:><low value="19700101"/><high value="19600101"/></value>', False, "low after high"),
    ],
)
def test_request_errors(edit: str, fault: bool, words: str) -> None:
    request = mutate("ipf/iti55-sample-request.xml", edit)
    with pytest.raises(Iti55RequestError) as info:
        iti55.parse_request(request)
    err = info.value
    assert words in err.reason
    assert err.is_fault is fault
    if fault:
        soap_fault = err.to_fault()
        assert isinstance(soap_fault, SoapFault)
        assert (soap_fault.code, soap_fault.subcode, soap_fault.status) == ("Sender", XIG_MALFORMED, 400)
    else:
        assert err.query is not None
        response = respond(err.query, err.outcome())
        if default_schemas().errors(request) == []:  # '$dob$' is schema-invalid: the service faults first
            assert_valid(response)


def test_wrong_root_element_is_a_fault() -> None:
    with pytest.raises(Iti55RequestError) as info:
        iti55.parse_request(body("ipf/iti55-sample-response.xml"))
    assert info.value.is_fault and "PRPA_IN201305UV02" in info.value.reason


@pytest.mark.parametrize(
    ("value", "expected", "bounds"),
    [
        ('value="1963"/>', BirthTime("1963"), (date(1963, 1, 1), date(1963, 12, 31))),
        ('value="196302"/>', BirthTime("196302"), (date(1963, 2, 1), date(1963, 2, 28))),
        ('value="196002"/>', BirthTime("196002"), (date(1960, 2, 1), date(1960, 2, 29))),
        ('value="196308051230-0500"/>', BirthTime("19630805"), (date(1963, 8, 5), date(1963, 8, 5))),
        ('><low value="1960"/><high value="196512"/></value>', BirthTime(low="1960", high="196512"),
         (date(1960, 1, 1), date(1965, 12, 31))),
        ('><low value="19600101"/></value>', BirthTime(low="19600101"), (date(1960, 1, 1), date.max)),
        ('><center value="19630805"/></value>', BirthTime("19630805"), (date(1963, 8, 5), date(1963, 8, 5))),
        ('nullFlavor="UNK"/>', None, None),
    ],
)
def test_birth_time_forms(value: str, expected: BirthTime | None, bounds: tuple[date, date] | None) -> None:
    el = mutate("ipf/iti55-sample-request.xml", f"birth:{value}")
    assert_valid(el)
    q = iti55.parse_request(el)
    assert q.birth_time == expected
    if expected is not None:
        assert expected.bounds() == bounds


def test_several_names_and_unstructured_name() -> None:
    el = body("ipf/iti55-sample-request.xml")
    param = one(el, "//h:livingSubjectName")
    extra = copy.deepcopy(param)
    value = one(extra, "h:value")
    for child in list(value):
        value.remove(child)
    value.text = "  Jim   Jones "
    param.addnext(extra)
    assert_valid(el)
    q = iti55.parse_request(el)
    assert q.names == (PersonName(family=("Jones",), given=("Jimmy",)), PersonName(text="Jim Jones"))


# ------------------------------------------------------------------------------------------ build_response

REQUESTS = [
    "ipf/iti55-sample-request.xml",
    "ipf/iti55-sample-request-deferred.xml",
    "nist-toolkit/tests/15500/test2_findpatient_gender_name_failure.xml",
    "metriport-carequality/epic-iti-55-request.xml",
]

JONES = MatchedPatient(
    "P-001",
    96,
    PatientDemographics(
        names=(PersonName.from_dicom("Jones^James^Robert^Dr^Jr"), PersonName(family=("Jones",), given=("Jim",))),
        gender="M",
        birth_time="19630805",
        addresses=(Address(("3443 North Arctic Avenue", "Apt 2"), "Some City", "IL", "60601", "US", "H"),),
        telecoms=(Telecom("tel:+1-765-555-4352", "HP"), Telecom("mailto:jim@example.org")),
        ids=(II("2.16.840.1.113883.4.1", "999-88-6345"),),
        birth_place_name="Chicago",
        birth_place_address=Address(city="Chicago", state="IL", country="US"),
    ),
)
NAMELESS = MatchedPatient("P-002", 100, PatientDemographics(gender="O"))

OUTCOMES: list[tuple[str, iti55.Outcome]] = [
    ("one", Matches((JONES,))),
    ("two", Matches((JONES, NAMELESS))),
    ("more", MoreAttributesRequested((iti55.GENDER_REQUESTED, iti55.ADDRESS_REQUESTED, iti55.TELECOM_REQUESTED))),
    ("none", NoMatch()),
    ("busy", CannotAnswer("ResponderBusy", "try again later")),
    ("internal", CannotAnswer("InternalError")),
    ("unavailable", CannotAnswer("AnswerNotAvailable", "needs consent", "INTERR")),
]


@pytest.mark.parametrize("request_file", REQUESTS)
@pytest.mark.parametrize(("label", "outcome"), OUTCOMES, ids=[o[0] for o in OUTCOMES])
def test_every_response_validates(request_file: str, label: str, outcome: iti55.Outcome) -> None:
    q = iti55.parse_request(body(request_file))
    r = respond(q, outcome)
    assert_valid(r)
    # common wrapper rules (ITI TF-2 Tbl 3.55.4.2.2.3-1)
    assert r.tag == ns.q(ns.HL7, "PRPA_IN201306UV02")
    assert one(r, "h:interactionId").attrib == {"root": "2.16.840.1.113883.1.6", "extension": "PRPA_IN201306UV02"}
    assert one(r, "h:creationTime").get("value") == "20240506070809"
    assert one(r, "h:processingCode").get("code") == q.processing_code
    assert one(r, "h:processingModeCode").get("code") == "T"
    assert one(r, "h:acceptAckCode").get("code") == "NE"
    assert one(r, "h:id").get("root") == "2.999.1.9"
    target = one(r, "h:acknowledgement/h:targetMessage/h:id")
    assert iti55._ii(target) == q.message_id
    assert iti55._ii(one(r, "h:receiver/h:device/h:id")) == q.sender_device_id
    initiator = x(r, "h:receiver/h:device/h:asAgent/h:representedOrganization/h:id")
    if q.sender_home_community_id:
        assert [e.get("root") for e in initiator] == [iti55.bare_oid(q.sender_home_community_id)]
    assert one(r, "h:sender/h:device/h:id").get("root") == "2.999.1.9"
    assert one(r, "h:sender/h:device/h:asAgent/h:representedOrganization/h:id").get("root") == "2.999.1"
    assert one(r, "h:controlActProcess/h:code").get("code") == "PRPA_TE201306UV02"
    query_ack = one(r, "h:controlActProcess/h:queryAck")
    assert iti55._ii(one(query_ack, "h:queryId")) == q.query_id
    assert x(query_ack, "h:resultTotalQuantity | h:resultCurrentQuantity | h:resultRemainingQuantity") == []
    echoed = query_ack.getnext()
    assert echoed is not None and etree.QName(echoed).localname == "queryByParameter"
    assert shape(echoed) == shape(q.query_by_parameter)

    ack_code = one(r, "h:acknowledgement/h:typeCode").get("code")
    response_code = one(query_ack, "h:queryResponseCode").get("code")
    events = x(r, "h:controlActProcess/h:subject/h:registrationEvent")
    if isinstance(outcome, Matches):
        assert (ack_code, response_code) == ("AA", "OK")
        assert len(events) == len(outcome.patients)
        assert x(r, "//h:reasonOf") == []
    elif isinstance(outcome, MoreAttributesRequested):
        assert (ack_code, response_code, events) == ("AA", "OK", [])
        codes = x(r, "h:controlActProcess/h:reasonOf[@typeCode='RSON']/h:detectedIssueEvent[@classCode='ALRT']"
                     "/h:triggerFor/h:actOrderRequired[@moodCode='RQO']/h:code")
        assert [c.get("code") for c in codes] == list(outcome.codes)
        assert {c.get("codeSystem") for c in codes} == {"1.3.6.1.4.1.19376.1.2.27.1"}
    elif isinstance(outcome, NoMatch):
        assert (ack_code, response_code, events) == ("AA", "NF", [])
    else:
        assert (ack_code, response_code, events) == ("AE", "AE", [])
        assert one(query_ack, "h:statusCode").get("code") == "aborted"
        code = one(r, "//h:reasonOf/h:detectedIssueEvent/h:mitigatedBy/h:detectedIssueManagement/h:code")
        assert (code.get("code"), code.get("codeSystem")) == (outcome.code, "1.3.6.1.4.1.19376.1.2.27.3")
        assert one(r, "//h:acknowledgementDetail/h:code").get("code") == outcome.detail_code


def test_match_event_content() -> None:
    q = iti55.parse_request(body("ipf/iti55-sample-request.xml"))
    r = respond(q, Matches((JONES, NAMELESS)))
    first, second = x(r, "h:controlActProcess/h:subject/h:registrationEvent")
    patient = one(first, "h:subject1/h:patient")
    assert [i.attrib for i in x(patient, "h:id")] == [{"root": "2.999.1.1", "extension": "P-001"}]
    assert one(patient, "h:statusCode").get("code") == "active"
    person = one(patient, "h:patientPerson")
    name = x(person, "h:name")[0]
    assert [(etree.QName(p).localname, p.text) for p in name] == [
        ("prefix", "Dr"), ("given", "James"), ("given", "Robert"), ("family", "Jones"), ("suffix", "Jr"),
    ]
    assert one(person, "h:administrativeGenderCode").get("code") == "M"
    assert one(person, "h:birthTime").get("value") == "19630805"
    assert [t.get("value") for t in x(person, "h:telecom")] == ["tel:+1-765-555-4352", "mailto:jim@example.org"]
    assert one(person, "h:addr/h:postalCode").text == "60601"
    assert one(person, "h:asOtherIDs/h:id").attrib == {"root": "2.16.840.1.113883.4.1", "extension": "999-88-6345"}
    observation = one(patient, "h:subjectOf1/h:queryMatchObservation")
    assert one(observation, "h:code").get("code") == "IHE_PDQ"
    value = one(observation, "h:value")
    assert (value.get("value"), value.get(ns.q(ns.XSI, "type"))) == ("96", "INT")
    entity = one(first, "h:custodian/h:assignedEntity")
    assert one(entity, "h:id").attrib == {"root": "2.999.1"}
    assert one(entity, "h:code").attrib == {
        "code": "NotHealthDataLocator", "codeSystem": "1.3.6.1.4.1.19376.1.2.27.2",
    }
    # a patient without a name (ID-only query) gets name nullFlavor NA; sex O becomes UN
    person2 = one(second, "h:subject1/h:patient/h:patientPerson")
    assert one(person2, "h:name").get("nullFlavor") == "NA"
    assert one(person2, "h:administrativeGenderCode").get("code") == "UN"


def test_outcome_guards() -> None:
    with pytest.raises(ValueError):
        Matches(())
    with pytest.raises(ValueError):
        MoreAttributesRequested(())


def test_response_round_trip_through_parse_response() -> None:
    q = iti55.parse_request(body("ipf/iti55-sample-request.xml"))
    r = iti55.parse_response(respond(q, Matches((JONES,))))
    assert (r.ack_code, r.query_response_code, r.status) == ("AA", "OK", "match")
    assert r.target_message_id == q.message_id
    assert r.query_id == q.query_id
    assert r.sender_home_community_id == "urn:oid:2.999.1"
    assert r.creation_time == "20240506070809"
    (p,) = r.patients
    assert p.patient_id == II("2.999.1.1", "P-001")
    assert p.home_community_id == "urn:oid:2.999.1"
    assert p.health_data_locator is False
    assert p.score == 96
    assert p.demographics == JONES.demographics

    more = iti55.parse_response(respond(q, OUTCOMES[2][1]))
    assert more.status == "more-attributes"
    assert more.more_attributes_requested == OUTCOMES[2][1].codes  # type: ignore[union-attr]
    none = iti55.parse_response(respond(q, NoMatch()))
    assert (none.query_response_code, none.status, none.patients) == ("NF", "no-match", ())
    busy = iti55.parse_response(respond(q, CannotAnswer("ResponderBusy", "busy")))
    assert (busy.ack_code, busy.status, busy.issue_codes) == ("AE", "error", ("ResponderBusy",))
    assert busy.ack_details == (iti55.AckDetail("INTERR", "busy", "E"),)


# ------------------------------------------------------------------------------------------ parse_response


def test_parse_ipf_response() -> None:
    r = iti55.parse_response(body("ipf/iti55-sample-response.xml"))
    assert (r.ack_code, r.query_response_code, r.status) == ("AA", "OK", "match")
    assert r.target_message_id == II("1.2.840.114350.1.13.0.1.7.1.1", "35423")
    assert r.query_id == II("1.2.840.114350.1.13.28.1.18.5.999", "18204")
    assert [p.patient_id for p in r.patients] == [
        II("1.2.840.114350.1.13.99998.8734", "34827K410"),
        II("1.2.840.114350.1.13.99998.8734", "34827R534"),
    ]
    first, second = r.patients
    assert (first.score, second.score) == (92, 85)  # IHE_PQ and IHE_PDQ codes both accepted
    assert first.home_community_id == second.home_community_id == "urn:oid:1.2.840.114350.1.13.99998.8734"
    assert (first.health_data_locator, second.health_data_locator) == (True, False)
    assert first.demographics.names == (PersonName(family=("Jones",), given=("James",)),)
    assert first.demographics.birth_time == "19630804"
    assert first.demographics.gender == "M"
    assert first.demographics.telecoms == (
        Telecom("tel:+1-481-555-7684;ext=2342", "WP"), Telecom("tel:+1-765-555-4352", "HP"),
    )
    assert first.demographics.addresses == (Address(("3443 North Arctic Avenue",), "Some City", "IL"),)
    assert first.demographics.ids == (
        II("1.2.840.114350.1.13.99997.2.3412", "38273D433"), II("2.16.840.1.113883.4.1", "999-88-6345"),
    )


def test_parse_nist_response() -> None:
    r = iti55.parse_response(body("nist-toolkit/xcpd/FindPatientResponse/FindPatientResponse.xml"))
    assert (r.ack_code, r.query_response_code) == ("AA", "OK")
    (p,) = r.patients
    assert p.patient_id == II("1.2.3.4.5.1000", "801")
    assert p.home_community_id is None  # <custodian><assignedEntity><id/></...>
    assert p.health_data_locator is None
    assert p.score == 100
    assert p.demographics.birth_time == "19849711"  # kept as sent
    assert p.demographics.addresses == (Address(city="Montreal"),)
    assert r.sender_home_community_id == "urn:oid:2.16.840.1.113883.3.72.6.1"


def test_parse_metriport_match_responses() -> None:
    r = iti55.parse_response(load("metriport-carequality/xcpd_match.xml"))  # whole envelope
    (p,) = r.patients
    assert p.patient_id.root == "2.16.840.1.113883.3.9621"
    assert p.patient_id.extension and p.patient_id.extension.startswith("0ODFmMmVj")
    assert p.home_community_id == "urn:oid:2.16.840.1.113883.3.9621"
    assert (p.health_data_locator, p.score) == (False, 99)
    assert p.demographics.ids == () and p.demographics.telecoms == ()  # empty <id/> and <telecom/> skipped
    assert p.demographics.addresses[0].postal_code == "05080"

    multi = iti55.parse_response(load("metriport-carequality/xcpd_match_multi_addr_name.xml"))
    (m,) = multi.patients
    assert len(m.demographics.names) == 3
    assert m.demographics.names[1] == PersonName(family=("nwhinzzztestpatient",), given=("nwhinone", "bartholomew"))
    assert [a.street for a in m.demographics.addresses] == [("1100 Test Street",), ("1200 Test Street", "APT 1A")]
    assert m.demographics.telecoms == (Telecom("tel:+1310-000-0000", "MC"), Telecom("mailto:test@test.com", "H"))
    assert m.demographics.ids == (II("2.16.840.1.113883.3.9621", "987564321"),)


def test_parse_metriport_no_match_and_error() -> None:
    nf = iti55.parse_response(load("metriport-carequality/xcpd_no_match.xml"))
    assert (nf.ack_code, nf.query_response_code, nf.status, nf.patients) == ("AA", "NF", "no-match", ())
    assert nf.more_attributes_requested == nf.issue_codes == ()  # <reasonOf/> empty
    assert nf.target_message_id == II("2.16.840.1.113883.3.3126.2.4.40989.5")  # extension="" → None

    err = iti55.parse_response(load("metriport-carequality/xcpd_error.xml"))
    assert (err.ack_code, err.query_response_code, err.status) == ("AE", "AE", "error")
    assert err.issue_codes == ("InternalError",)
    assert err.ack_details == (iti55.AckDetail("INTERR", "No binding for namespace prefix urn", "E"),)


def test_parse_response_rejects_other_elements() -> None:
    with pytest.raises(Iti55ResponseError):
        iti55.parse_response(body("ipf/iti55-sample-request.xml"))
    bare = etree.Element(ns.q(ns.HL7, "PRPA_IN201306UV02"))
    with pytest.raises(Iti55ResponseError):
        iti55.parse_response(bare)


def test_parse_response_without_namespace() -> None:
    el = body("ipf/iti55-sample-response.xml")
    text = etree.tostring(el).replace(b'xmlns="urn:hl7-org:v3"', b"")
    r = iti55.parse_response(etree.fromstring(text))
    assert len(r.patients) == 2 and r.ack_code == "AA"


# ------------------------------------------------------------------------------------------ build_request


def test_build_request_validates_and_round_trips() -> None:
    demographics = PatientDemographics(
        names=(PersonName(family=("García", "López"), given=("María", "José")), PersonName(family=("Garcia",))),
        gender="F",
        birth_time="19750615",
        addresses=(Address(("Calle Mayor 1",), "Madrid", None, "28013", "ES"),),
        telecoms=(Telecom("tel:+34-91-555-0100", "HP"),),
        ids=(II("2.16.840.1.113883.4.1", "123-45-6789"),),
        mothers_maiden_name=PersonName(family=("Pérez",)),
        birth_place_name="Sevilla",
        birth_place_address=Address(city="Sevilla", country="ES"),
    )
    el, message_id = iti55.build_request(
        demographics,
        sender_device_id="2.999.1.9",
        home_community_id="urn:oid:2.999.1",
        receiver_device_id="1.2.840.114350.1.13.999.234",
        receiver_home_community_id="urn:oid:1.2.840.114350.1.13.99998",
        assigning_authority="urn:oid:2.999.1.1",
        local_patient_id="P-77",
        now=NOW,
    )
    assert_valid(el)
    assert message_id.root == "2.999.1.9" and message_id.extension
    q = iti55.parse_request(el)
    assert q.message_id == message_id
    assert (q.processing_code, q.processing_mode_code, q.accept_ack_code) == ("P", "T", "AL")
    assert (q.response_priority_code, q.response_modality_code) == ("I", "R")
    assert q.creation_time == "20240506070809"
    assert q.sender_home_community_id == "urn:oid:2.999.1"
    assert q.receiver_home_community_id == "urn:oid:1.2.840.114350.1.13.99998"
    assert q.assigning_authority == "2.999.1.1"
    assert q.initiator_patient_id == II("2.999.1.1", "P-77")
    assert q.ids == (II("2.999.1.1", "P-77"), II("2.16.840.1.113883.4.1", "123-45-6789"))
    assert q.names == demographics.names
    assert q.gender == "F" and q.birth_time == BirthTime("19750615")
    assert q.addresses == demographics.addresses and q.telecoms == demographics.telecoms
    assert q.mothers_maiden_names == (demographics.mothers_maiden_name,)
    assert q.birth_place_names == ("Sevilla",)
    assert q.birth_place_addresses == (demographics.birth_place_address,)
    semantics = [t.text for t in x(el, "//h:parameterList/*/h:semanticsText")]
    assert "LivingSubject.name" in semantics and "Patient.addr" in semantics

    # and a responder built on this codec answers it validly
    assert_valid(respond(q, Matches((JONES,))))


def test_build_request_minimal_and_guards() -> None:
    el, _ = iti55.build_request(
        PatientDemographics(names=(PersonName(family=("Smith",), given=("J",)),), birth_time="1963"),
        sender_device_id="2.999.1.9", home_community_id="2.999.1", receiver_device_id="2.999.2",
    )
    assert_valid(el)
    assert x(el, "//h:authorOrPerformer") == []
    assert iti55.parse_request(el).birth_time == BirthTime("1963")
    with pytest.raises(ValueError, match="name or a patient id"):
        iti55.build_request(PatientDemographics(gender="M"), sender_device_id="2.999.1.9",
                            home_community_id="2.999.1", receiver_device_id="2.999.2")
    with pytest.raises(ValueError, match="month 97"):
        iti55.build_request(
            PatientDemographics(names=(PersonName(family=("Moore",)),), birth_time="19849711"),
            sender_device_id="2.999.1.9", home_community_id="2.999.1", receiver_device_id="2.999.2",
        )


# ------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("1.2.3", "urn:oid:1.2.3"),
        ("urn:oid:1.2.3", "urn:oid:1.2.3"),
        (" 1.2.3} ", "urn:oid:1.2.3"),
        ("", None),
        (None, None),
        ("57e77e59-1743-4d36-a8a2-de1735793e52", "57e77e59-1743-4d36-a8a2-de1735793e52"),
    ],
)
def test_hcid_urn(root: str | None, expected: str | None) -> None:
    assert iti55.hcid_urn(root) == expected


def test_person_name_from_dicom() -> None:
    assert PersonName.from_dicom("García López^María José^^Dra.^") == PersonName(
        family=("García López",), given=("María", "José"), prefix=("Dra.",)
    )
    assert PersonName.from_dicom("Yamada^Tarou=山田^太郎") == PersonName(family=("Yamada",), given=("Tarou",))
    assert PersonName.from_dicom("").is_empty


def test_query_dataclass_is_frozen() -> None:
    q = iti55.parse_request(body("ipf/iti55-sample-request.xml"))
    assert isinstance(q, PatientDiscoveryQuery)
    with pytest.raises(AttributeError):
        q.gender = "F"  # type: ignore[misc]
