"""From exchanges on the wire to ATNA audit messages: every transaction, both sides, failures and faults.

Requests and responses are built with XIG's own codecs (the same bytes the gateways exchange); every
message produced must validate against the DICOM audit schema and name the patient/documents/studies
that were actually disclosed.
"""

from __future__ import annotations

import datetime as dt

from lxml import etree

from gateway.audit import events, wire
from gateway.audit.model import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditMessage, AuditSource
from gateway.audit.xml import serialize, validate
from gateway.config import Config
from gateway.ihe import ebrim, iti38, iti39, iti55, rad75, registry
from gateway.ihe.iti39 import DocumentFailure, DocumentRequest, DocumentResult
from gateway.ihe.iti55 import MatchedPatient, Matches, PatientDemographics, PersonName
from gateway.security.saml import VerifiedIdentity

WHEN = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.UTC)
US = "urn:oid:1.3.6.1.4.1.21367.13.70.200"
THEM = "urn:oid:1.3.6.1.4.1.21367.13.70.201"
AA = "1.3.6.1.4.1.21367.13.20.1000"
REPO = "1.3.6.1.4.1.21367.13.80.1"
SOURCE = AuditSource("XIG", US)
USER = events.Requestor(user_name="<CN=alice@xig@1.2.3>", user_id="Alice", organization="Clinic",
                        organization_id=US, home_community_id=US)


def ctx(side: str) -> events.Context:
    return events.Context(side=side, outcome=SUCCESS, when=WHEN, source=SOURCE,  # type: ignore[arg-type]
                          initiator=events.Peer("http://www.w3.org/2005/08/addressing/anonymous", "127.0.0.1"),
                          responder=events.Peer("https://127.0.0.1:8443/ihe/xcpd", "127.0.0.1", "4242"),
                          user=USER, purposes=(events.Code("TREATMENT", "2.16.840.1.113883.3.18.7.1", "Treatment"),))


def valid(messages: list[AuditMessage]) -> list[AuditMessage]:
    for m in messages:
        validate(serialize(m))
    return messages


def object_ids(message: AuditMessage, id_type: str) -> list[str]:
    return [o.object_id for o in message.objects if o.id_type.code == id_type]


def details(message: AuditMessage) -> dict[str, bytes]:
    return {k: v for o in message.objects for k, v in o.details}


def iti55_exchange() -> tuple[etree._Element, etree._Element]:
    request, _ = iti55.build_request(
        PatientDemographics(names=(PersonName(family=("RIVERA",), given=("Ana",)),), gender="F",
                            birth_time="19750612"),
        sender_device_id=THEM, home_community_id=THEM, receiver_device_id=US)
    query = iti55.parse_request(request)
    response = iti55.build_response(
        query, Matches((MatchedPatient("B-77", 95), MatchedPatient("B-78", 90))),
        responder_device_id=US, home_community_id=US, assigning_authority=AA)
    return request, response


def test_iti55_responding_one_message_per_returned_patient() -> None:
    request, response = iti55_exchange()
    messages = valid(wire.transaction_messages("ITI-55", ctx("responding"), request, response, community=THEM))
    assert sorted(p for m in messages for p in object_ids(m, "2")) == [f"B-77^^^&{AA}&ISO", f"B-78^^^&{AA}&ISO"]
    assert all(len(object_ids(m, "2")) == 1 for m in messages)  # one patient per message (ITI TF-2 3.20.7)
    for m in messages:
        assert m.event_id.code == "110112" and m.action == "E" and m.outcome == SUCCESS
        assert [t.code for t in m.event_types] == ["ITI-55"]
        query = next(o for o in m.objects if o.query is not None)
        assert b"queryByParameter" in query.query  # type: ignore[operator]
        assert details(m)["ihe:homeCommunityID"] == THEM.encode()
        assert [p.user_name for p in m.participants if p.user_name] == [USER.user_name]


def test_iti55_initiating_side_names_no_patient_and_a_fault_is_a_failure() -> None:
    request, response = iti55_exchange()
    [ok] = valid(wire.transaction_messages("ITI-55", ctx("initiating"), request, response, community=US))
    assert object_ids(ok, "2") == [] and ok.outcome == SUCCESS
    [failed] = valid(wire.transaction_messages("ITI-55", ctx("initiating"), request, None, community=US,
                                               fault="timeout: no answer within 5 s"))
    assert failed.outcome == SERIOUS_FAILURE and "no answer within 5 s" in (failed.outcome_description or "")


