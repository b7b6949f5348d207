"""The audit messages of every IHE transaction XIG performs, and of its own security events (pure).

Each builder turns facts the caller already has into :class:`~gateway.audit.model.AuditMessage` values:
no I/O and no clock (the caller passes ``when``). The layouts follow the IHE audit tables, cited per
builder; where IHE leaves a field open, the DICOM PS3.15 A.5.3 message of the same event decides.

Conventions shared by every builder:

* **One message per patient** (ITI TF-2 3.20.7.1): a builder given several patients returns one message
  each; the other objects are repeated in every message.
* **Roles** (DICOM PS3.15 A.5.3.7/A.5.3.10, ITI TF-2 3.55.5.1, 3.18.5.1, 3.43.6.1): in a *query* the node
  that asks is the Source (110153) and the node that answers the Destination (110152); in a *retrieve* or
  *transfer* the roles follow the data: the node that sends the documents or images is the Source. So
  :class:`Context` names the two nodes by who asked (``initiator``) and who answered (``responder``) and
  each builder assigns the roles. The node that asked is ``UserIsRequestor=true`` whichever side audits
  (the IHE tables leave it "U"); the other is ``false`` (their "M: false").
* **Human requestor** (ITI TF-2 3.40.4.2): the SAML user is an extra ActiveParticipant with
  ``UserName = alias<user@issuer>``, ``UserIsRequestor=true`` and the SAML subject role as RoleIDCode.
* **PurposeOfUse** from the SAML assertion goes into ``EventIdentification/PurposeOfUse`` (ITI TF-2
  3.20.7.1.2, 3.40.4.1.2.3.1).
* **ParticipantObjectName or ParticipantObjectQuery**: the DICOM schema requires one of the two in every
  object while the IHE tables mark both "U", so an object without a query is named by its identifier.
* Patients are ``ParticipantObjectIDTypeCode`` EV(2, RFC-3881, "Patient Number") with the CX identifier
  (DICOM PS3.15 A.5.3 "Patient", ITI TF-2 3.20.7.1.3), documents EV(9, RFC-3881, "Report Number").
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.audit.model import (
    MAJOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    Action,
    AuditMessage,
    AuditSource,
    AuditSummary,
    Code,
    Outcome,
    Participant,
    ParticipantObject,
)

if TYPE_CHECKING:
    import datetime as dt

    from gateway.security.saml import CodedValue, VerifiedIdentity

# --------------------------------------------------------------------------------------------- codes

DCM = "DCM"
IHE_TRANSACTIONS = "IHE Transactions"
RFC_3881 = "RFC-3881"

# EventID (DICOM PS3.16 CID 400)
EV_APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
EV_INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
EV_INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
EV_EXPORT = Code("110106", DCM, "Export")
EV_IMPORT = Code("110107", DCM, "Import")
EV_QUERY = Code("110112", DCM, "Query")
EV_SECURITY_ALERT = Code("110113", DCM, "Security Alert")
EV_USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")

# EventTypeCode (DICOM PS3.16 CID 401/403; IHE transactions)
TYPE_APPLICATION_START = Code("110120", DCM, "Application Start")
TYPE_APPLICATION_STOP = Code("110121", DCM, "Application Stop")
TYPE_LOGIN = Code("110122", DCM, "Login")
TYPE_NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
TYPE_USE_OF_RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")
TYPE_ITI55 = Code("ITI-55", IHE_TRANSACTIONS, "Cross Gateway Patient Discovery")
TYPE_ITI38 = Code("ITI-38", IHE_TRANSACTIONS, "Cross Gateway Query")
TYPE_ITI39 = Code("ITI-39", IHE_TRANSACTIONS, "Cross Gateway Retrieve")
TYPE_RAD75 = Code("RAD-75", IHE_TRANSACTIONS, "Cross Gateway Retrieve Imaging Document Set")

# RoleIDCode (DICOM PS3.16 CID 402)
ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", DCM, "Application Launcher")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")

# ParticipantObjectIDTypeCode
ID_PATIENT_NUMBER = Code("2", RFC_3881, "Patient Number")
ID_REPORT_NUMBER = Code("9", RFC_3881, "Report Number")
ID_SEARCH_CRITERIA = Code("10", RFC_3881, "Search Criteria")
ID_STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
ID_NODE = Code("110182", DCM, "Node ID")

# ParticipantObjectDetail types; the IHE spellings differ between transactions and are normative
DETAIL_HOME_COMMUNITY = "ihe:homeCommunityID"  # ITI-55, ITI-43/39 (TF-2 notes the inconsistency)
DETAIL_XCA_HOME_COMMUNITY = "urn:ihe:iti:xca:2010:homeCommunityId"  # ITI-18/38
DETAIL_REPOSITORY = "Repository Unique ID"
DETAIL_QUERY_ENCODING = "QueryEncoding"
DETAIL_ALERT = "Alert Description"

_HOME_COMMUNITY_DETAILS = (DETAIL_HOME_COMMUNITY, DETAIL_XCA_HOME_COMMUNITY)

_IMPORT: tuple[Code, Action] = (EV_IMPORT, "C")
_EXPORT: tuple[Code, Action] = (EV_EXPORT, "R")
_ACCESSED: tuple[Code, Action] = (EV_INSTANCES_ACCESSED, "C")
_TRANSFERRED: tuple[Code, Action] = (EV_INSTANCES_TRANSFERRED, "R")

# ------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Peer:
    """A node taking part: ``user_id`` is its endpoint URL, AE title or process name, ``host`` its DNS name
    or IP address (NetworkAccessPointID), ``alternative_user_id`` e.g. the process id."""

    user_id: str
    host: str | None = None
    alternative_user_id: str | None = None


def _code_of(value: CodedValue) -> Code:
    return Code(value.code, value.code_system_name or value.code_system, value.display_name or value.code)


@dataclass(frozen=True)
class Requestor:
    """The human (or system) user a SAML assertion speaks for."""

    user_name: str  #: ``alias<user@issuer>`` (ITI TF-2 3.40.4.2)
    user_id: str
    organization: str = ""
    organization_id: str = ""
    home_community_id: str = ""
    role: Code | None = None

    @classmethod
    def from_identity(cls, identity: VerifiedIdentity) -> Requestor:
        """The user of a verified assertion: UserID is the XSPA subject-id (the NameID when the policy let
        the assertion omit it), the role its SNOMED CT subject role."""
        return cls(
            user_name=identity.audit_user_name,
            user_id=identity.subject_id or identity.name_id,
            organization=identity.organization,
            organization_id=identity.organization_id,
            home_community_id=identity.home_community_id,
            role=_code_of(identity.role) if identity.role.code else None,
        )


def purposes_of_use(identity: VerifiedIdentity) -> tuple[Code, ...]:
    """The assertion's PurposeOfUse as audit codes (none when the assertion carried none)."""
    purpose = identity.purpose_of_use
    return (_code_of(purpose),) if purpose.code else ()


