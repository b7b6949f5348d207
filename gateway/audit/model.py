"""Typed model of one DICOM PS3.15 A.5 audit message (the ATNA "DICOM audit message format").

Pure data: :mod:`gateway.audit.xml` turns an :class:`AuditMessage` into the XML that travels in a
syslog frame and back; :mod:`gateway.audit.events` builds the messages each IHE transaction needs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal, Protocol

#: EventActionCode: Create, Read, Update, Delete, Execute.
Action = Literal["C", "R", "U", "D", "E"]
#: EventOutcomeIndicator: success, minor failure, serious failure, major failure.
Outcome = Literal[0, 4, 8, 12]
SUCCESS: Outcome = 0
MINOR_FAILURE: Outcome = 4
SERIOUS_FAILURE: Outcome = 8
MAJOR_FAILURE: Outcome = 12


@dataclass(frozen=True)
class Code:
    """A coded value (``csd-code``, ``codeSystemName``, ``originalText``)."""

    code: str
    system: str
    meaning: str


@dataclass(frozen=True)
class Participant:
    """``ActiveParticipant``: a user, process or network node taking part in the event."""

    user_id: str
    is_requestor: bool
    roles: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    user_name: str | None = None
    #: host name or IP address of the node; ``network_access_point_type`` 1 = name, 2 = IP, 5 = URI
    network_access_point: str | None = None
    network_access_point_type: Literal["1", "2", "3", "4", "5"] | None = None


@dataclass(frozen=True)
class ParticipantObject:
    """``ParticipantObjectIdentification``: the patient, study, document or query involved."""

    object_id: str
    id_type: Code
    type_code: Literal["1", "2", "3", "4"] | None = None
    role: str | None = None  #: ParticipantObjectTypeCodeRole "1".."26"
    lifecycle: str | None = None  #: ParticipantObjectDataLifeCycle "1".."15"
    name: str | None = None
    query: bytes | None = None  #: raw query (base64-encoded in the XML)
    details: tuple[tuple[str, bytes], ...] = ()  #: ParticipantObjectDetail type/value (value base64)
    #: DICOM description for studies: (SOP Class UID, number of instances)
    sop_classes: tuple[tuple[str, int], ...] = ()
    accession_numbers: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditSource:
    """``AuditSourceIdentification``: who reports the event."""

    source_id: str
    enterprise_site_id: str | None = None
    type_codes: tuple[str, ...] = ("4",)  #: 4 = application server process


@dataclass(frozen=True)
class AuditMessage:
    event_id: Code
    action: Action
    outcome: Outcome
    when: dt.datetime
    source: AuditSource
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    purposes_of_use: tuple[Code, ...] = ()
    outcome_description: str | None = None


@dataclass(frozen=True)
class AuditSummary:
    """The indexed facts of one message, kept beside it in the local store for ``xig audit ls``."""

    event: str  #: e.g. "ITI-55" / "RAD-75" / "110114" (the EventTypeCode, else the EventID code)
    outcome: int
    when: dt.datetime
    user: str = ""  #: the SAML UserName (alias<user@issuer>) or the requesting node
    community: str = ""  #: the remote homeCommunityId
    patients: tuple[str, ...] = ()  #: CX patient identifiers
    studies: tuple[str, ...] = field(default=())


class AuditSink(Protocol):
    """Where services put audit messages. ``record`` must be cheap and must never raise."""

    def record(self, message: AuditMessage) -> None: ...