def test_iti38_query_object_patient_and_registry_outcome() -> None:
    patient = ebrim.format_cx("B-77", AA)
    request = iti38.build_query(iti38.find_documents_for_kos(patient), home_community_id=US)
    error = registry.RegistryError("XDSRegistryError", "PACS unreachable", US)
    response = iti38.build_response([], return_type="LeafClass", home_community_id=US, errors=[error])
    [m] = valid(wire.transaction_messages("ITI-38", ctx("responding"), request, response, community=THEM))
    assert m.event_id.code == "110112" and [t.code for t in m.event_types] == ["ITI-38"]
    assert object_ids(m, "2") == [patient]
    assert iti38.StoredQueryId.FindDocuments.value in [o.object_id for o in m.objects]
    assert m.outcome == SERIOUS_FAILURE and "XDSRegistryError" in (m.outcome_description or "")
    ok = iti38.build_response([], return_type="LeafClass", home_community_id=US)
    [m2] = valid(wire.transaction_messages("ITI-38", ctx("initiating"), request, ok, community=US))
    assert m2.outcome == SUCCESS


def _doc(uid: str) -> DocumentRequest:
    return DocumentRequest(US, REPO, uid)


def test_iti39_delivered_and_failed_documents_are_audited_separately() -> None:
    request = iti39.build_request([_doc("1.2.3.1"), _doc("1.2.3.2")])
    response, _ = iti39.build_response(
        [DocumentResult(_doc("1.2.3.1"), "application/dicom", b"DICM"),
         DocumentFailure(_doc("1.2.3.2"), "XDSDocumentUniqueIdError", "unknown document")],
        home_community_id=US)
    messages = valid(wire.transaction_messages("ITI-39", ctx("responding"), request, response, community=THEM))
    by_outcome = {m.outcome: [o.object_id for o in m.objects if o.id_type.code == "9"] for m in messages}
    assert by_outcome[SUCCESS] == ["1.2.3.1"]
    assert by_outcome[next(k for k in by_outcome if k != SUCCESS)] == ["1.2.3.2"]
    assert all(m.event_id.code == "110106" and m.action == "R" for m in messages)  # Export, as repository
    [imported, *_] = valid(wire.transaction_messages("ITI-39", ctx("initiating"), request, response, community=US))
    assert imported.event_id.code == "110107" and imported.action == "C"  # Import, as consumer


def test_rad75_studies_and_partial_success() -> None:
    req = rad75.ImagingRetrieveRequest(
        (rad75.StudyRequest("1.2.840.1", (rad75.SeriesRequest("1.2.840.1.1", (_doc("1.2.840.1.1.1"),)),)),
         rad75.StudyRequest("1.2.840.2", (rad75.SeriesRequest("1.2.840.2.1", (_doc("1.2.840.2.1.1"),)),))),
        (rad75.EXPLICIT_VR_LITTLE_ENDIAN,))
    request = rad75.build_request(req)
    response, _ = iti39.build_response(
        [DocumentResult(_doc("1.2.840.1.1.1"), "application/dicom", b"DICM"),
         DocumentFailure(_doc("1.2.840.2.1.1"), "XDSDocumentUniqueIdError", "not in a delivered manifest")],
        home_community_id=US)
    messages = valid(wire.transaction_messages("RAD-75", ctx("responding"), request, response, community=THEM))
    delivered = [m for m in messages if m.outcome == SUCCESS]
    failed = [m for m in messages if m.outcome != SUCCESS]
    assert [object_ids(m, "110180") for m in delivered] == [["1.2.840.1"]]
    assert [object_ids(m, "110180") for m in failed] == [["1.2.840.2"]]
    assert all(m.event_id.code == "110104" and [t.code for t in m.event_types] == ["RAD-75"] for m in messages)
    [accessed, *_] = valid(wire.transaction_messages("RAD-75", ctx("initiating"), request, response, community=US))
    assert accessed.event_id.code == "110103"


def test_unreadable_request_is_still_audited_with_the_fault() -> None:
    junk = etree.fromstring(b"<nonsense/>")
    for transaction in ("ITI-55", "ITI-38", "ITI-39", "RAD-75"):
        messages = valid(wire.transaction_messages(transaction, ctx("responding"), junk, None, community=THEM,
                                                   fault="xig:SchemaValidationFailed: not an ITI request"))
        assert messages and all(m.outcome == SERIOUS_FAILURE for m in messages)
        assert all([t.code for t in m.event_types] == [transaction] for m in messages)