@dataclass(frozen=True)
class Context:
    """What every transaction audit needs: which side audits, the outcome, the moment, the two nodes."""

    side: Literal["initiating", "responding"]
    outcome: Outcome
    when: dt.datetime
    source: AuditSource
    initiator: Peer  #: the node that sent the request (Source 110153 of a query)
    responder: Peer  #: the node that answered it (Destination 110152 of a query)
    user: Requestor | None = None
    purposes: tuple[Code, ...] = ()
    outcome_description: str | None = None


@dataclass(frozen=True)
class DocumentRef:
    unique_id: str
    repository_unique_id: str
    home_community_id: str


@dataclass(frozen=True)
class StudyRef:
    study_uid: str
    repository_unique_id: str = ""
    home_community_id: str = ""
    sop_classes: tuple[tuple[str, int], ...] = ()  #: (SOP Class UID, number of instances)
    accession_numbers: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ helpers


def _access_point(host: str | None) -> tuple[str | None, Literal["1", "2"] | None]:
    if not host:
        return None, None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host, "1"  # machine (DNS) name
    return host, "2"  # IP address


def _node(peer: Peer, *, requestor: bool, role: Code | None) -> Participant:
    point, point_type = _access_point(peer.host)
    return Participant(user_id=peer.user_id, is_requestor=requestor, roles=(role,) if role else (),
                       alternative_user_id=peer.alternative_user_id, network_access_point=point,
                       network_access_point_type=point_type)


