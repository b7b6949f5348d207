"""The audit messages of every IHE transaction and security event XIG audits (gateway.audit.events)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import pytest

from gateway.audit import events as ev
from gateway.audit.model import (
    MAJOR_FAILURE,
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditMessage,
    AuditSource,
    Code,
    Participant,
    ParticipantObject,
)
from gateway.audit.xml import parse, serialize, validate
from gateway.security.saml import NOT_PROVIDED, CodedValue, VerifiedIdentity

WHEN = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
SOURCE = AuditSource("XIG-B", enterprise_site_id="urn:oid:2.999.2")
IG = ev.Peer("http://www.w3.org/2005/08/addressing/anonymous", "10.0.0.5", "1111")
RG = ev.Peer("https://xig-b.example.org:8443/ihe/xcpd", "xig-b.example.org", "4242")
PACS = ev.Peer("http://orthanc:8042/dicom-web", "orthanc")
XIG = ev.Peer("XIG-B", "xig-b.example.org", "4242")
TREATMENT = Code("TREATMENT", "2.16.840.1.113883.3.18.7.1", "Treatment")
ROLE = Code("224608005", "SNOMED_CT", "Administrative healthcare staff")
USER = ev.Requestor("JD<john.doe@idp.example.org>", "John Doe", "Hospital A", "urn:oid:2.999.1",
                    "urn:oid:2.999.1", ROLE)
P1 = "P1^^^&2.999.1.1&ISO"
P2 = "P2^^^&2.999.1.1&ISO"


def ctx(side: str = "responding", *, outcome: int = SUCCESS, initiator: ev.Peer = IG, responder: ev.Peer = RG,
        user: ev.Requestor | None = USER, description: str | None = None) -> ev.Context:
    return ev.Context(side=side, outcome=outcome, when=WHEN, source=SOURCE,  # type: ignore[arg-type]
                      initiator=initiator, responder=responder, user=user,
                      purposes=(TREATMENT,) if user else (), outcome_description=description)


def checked(messages: Sequence[AuditMessage]) -> list[AuditMessage]:
    """Every message validates against the shipped schema and survives the codec unchanged."""
    for message in messages:
        data = serialize(message)
        validate(data)
        assert parse(data) == message
    return list(messages)


def role_of(message: AuditMessage, code: str) -> Participant:
    [participant] = [p for p in message.participants if any(r.code == code for r in p.roles)]
    return participant


def human(message: AuditMessage) -> Participant:
    [participant] = [p for p in message.participants if p.user_name]
    return participant


def objects(message: AuditMessage, type_code: str, role: str) -> list[ParticipantObject]:
    return [o for o in message.objects if o.type_code == type_code and o.role == role]


def patients(message: AuditMessage) -> list[str]:
    return [o.object_id for o in objects(message, "1", "1")]


def assert_query_roles(message: AuditMessage, initiator: ev.Peer, responder: ev.Peer) -> None:
    source, destination = role_of(message, "110153"), role_of(message, "110152")
    assert (source.user_id, source.is_requestor, source.network_access_point) == \
        (initiator.user_id, True, initiator.host)
    assert (destination.user_id, destination.is_requestor, destination.network_access_point) == \
        (responder.user_id, False, responder.host)


def assert_retrieve_roles(message: AuditMessage, initiator: ev.Peer, responder: ev.Peer) -> None:
    """In a retrieve the node that sends the data (the responder) is the Source, with UserIsRequestor false."""
    source, destination = role_of(message, "110153"), role_of(message, "110152")
    assert (source.user_id, source.is_requestor) == (responder.user_id, False)
    assert (destination.user_id, destination.is_requestor) == (initiator.user_id, True)


def assert_human_requestor(message: AuditMessage) -> None:
    user = human(message)
    assert (user.user_id, user.user_name, user.is_requestor, user.roles) == \
        ("John Doe", "JD<john.doe@idp.example.org>", True, (ROLE,))
    assert message.purposes_of_use == (TREATMENT,)


# ------------------------------------------------------------------------------------------ ITI-55


def test_iti55_initiating_gateway_has_no_patient_and_the_query_parameters() -> None:
    [message] = checked(ev.iti55(ctx("initiating", initiator=XIG, responder=RG), query=b"<queryByParameter/>",
                                 home_community_id="urn:oid:2.999.2", patients=[P1, P2]))
    assert (message.event_id, message.action) == (Code("110112", "DCM", "Query"), "E")
    assert message.event_types == (Code("ITI-55", "IHE Transactions", "Cross Gateway Patient Discovery"),)
    assert patients(message) == []
    assert_query_roles(message, XIG, RG)
    assert role_of(message, "110153").network_access_point_type == "1"
    assert_human_requestor(message)
    [query] = objects(message, "2", "24")
    assert query.id_type == Code("ITI-55", "IHE Transactions", "Cross Gateway Patient Discovery")
    assert query.query == b"<queryByParameter/>" and query.name is None
    assert query.details == (("ihe:homeCommunityID", b"urn:oid:2.999.2"),)


def test_iti55_responding_gateway_audits_one_message_per_returned_patient() -> None:
    messages = checked(ev.iti55(ctx(), query=b"<q/>", home_community_id="urn:oid:2.999.1",
                                patients=[P1, P2, P1], query_id="1.2.3^99"))
    assert len(messages) == 2
    assert [patients(m) for m in messages] == [[P1], [P2]]
    for message in messages:
        assert_query_roles(message, IG, RG)
        assert role_of(message, "110153").network_access_point_type == "2"  # an IP address
        assert role_of(message, "110152").alternative_user_id == "4242"  # the process id
        [patient] = objects(message, "1", "1")
        assert patient.id_type == Code("2", "RFC-3881", "Patient Number")
        assert patient.name == patient.object_id  # the schema needs a name or a query
        [query] = objects(message, "2", "24")
        assert query.object_id == "1.2.3^99" and query.query == b"<q/>"


def test_iti55_responding_gateway_without_a_match_still_audits_the_query() -> None:
    [message] = checked(ev.iti55(ctx(outcome=SERIOUS_FAILURE, description="AE: AnswerNotAvailable"),
                                 query=b"<q/>", home_community_id="urn:oid:2.999.1"))
    assert patients(message) == [] and len(objects(message, "2", "24")) == 1
    assert (message.outcome, message.outcome_description) == (SERIOUS_FAILURE, "AE: AnswerNotAvailable")


# ------------------------------------------------------------------------------------------ ITI-38


@pytest.mark.parametrize("side", ["initiating", "responding"])
def test_iti38_query_object_patient_and_details(side: str) -> None:
    [message] = checked(ev.iti38(ctx(side), query=b"<query:AdhocQueryRequest/>",
                                 query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
                                 home_community_id="urn:oid:2.999.2", patient=P1))
    assert (message.event_id.code, message.action) == ("110112", "E")
    assert message.event_types == (Code("ITI-38", "IHE Transactions", "Cross Gateway Query"),)
    assert_query_roles(message, IG, RG)
    assert_human_requestor(message)
    assert patients(message) == [P1]
    [query] = objects(message, "2", "24")
    assert query.object_id == "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
    assert query.id_type.code == "ITI-38"
    assert query.query == b"<query:AdhocQueryRequest/>"
    assert query.details == (("QueryEncoding", b"UTF-8"),
                             ("urn:ihe:iti:xca:2010:homeCommunityId", b"urn:oid:2.999.2"))


def test_iti38_without_patient_or_community() -> None:
    [message] = checked(ev.iti38(ctx(user=None), query=b"<q/>", query_id="", home_community_id="", patient=None))
    assert patients(message) == []
    assert objects(message, "2", "24")[0].details == (("QueryEncoding", b"UTF-8"),)
    assert [p for p in message.participants if p.user_name] == [] and message.purposes_of_use == ()


# ------------------------------------------------------------------------------------------ ITI-39


DOC_OK = ev.DocumentRef("1.2.3.100", "2.999.1.2", "urn:oid:2.999.1")
DOC_BAD = ev.DocumentRef("1.2.3.101", "2.999.1.2", "")


@pytest.mark.parametrize(("side", "event_id", "action"), [
    ("initiating", Code("110107", "DCM", "Import"), "C"),
    ("responding", Code("110106", "DCM", "Export"), "R"),
])
def test_iti39_event_per_side_and_success_and_failure_audited_apart(side: str, event_id: Code, action: str) -> None:
    messages = checked(ev.iti39(ctx(side, outcome=MINOR_FAILURE, description="XDSDocumentUniqueIdError"),
                                documents=[DOC_OK], failed=[DOC_BAD], patient=P1))
    assert len(messages) == 2
    ok, bad = messages
    for message in messages:
        assert (message.event_id, message.action) == (event_id, action)
        assert message.event_types == (Code("ITI-39", "IHE Transactions", "Cross Gateway Retrieve"),)
        assert_retrieve_roles(message, IG, RG)
        assert_human_requestor(message)
        assert patients(message) == [P1]
    assert (ok.outcome, ok.outcome_description) == (SUCCESS, None)
    assert (bad.outcome, bad.outcome_description) == (SERIOUS_FAILURE, "XDSDocumentUniqueIdError")
    [doc] = objects(ok, "2", "3")
    assert (doc.object_id, doc.id_type) == ("1.2.3.100", Code("9", "RFC-3881", "Report Number"))
    assert doc.details == (("Repository Unique ID", b"2.999.1.2"), ("ihe:homeCommunityID", b"urn:oid:2.999.1"))
    [failed] = objects(bad, "2", "3")
    assert failed.object_id == "1.2.3.101"
    assert failed.details == (("Repository Unique ID", b"2.999.1.2"),)  # homeCommunityId unknown: no detail


def test_iti39_outcomes_of_complete_success_major_failure_and_nothing_readable() -> None:
    [ok] = checked(ev.iti39(ctx(), documents=[DOC_OK, DOC_BAD]))
    assert ok.outcome == SUCCESS and len(objects(ok, "2", "3")) == 2 and patients(ok) == []
    [bad] = checked(ev.iti39(ctx(outcome=MAJOR_FAILURE, description="timeout"), documents=[], failed=[DOC_OK]))
    assert (bad.outcome, bad.outcome_description) == (MAJOR_FAILURE, "timeout")
    [empty] = checked(ev.iti39(ctx(outcome=SERIOUS_FAILURE, description="unreadable request"), documents=[]))
    assert (empty.outcome, empty.outcome_description, empty.objects) == (SERIOUS_FAILURE, "unreadable request", ())


# ------------------------------------------------------------------------------------------ RAD-75


STUDY = ev.StudyRef("1.2.840.99.1", "2.999.1.3", "urn:oid:2.999.1",
                    sop_classes=(("1.2.840.10008.5.1.4.1.1.2", 120),), accession_numbers=("ACC-1",))


@pytest.mark.parametrize(("side", "event_id", "action"), [
    ("initiating", Code("110103", "DCM", "DICOM Instances Accessed"), "C"),
    ("responding", Code("110104", "DCM", "DICOM Instances Transferred"), "R"),
])
def test_rad75_study_objects_per_side(side: str, event_id: Code, action: str) -> None:
    failed = ev.StudyRef("1.2.840.99.2", accession_numbers=("ACC-2",))
    ok, bad = checked(ev.rad75(ctx(side, outcome=MINOR_FAILURE), studies=[STUDY], failed=[failed], patient=P2))
    for message in (ok, bad):
        assert (message.event_id, message.action) == (event_id, action)
        assert message.event_types == (Code("RAD-75", "IHE Transactions",
                                             "Cross Gateway Retrieve Imaging Document Set"),)
        assert_retrieve_roles(message, IG, RG)
        assert_human_requestor(message)
        assert patients(message) == [P2]
    [study] = objects(ok, "2", "3")
    assert (study.object_id, study.id_type) == ("1.2.840.99.1", Code("110180", "DCM", "Study Instance UID"))
    assert study.details == (("Repository Unique ID", b"2.999.1.3"), ("ihe:homeCommunityID", b"urn:oid:2.999.1"))
    assert study.sop_classes == (("1.2.840.10008.5.1.4.1.1.2", 120),) and study.accession_numbers == ("ACC-1",)
    [not_delivered] = objects(bad, "2", "3")
    assert bad.outcome == SERIOUS_FAILURE and ok.outcome == SUCCESS
    # PS3.15 Table A.5.2-1: Accession only together with SOPClass
    assert not_delivered.details == () and not_delivered.accession_numbers == ()


# ------------------------------------------------------------------------------------------ local PACS


def test_pacs_query_is_a_dicom_query_event_with_the_search_criteria() -> None:
    [message] = checked(ev.pacs_query(ctx("initiating", initiator=XIG, responder=PACS),
                                      query=b'{"find_studies": "P1"}', patient=P1, transaction="QIDO-RS"))
    assert (message.event_id.code, message.action, message.event_types) == ("110112", "E", ())
    assert_query_roles(message, XIG, PACS)
    assert_human_requestor(message)
    assert patients(message) == [P1]
    [query] = objects(message, "2", "3")
    assert (query.object_id, query.id_type) == ("QIDO-RS", Code("10", "RFC-3881", "Search Criteria"))
    assert query.query == b'{"find_studies": "P1"}'


def test_pacs_retrieve_the_pacs_is_the_source() -> None:
    [message] = checked(ev.pacs_retrieve(ctx("initiating", initiator=XIG, responder=PACS, user=None),
                                         studies=[STUDY, ev.StudyRef("1.2.840.99.3")], patient=None))
    assert (message.event_id.code, message.action) == ("110104", "R")
    assert_retrieve_roles(message, XIG, PACS)
    assert [o.object_id for o in objects(message, "2", "3")] == ["1.2.840.99.1", "1.2.840.99.3"]


def test_pacs_store_xig_is_the_source() -> None:
    [message] = checked(ev.pacs_store(ctx("initiating", initiator=XIG, responder=PACS),
                                      studies=[STUDY], patient="A-555^^^&2.999.1.1&ISO"))
    assert (message.event_id.code, message.action) == ("110104", "C")
    source, destination = role_of(message, "110153"), role_of(message, "110152")
    assert (source.user_id, source.is_requestor, destination.user_id, destination.is_requestor) == \
        ("XIG-B", True, PACS.user_id, False)
    assert patients(message) == ["A-555^^^&2.999.1.1&ISO"]


# ------------------------------------------------------------------------------------------ security events


def test_node_authentication_failure_is_a_security_alert() -> None:
    peer = ev.Peer("10.9.9.9", "10.9.9.9")
    message = ev.authentication_failure(when=WHEN, source=SOURCE, peer=peer, node=XIG,
                                        reason="TLS handshake: certificate verify failed")
    checked([message])
    assert (message.event_id, message.action, message.outcome) == (Code("110113", "DCM", "Security Alert"), "E", 8)
    assert message.event_types == (Code("110126", "DCM", "Node Authentication"),)
    assert message.outcome_description == "TLS handshake: certificate verify failed"
    reporter, performer = message.participants
    assert (reporter.user_id, reporter.is_requestor) == ("XIG-B", True)
    assert (performer.user_id, performer.is_requestor, performer.network_access_point_type) == ("10.9.9.9", False, "2")
    [subject] = message.objects
    assert (subject.object_id, subject.id_type.code, subject.type_code) == ("10.9.9.9", "110182", "2")
    assert subject.details == (("Alert Description", b"TLS handshake: certificate verify failed"),)


@pytest.mark.parametrize("kind", ["user", None])
def test_assertion_failure_is_a_user_authentication_event(kind: str | None) -> None:
    message = ev.authentication_failure(when=WHEN, source=SOURCE, peer=ev.Peer("gw.example.org", "gw.example.org"),
                                        reason="wsse:FailedCheck: signature does not verify",
                                        user_name="<mallory@idp.example.org>", node=XIG,
                                        kind=kind)  # type: ignore[arg-type]
    checked([message])
    assert (message.event_id, message.event_types) == (Code("110114", "DCM", "User Authentication"),
                                                       (Code("110122", "DCM", "Login"),))
    assert message.outcome == SERIOUS_FAILURE and message.objects == ()
    person, authenticator = message.participants
    assert (person.user_name, person.is_requestor, person.network_access_point) == \
        ("<mallory@idp.example.org>", True, "gw.example.org")
    assert (authenticator.user_id, authenticator.is_requestor) == ("XIG-B", False)
    assert ev.summarize(message).event == "110114"


def test_assertion_failure_without_a_readable_user() -> None:
    message = ev.authentication_failure(when=WHEN, source=SOURCE, peer=ev.Peer("10.1.1.1", "10.1.1.1"),
                                        reason="wsse:InvalidSecurity: no assertion", kind="user")
    checked([message])
    [person] = message.participants
    assert (person.user_id, person.user_name) == ("10.1.1.1", None)


def test_uid_guess_is_a_security_alert_about_the_studies() -> None:
    study = ParticipantObject("1.2.840.99.7", Code("110180", "DCM", "Study Instance UID"), type_code="2", role="3",
                              details=(("SOPInstanceUID", b"1.2.840.99.7.1.1"),))
    message = ev.security_alert(when=WHEN, source=SOURCE, peer=ev.Peer("urn:oid:2.999.1", "10.0.0.5"), user=USER,
                                reason="RAD-75 asked for 1 instance never delivered in a manifest",
                                objects=[study])
    checked([message])
    assert (message.event_id.code, message.event_types[0].code, message.outcome) == ("110113", "110132", 8)
    reporter, peer, user = message.participants
    assert (reporter.user_id, reporter.is_requestor) == ("XIG-B", True)
    assert (peer.user_id, peer.is_requestor) == ("urn:oid:2.999.1", False)
    assert (user.user_name, user.is_requestor, user.roles) == ("JD<john.doe@idp.example.org>", False, (ROLE,))
    [subject] = message.objects
    assert subject.name == "1.2.840.99.7"
    assert subject.details == (("SOPInstanceUID", b"1.2.840.99.7.1.1"),
                               ("Alert Description", b"RAD-75 asked for 1 instance never delivered in a manifest"))
    assert ev.summarize(message).studies == ("1.2.840.99.7",)


def test_security_alert_without_objects_names_the_node() -> None:
    message = ev.security_alert(when=WHEN, source=SOURCE, peer=ev.Peer("partner", "partner.example.org"), user=None,
                                reason="too many UID guesses")
    checked([message])
    [subject] = message.objects
    assert (subject.object_id, subject.id_type.code) == ("partner.example.org", "110182")


@pytest.mark.parametrize(("started", "code"), [(True, "110120"), (False, "110121")])
def test_application_activity(started: bool, code: str) -> None:
    message = ev.application_activity(when=WHEN, source=SOURCE, started=started, process=XIG, user="xig-operator")
    checked([message])
    assert (message.event_id.code, message.action, message.outcome) == ("110100", "E", SUCCESS)
    assert [t.code for t in message.event_types] == [code]
    app, launcher = message.participants
    assert (app.user_id, app.alternative_user_id, app.roles[0].code, app.is_requestor) == ("XIG-B", "4242", "110150",
                                                                                          False)
    assert (launcher.user_id, launcher.roles[0].code, launcher.is_requestor) == ("xig-operator", "110151", True)
    alone = ev.application_activity(when=WHEN, source=SOURCE, started=started, process=XIG)
    checked([alone])
    assert [p.is_requestor for p in alone.participants] == [True]


# ------------------------------------------------------------------------------------------ identity


def identity(**changes: object) -> VerifiedIdentity:
    base = VerifiedIdentity(
        subject_id="Dr. Jane Smith", organization="Hospital A", organization_id="urn:oid:2.999.1",
        home_community_id="urn:oid:2.999.1",
        role=CodedValue("106331006", "2.16.840.1.113883.6.96", "SNOMED_CT", "Administrative worker"),
        purpose_of_use=CodedValue("TREATMENT", "2.16.840.1.113883.3.18.7.1", "nhin-purpose", "Treatment"),
        npi=None, issuer="CN=idp,O=Hospital A", name_id="jsmith", assertion_id="_a1", not_on_or_after=None,
        signature_algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256", signer_subject="CN=idp",
        sp_provided_id="JS")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_requestor_and_purposes_from_a_verified_identity() -> None:
    user = ev.Requestor.from_identity(identity())
    assert user == ev.Requestor(user_name="JS<jsmith@CN=idp,O=Hospital A>", user_id="Dr. Jane Smith",
                                organization="Hospital A", organization_id="urn:oid:2.999.1",
                                home_community_id="urn:oid:2.999.1",
                                role=Code("106331006", "SNOMED_CT", "Administrative worker"))
    assert ev.purposes_of_use(identity()) == (Code("TREATMENT", "nhin-purpose", "Treatment"),)
    bare = identity(subject_id="", role=NOT_PROVIDED, purpose_of_use=NOT_PROVIDED, sp_provided_id=None)
    assert ev.Requestor.from_identity(bare).user_id == "jsmith"
    assert ev.Requestor.from_identity(bare).role is None
    assert ev.Requestor.from_identity(bare).user_name == "<jsmith@CN=idp,O=Hospital A>"
    assert ev.purposes_of_use(bare) == ()
    context = dataclasses.replace(ctx(), user=ev.Requestor.from_identity(identity()),
                                  purposes=ev.purposes_of_use(identity()))
    [message] = checked(ev.iti38(context, query=b"<q/>", query_id="x", home_community_id="", patient=None))
    assert message.purposes_of_use == (Code("TREATMENT", "nhin-purpose", "Treatment"),)


# ------------------------------------------------------------------------------------------ summary


def test_summaries() -> None:
    [rg] = ev.iti55(ctx(), query=b"<q/>", home_community_id="urn:oid:2.999.1", patients=[P1])
    summary = ev.summarize(rg)
    assert (summary.event, summary.outcome, summary.when, summary.user, summary.community, summary.patients,
            summary.studies) == ("ITI-55", 0, WHEN, "JD<john.doe@idp.example.org>", "urn:oid:2.999.1", (P1,), ())
    [query] = ev.iti38(ctx(), query=b"<q/>", query_id="x", home_community_id="urn:oid:2.999.9", patient=None)
    assert ev.summarize(query).community == "urn:oid:2.999.9"
    ok, _ = ev.rad75(ctx("initiating"), studies=[STUDY], failed=[STUDY], patient=P2)
    assert (ev.summarize(ok).event, ev.summarize(ok).studies, ev.summarize(ok).patients) == \
        ("RAD-75", ("1.2.840.99.1",), (P2,))
    assert ev.summarize(ok).community == "urn:oid:2.999.1"
    [pacs] = ev.pacs_query(ctx("initiating", initiator=XIG, responder=PACS, user=None), query=b"{}", patient=None)
    assert (ev.summarize(pacs).event, ev.summarize(pacs).user) == ("110112", "XIG-B")
    start = ev.application_activity(when=WHEN, source=SOURCE, started=True, process=XIG)
    assert (ev.summarize(start).event, ev.summarize(start).user, ev.summarize(start).community) == \
        ("110100", "XIG-B", "")