def test_registry_outcome_mapping() -> None:
    assert wire.registry_outcome(registry.SUCCESS) == SUCCESS
    assert wire.registry_outcome(registry.PARTIAL_SUCCESS) == MINOR_FAILURE
    assert wire.registry_outcome(registry.FAILURE) == SERIOUS_FAILURE
    assert wire.registry_outcome(None) == SERIOUS_FAILURE


class ListSink:
    """The AuditSink interface kept in a list (the durable trail is tested in test_audit_delivery)."""

    def __init__(self) -> None:
        self.messages: list[AuditMessage] = []

    def record(self, message: AuditMessage) -> None:
        self.messages.append(message)


def test_auditor_turns_refusals_and_lifecycle_into_their_events(config: Config) -> None:
    from gateway.audit.auditor import WSSE_NS, Auditor

    sink = ListSink()
    auditor = Auditor(sink, config, clock=lambda: WHEN)
    request, response = iti55_exchange()
    # a refused assertion is a user authentication failure, not an ITI-55 query
    auditor.inbound(transaction="ITI-55", path="/ihe/xcpd", when=WHEN, peer_host="127.0.0.9", reply_to=None,
                    identity=None, request=request, response=None, fault_code="wsse:FailedCheck",
                    fault_reason="the assertion signature does not verify", fault_namespace=WSSE_NS)
    auditor.uid_guess(_identity(), [("1.2.840.9", "1.2.840.9.1.1"), ("1.2.840.9", "1.2.840.9.1.2")],
                      peer_host="127.0.0.9", reason="not in a delivered manifest")
    auditor.application(True)
    auditor.application(False)
    valid(sink.messages)
    auth, alert, start, stop = sink.messages
    assert auth.event_id.code == "110114" and auth.outcome != SUCCESS
    assert "does not verify" in (auth.outcome_description or "")
    assert alert.event_id.code == "110113"
    assert object_ids(alert, "110180") == ["1.2.840.9"]
    assert [v for k, v in alert.objects[-1].details if k == "SOPInstanceUID"] == [b"1.2.840.9.1.1", b"1.2.840.9.1.2"]
    assert [p.user_name for p in alert.participants if p.user_name] == [_identity().audit_user_name]
    assert (start.event_id.code, [t.code for t in start.event_types]) == ("110100", ["110120"])
    assert [t.code for t in stop.event_types] == ["110121"]


def test_auditor_outbound_audits_what_was_sent_with_our_asserted_user(config: Config) -> None:
    from gateway.audit.auditor import Auditor
    from gateway.security.outbound import default_identity

    sink = ListSink()
    auditor = Auditor(sink, config, clock=lambda: WHEN)
    request, response = iti55_exchange()
    auditor.outbound(transaction="ITI-55", url="https://partner.example:9443/xcpd", community=THEM,
                     identity=default_identity(config), request=request, response=response, error=None, when=WHEN)
    [m] = valid(sink.messages)
    names = [p.user_name for p in m.participants if p.user_name]
    from gateway.security.outbound import signer_name_id

    assert names == [f"<{signer_name_id(config)}@{config.saml_issuer}>"]  # NameID = our signer's subject
    assert any(p.user_id == "https://partner.example:9443/xcpd" and p.network_access_point == "partner.example"
               for p in m.participants)
    assert [c.code for c in m.purposes_of_use] == ["TREATMENT"]


def _identity() -> VerifiedIdentity:
    from gateway.security.saml import CodedValue

    return VerifiedIdentity(
        subject_id="Dr Who", organization="Partner Clinic", organization_id=THEM, home_community_id=THEM,
        role=CodedValue("112247003", "2.16.840.1.113883.6.96", "SNOMED_CT", "Medical doctor"),
        purpose_of_use=CodedValue("TREATMENT", "2.16.840.1.113883.3.18.7.1", "nhin-purpose", "Treatment"),
        npi=None, issuer="partner-idp", name_id="CN=Dr Who", assertion_id="_a1", not_on_or_after=None,
        signature_algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256", signer_subject="CN=partner")


def test_iti55_query_object_carries_the_hl7_query_id() -> None:
    request, response = iti55_exchange()
    qid = request.xpath(".//*[local-name()='queryByParameter']/*[local-name()='queryId']")[0]
    [m, *_] = wire.transaction_messages("ITI-55", ctx("initiating"), request, response, community=US)
    query = next(o for o in m.objects if o.query is not None)
    assert query.object_id == f"{qid.get('extension')}^{qid.get('root')}" and qid.get("extension")