def _human(user: Requestor, *, requestor: bool = True) -> Participant:
    return Participant(user_id=user.user_id, is_requestor=requestor, roles=(user.role,) if user.role else (),
                       user_name=user.user_name)


def _named(obj: ParticipantObject) -> ParticipantObject:
    """The DICOM schema needs a ParticipantObjectName or a ParticipantObjectQuery: name it by its id."""
    if obj.name is None and obj.query is None:
        return dataclasses.replace(obj, name=obj.object_id)
    return obj


def _patient(patient_id: str) -> ParticipantObject:
    return _named(ParticipantObject(object_id=patient_id, id_type=ID_PATIENT_NUMBER, type_code="1", role="1"))


def _hcid_details(kind: str, home_community_id: str) -> tuple[tuple[str, bytes], ...]:
    return ((kind, home_community_id.encode()),) if home_community_id else ()


def _document(doc: DocumentRef) -> ParticipantObject:
    return _named(ParticipantObject(
        object_id=doc.unique_id, id_type=ID_REPORT_NUMBER, type_code="2", role="3",
        details=((DETAIL_REPOSITORY, doc.repository_unique_id.encode()),)
        + _hcid_details(DETAIL_HOME_COMMUNITY, doc.home_community_id)))


def _study(study: StudyRef) -> ParticipantObject:
    details = ((DETAIL_REPOSITORY, study.repository_unique_id.encode()),) if study.repository_unique_id else ()
    # PS3.15 A.5.2 Table A.5.2-1: SOPClass is required when Accession is present, so accession numbers
    # travel only together with the SOP classes they belong to
    return _named(ParticipantObject(
        object_id=study.study_uid, id_type=ID_STUDY_INSTANCE_UID, type_code="2", role="3",
        details=details + _hcid_details(DETAIL_HOME_COMMUNITY, study.home_community_id),
        sop_classes=study.sop_classes, accession_numbers=study.accession_numbers if study.sop_classes else ()))


def _message(ctx: Context, *, event_id: Code, action: Action, participants: Sequence[Participant],
             objects: Sequence[ParticipantObject], event_type: Code | None = None,
             outcome: tuple[Outcome, str | None] | None = None) -> AuditMessage:
    """``outcome`` = (EventOutcomeIndicator, EventOutcomeDescription); the context's by default."""
    indicator, description = outcome or (ctx.outcome, ctx.outcome_description)
    return AuditMessage(event_id=event_id, action=action, outcome=indicator, when=ctx.when, source=ctx.source,
                        participants=tuple(participants), objects=tuple(objects),
                        event_types=(event_type,) if event_type else (), purposes_of_use=ctx.purposes,
                        outcome_description=description)


def _query_participants(ctx: Context) -> list[Participant]:
    """Query tables: the asking node is the Source, the answering node the Destination."""
    parts = [_node(ctx.initiator, requestor=True, role=ROLE_SOURCE),
             _node(ctx.responder, requestor=False, role=ROLE_DESTINATION)]
    if ctx.user is not None:
        parts.append(_human(ctx.user))
    return parts


def _transfer_participants(ctx: Context, *, data_from_responder: bool) -> list[Participant]:
    """Retrieve/transfer tables: the node sending the data is the Source (110153)."""
    if data_from_responder:  # retrieve: the answering node sends
        parts = [_node(ctx.responder, requestor=False, role=ROLE_SOURCE),
                 _node(ctx.initiator, requestor=True, role=ROLE_DESTINATION)]
    else:  # store: the asking node sends
        parts = [_node(ctx.initiator, requestor=True, role=ROLE_SOURCE),
                 _node(ctx.responder, requestor=False, role=ROLE_DESTINATION)]
    if ctx.user is not None:
        parts.append(_human(ctx.user))
    return parts


def _per_patient(patients: Sequence[str | None]) -> list[tuple[ParticipantObject, ...]]:
    """One entry per distinct patient (in order), or one empty entry when there is none."""
    distinct = list(dict.fromkeys(p for p in patients if p))
    return [(_patient(p),) for p in distinct] or [()]


def _failure_outcome(ctx: Context) -> Outcome:
    return ctx.outcome if ctx.outcome in (SERIOUS_FAILURE, MAJOR_FAILURE) else SERIOUS_FAILURE


def _split(ctx: Context, ok: Sequence[ParticipantObject], failed: Sequence[ParticipantObject],
           build: Callable[[Outcome, str | None, Sequence[ParticipantObject]], AuditMessage]) -> list[AuditMessage]:
    """ITI TF-2 3.43.6.1: a "success" event for what was retrieved and a "failure" event for the rest."""
    messages: list[AuditMessage] = []
    if ok:
        messages.append(build(SUCCESS, None, ok))
    if failed:
        messages.append(build(_failure_outcome(ctx), ctx.outcome_description, failed))
    if not messages:  # nothing identifiable was requested: still record the event itself
        messages.append(build(ctx.outcome, ctx.outcome_description, ()))
    return messages


# ----------------------------------------------------------------------------------- IHE transactions


def iti55(ctx: Context, *, query: bytes, home_community_id: str, patients: Sequence[str] = (),
          query_id: str = "") -> list[AuditMessage]:
    """ITI-55 Cross Gateway Patient Discovery (ITI TF-2 3.55.5.1): EventID 110112 Query, action E.

    The Query Parameters object (type 2, role 24, IDTypeCode ITI-55) carries the QueryByParameter as
    ParticipantObjectQuery and the ``ihe:homeCommunityID`` detail. The Initiating Gateway's message has
    no patient (its table: "Patient (0)") — ``patients`` is ignored there; the Responding Gateway audits
    one message per patient returned (CX), or one without a patient when none was. ``query_id`` (the
    HL7 queryId) becomes the ParticipantObjectID when known."""
    query_object = ParticipantObject(object_id=query_id, id_type=TYPE_ITI55, type_code="2", role="24",
                                     query=query, details=_hcid_details(DETAIL_HOME_COMMUNITY, home_community_id))
    groups = _per_patient(patients) if ctx.side == "responding" else [()]
    return [_message(ctx, event_id=EV_QUERY, action="E", event_type=TYPE_ITI55,
                     participants=_query_participants(ctx), objects=(*patient, query_object))
            for patient in groups]


def iti38(ctx: Context, *, query: bytes, query_id: str, home_community_id: str,
          patient: str | None) -> list[AuditMessage]:
    """ITI-38 Cross Gateway Query (ITI TF-2 3.38.4.1.4 → 3.18.5.1): both sides audit as the Registry
    Stored Query, EventID 110112 Query, action E, EventTypeCode ITI-38.

    Objects: the Patient (0..1) and the Query (type 2, role 24, IDTypeCode ITI-38, ParticipantObjectID =
    the stored query UUID, ParticipantObjectQuery = the whole AdhocQueryRequest, details
    ``QueryEncoding`` and ``urn:ihe:iti:xca:2010:homeCommunityId``)."""
    query_object = ParticipantObject(
        object_id=query_id, id_type=TYPE_ITI38, type_code="2", role="24", query=query,
        details=((DETAIL_QUERY_ENCODING, b"UTF-8"),) + _hcid_details(DETAIL_XCA_HOME_COMMUNITY, home_community_id))
    return [_message(ctx, event_id=EV_QUERY, action="E", event_type=TYPE_ITI38,
                     participants=_query_participants(ctx), objects=(*patient_obj, query_object))
            for patient_obj in _per_patient([patient])]


def iti39(ctx: Context, *, documents: Sequence[DocumentRef], failed: Sequence[DocumentRef] = (),
          patient: str | None = None) -> list[AuditMessage]:
    """ITI-39 Cross Gateway Retrieve (ITI TF-2 3.39.6 → 3.43.6.1), EventTypeCode ITI-39.

    Initiating Gateway = Document Consumer: EventID 110107 Import, action C. Responding Gateway =
    Document Repository: EventID 110106 Export, action R. The Responding Gateway is the Source, the
    Initiating Gateway the Destination. One Document object (type 2, role 3, ID = DocumentUniqueId,
    details ``Repository Unique ID`` and ``ihe:homeCommunityID``) per document; documents delivered and
    documents not delivered are audited in separate messages (success 0 / failure)."""
    event_id, action = _IMPORT if ctx.side == "initiating" else _EXPORT
    patient_objects = _per_patient([patient])[0]

    def build(outcome: Outcome, description: str | None, docs: Sequence[ParticipantObject]) -> AuditMessage:
        return _message(ctx, event_id=event_id, action=action, event_type=TYPE_ITI39, outcome=(outcome, description),
                        participants=_transfer_participants(ctx, data_from_responder=True),
                        objects=(*patient_objects, *docs))

    return _split(ctx, [_document(d) for d in documents], [_document(d) for d in failed], build)


def rad75(ctx: Context, *, studies: Sequence[StudyRef], failed: Sequence[StudyRef] = (),
          patient: str | None = None) -> list[AuditMessage]:
    """RAD-75 Cross Gateway Retrieve Imaging Document Set, EventTypeCode RAD-75.

    The RAD TF-3 audit table was not available; this follows the practice of the IHE reference
    implementation (spec digest §8) and DICOM PS3.15 A.5.3.6/A.5.3.7: Initiating Imaging Gateway
    EventID 110103 DICOM Instances Accessed, action C; Responding Imaging Gateway 110104 DICOM
    Instances Transferred, action R. The responding side sends the images (Source). One Study object
    (type 2, role 3, IDTypeCode 110180, details ``Repository Unique ID`` and ``ihe:homeCommunityID``,
    SOP classes in its description) per study; delivered and not delivered studies audited apart."""
    event_id, action = _ACCESSED if ctx.side == "initiating" else _TRANSFERRED
    patient_objects = _per_patient([patient])[0]

    def build(outcome: Outcome, description: str | None, objs: Sequence[ParticipantObject]) -> AuditMessage:
        return _message(ctx, event_id=event_id, action=action, event_type=TYPE_RAD75, outcome=(outcome, description),
                        participants=_transfer_participants(ctx, data_from_responder=True),
                        objects=(*patient_objects, *objs))

    return _split(ctx, [_study(s) for s in studies], [_study(s) for s in failed], build)


# ----------------------------------------------------------------------------------- local PACS legs


def pacs_query(ctx: Context, *, query: bytes, patient: str | None, transaction: str = "C-FIND") -> list[AuditMessage]:
    """A query to the local PACS: DICOM PS3.15 A.5.3.10 Query, EventID 110112, action E.

    XIG (``ctx.initiator``) is the Source, the PACS (``ctx.responder``) the Destination. The query is
    XIG's own description of what it asked (not a DICOM data set), so the object uses the non-DICOM form
    A.5.3.10 Note 2 allows: type 2, role 3, IDTypeCode EV(10, RFC-3881, "Search Criteria"),
    ParticipantObjectID = the protocol (``C-FIND``, ``QIDO-RS``, ...), ParticipantObjectQuery = the query.
    Plus the Patient when the query is about one."""
    query_object = ParticipantObject(object_id=transaction, id_type=ID_SEARCH_CRITERIA, type_code="2", role="3",
                                     query=query)
    return [_message(ctx, event_id=EV_QUERY, action="E", participants=_query_participants(ctx),
                     objects=(*patient_obj, query_object))
            for patient_obj in _per_patient([patient])]


def _transferred(ctx: Context, *, action: Action, studies: Sequence[StudyRef], patient: str | None,
                 data_from_responder: bool) -> list[AuditMessage]:
    return [_message(ctx, event_id=EV_INSTANCES_TRANSFERRED, action=action,
                     participants=_transfer_participants(ctx, data_from_responder=data_from_responder),
                     objects=(*patient_obj, *(_study(s) for s in studies)))
            for patient_obj in _per_patient([patient])]


def pacs_retrieve(ctx: Context, *, studies: Sequence[StudyRef], patient: str | None) -> list[AuditMessage]:
    """Instances read from the local PACS (C-GET/C-MOVE/WADO-RS): DICOM PS3.15 A.5.3.7 DICOM Instances
    Transferred, EventID 110104, action R (XIG reads them to pass them on; it keeps no copy). The PACS
    (``ctx.responder``) sends, so it is the Source; XIG the Destination. One Study object per study."""
    return _transferred(ctx, action="R", studies=studies, patient=patient, data_from_responder=True)


def pacs_store(ctx: Context, *, studies: Sequence[StudyRef], patient: str | None) -> list[AuditMessage]:
    """The import station storing instances into its own PACS (C-STORE/STOW-RS): DICOM PS3.15 A.5.3.7
    DICOM Instances Transferred, EventID 110104, action C (the PACS did not hold them). XIG
    (``ctx.initiator``) sends, so it is the Source; the PACS the Destination."""
    return _transferred(ctx, action="C", studies=studies, patient=patient, data_from_responder=False)


# ----------------------------------------------------------------------------------- security events


def authentication_failure(*, when: dt.datetime, source: AuditSource, peer: Peer, reason: str,
                           user_name: str | None = None, node: Peer | None = None,
                           kind: Literal["node", "user"] | None = None,
                           outcome: Outcome = SERIOUS_FAILURE) -> AuditMessage:
    """A caller XIG refused. ``peer`` is the calling node, ``node`` XIG's own process, ``reason`` why.

    ``kind="node"`` — a TLS client without a trusted certificate: ITI TF-2 Table 3.20.4.1.1.1-1
    "Node-Authentication-failure" = DICOM PS3.15 A.5.3.11 Security Alert, EventID 110113, action E,
    EventTypeCode 110126 Node Authentication; the reporting process (``node``) and the performing node
    (``peer``, UserIsRequestor false); Alert Subject object = the peer (IDTypeCode 110182 Node ID) with
    the ``Alert Description`` detail.

    ``kind="user"`` — an assertion that failed verification (ITI TF-2 3.40.4.1.3 "Authentication
    Failure"): DICOM PS3.15 A.5.3.12 User Authentication, EventID 110114, action E, EventTypeCode 110122
    Login; the person claimed (``user_name`` = alias<user@issuer> when it could be read, at the peer's
    network address) and the node performing the authentication (``node``); no objects.

    Without ``kind``: ``"user"`` when a ``user_name`` is given, else ``"node"``. The outcome is Serious
    failure (8, "action terminated", A.5.2); ``reason`` is the EventOutcomeDescription."""
    chosen = kind or ("user" if user_name else "node")
    point, point_type = _access_point(peer.host)
    if chosen == "user":
        person = Participant(user_id=user_name or peer.user_id, is_requestor=True, user_name=user_name,
                             alternative_user_id=peer.alternative_user_id, network_access_point=point,
                             network_access_point_type=point_type)
        parts = [person] + ([_node(node, requestor=False, role=None)] if node else [])
        return AuditMessage(event_id=EV_USER_AUTHENTICATION, action="E", outcome=outcome, when=when, source=source,
                            participants=tuple(parts), event_types=(TYPE_LOGIN,), outcome_description=reason)
    reporter = (_node(node, requestor=True, role=None) if node
                else Participant(user_id=source.source_id, is_requestor=True))
    performer = dataclasses.replace(_node(peer, requestor=False, role=None), user_name=user_name)
    subject = _named(ParticipantObject(object_id=peer.host or peer.user_id, id_type=ID_NODE, type_code="2",
                                       role="13", details=((DETAIL_ALERT, reason.encode()),)))
    return AuditMessage(event_id=EV_SECURITY_ALERT, action="E", outcome=outcome, when=when, source=source,
                        participants=(reporter, performer), objects=(subject,),
                        event_types=(TYPE_NODE_AUTHENTICATION,), outcome_description=reason)


def security_alert(*, when: dt.datetime, source: AuditSource, peer: Peer, user: Requestor | None, reason: str,
                   objects: Sequence[ParticipantObject] = (), node: Peer | None = None,
                   event_type: Code = TYPE_USE_OF_RESTRICTED_FUNCTION,
                   outcome: Outcome = SERIOUS_FAILURE) -> AuditMessage:
    """A refused attempt, e.g. RAD-75 asking for UIDs never delivered in a manifest (UID guessing):
    DICOM PS3.15 A.5.3.11 Security Alert, EventID 110113, action E, EventTypeCode 110132 Use of
    Restricted Function by default.

    Participants: the reporting process (``node``, else the audit source) and, as performing
    participants (UserIsRequestor false, as A.5.3.11 requires), the calling node and the SAML user.
    Every alert subject in ``objects`` gets the mandatory ``Alert Description`` detail (``reason``);
    without objects the calling node is the subject (110182 Node ID). Outcome: Serious failure (8) — the
    refusal worked ("mitigation efforts were effective")."""
    reporter = (_node(node, requestor=True, role=None) if node
                else Participant(user_id=source.source_id, is_requestor=True))
    parts = [reporter, _node(peer, requestor=False, role=None)]
    if user is not None:
        parts.append(_human(user, requestor=False))
    alert = (DETAIL_ALERT, reason.encode())
    subjects = [o if any(kind == DETAIL_ALERT for kind, _ in o.details) else dataclasses.replace(
        o, details=(*o.details, alert)) for o in objects] or [ParticipantObject(
            object_id=peer.host or peer.user_id, id_type=ID_NODE, type_code="2", role="13", details=(alert,))]
    return AuditMessage(event_id=EV_SECURITY_ALERT, action="E", outcome=outcome, when=when, source=source,
                        participants=tuple(parts), objects=tuple(_named(o) for o in subjects),
                        event_types=(event_type,), outcome_description=reason)


def application_activity(*, when: dt.datetime, source: AuditSource, started: bool, process: Peer,
                         user: str | None = None) -> AuditMessage:
    """XIG starting or stopping (ITI TF-2 Table 3.20.4.1.1.1-1 "Actor-start-stop"): DICOM PS3.15
    A.5.3.1 Application Activity, EventID 110100, action E, EventTypeCode 110120 Application Start /
    110121 Application Stop; the application (RoleIDCode 110150) and, when known, the user who launched
    it (110151 Application Launcher, UserIsRequestor true). No objects."""
    parts = [_node(process, requestor=user is None, role=ROLE_APPLICATION)]
    if user:
        parts.append(Participant(user_id=user, is_requestor=True, roles=(ROLE_APPLICATION_LAUNCHER,)))
    return AuditMessage(event_id=EV_APPLICATION_ACTIVITY, action="E", outcome=SUCCESS, when=when, source=source,
                        participants=tuple(parts),
                        event_types=(TYPE_APPLICATION_START if started else TYPE_APPLICATION_STOP,))


# ------------------------------------------------------------------------------------------- summary


def summarize(message: AuditMessage) -> AuditSummary:
    """The indexed facts of ``message`` for the local audit store.

    ``event``: the IHE transaction (EventTypeCode of system "IHE Transactions", e.g. ``ITI-55``), else
    the EventID code (``110114``, ``110113``, ...). ``user``: the UserName of the first participant that
    has one (the SAML user, alias<user@issuer>), else the UserID of the first requestor. ``community``:
    the first homeCommunityId detail. ``patients``/``studies``: the patient / Study Instance UID
    object ids, in order, without repeats."""
    event = next((t.code for t in message.event_types if t.system == IHE_TRANSACTIONS), message.event_id.code)
    user = next((p.user_name for p in message.participants if p.user_name), None)
    if user is None:
        user = next((p.user_id for p in message.participants if p.is_requestor), "")
    community = next((value.decode("utf-8", "replace") for o in message.objects for kind, value in o.details
                      if kind in _HOME_COMMUNITY_DETAILS), "")
    patients = tuple(dict.fromkeys(o.object_id for o in message.objects if o.type_code == "1" and o.role == "1"))
    studies = tuple(dict.fromkeys(o.object_id for o in message.objects if o.id_type.code == ID_STUDY_INSTANCE_UID.code
                                  and o.id_type.system == DCM))
    return AuditSummary(event=event, outcome=message.outcome, when=message.when, user=user, community=community,
                        patients=patients, studies=studies)
