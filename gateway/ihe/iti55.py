"""ITI-55 Cross Gateway Patient Discovery (XCPD): the PRPA_IN201305UV02 / PRPA_IN201306UV02 codec.

A pure codec: lxml elements in, frozen dataclasses out, and back. No I/O, no matching, no SOAP envelope
(the SOAP layer hands over and takes back the body element).

Responding side
    :func:`parse_request` reads a PRPA_IN201305UV02 into a :class:`PatientDiscoveryQuery`;
    :func:`build_response` answers it with a PRPA_IN201306UV02 for every case of ITI TF-2 3.55.4.2.3:

    * :class:`Matches` → AA / OK, one registrationEvent per matched patient (Cases 1, 2);
    * :class:`MoreAttributesRequested` → AA / OK, no registrationEvent, ActOrderRequired codes (Case 3);
    * :class:`NoMatch` → AA / NF (Case 4);
    * :class:`CannotAnswer` → AE / AE, optional DetectedIssueManagement code (Case 5).

Initiating side
    :func:`build_request` writes a PRPA_IN201305UV02 from :class:`PatientDemographics`;
    :func:`parse_response` reads any partner's PRPA_IN201306UV02 into a :class:`PatientDiscoveryResult`.

Errors in a request (see :class:`Iti55RequestError`)
    * A message that is not a usable PRPA_IN201305UV02 at all — unparseable, schema-invalid, wrong root
      element, no message id, no sender device, no ``controlActProcess``/``queryByParameter``/``queryId``/
      ``parameterList`` — is a **SOAP Sender fault** (:meth:`Iti55RequestError.to_fault`): there is nothing
      to echo in an HL7 response.
    * A structurally valid query the responder cannot satisfy — an impossible birth time such as NIST's
      ``19849711``, a reversed birth-time range, neither a LivingSubjectName nor a LivingSubjectId — is
      answered with an **AE** PRPA_IN201306UV02 (Case 5): the error carries the query parsed so far
      (``err.query``) and :meth:`Iti55RequestError.outcome` gives the :class:`CannotAnswer` to pass to
      :func:`build_response`.

Tolerance for real peers
    * HL7 elements without a namespace (the Epic-bound Carequality request has un-namespaced ``receiver``
      and ``sender`` inside an ``urn:hl7-org:v3`` message) are moved into ``urn:hl7-org:v3`` in a copy
      before parsing (:func:`normalise_hl7`, also usable before schema validation); the caller's
      element is never modified.
    * ``acceptAckCode`` AL or NE, ``processingCode`` P or T, ``responsePriorityCode`` I or D are taken as
      sent (the service decides what to do with D); MatchAlgorithm/MinimumDegreeMatch are read but may be
      ignored (TF-2 Tbl 3.55.4.1.2.2-1).
    * In responses, the queryMatchObservation code (``IHE_PDQ`` per the spec, ``IHE_PQ`` in IPF's sample)
      is not checked; empty ``<id/>``/``<telecom/>`` elements (Metriport) are skipped; the health data
      locator code may be ``NotHealthDataLocator`` or ``SupportsHealthDataLocator``.

Identifier forms: HL7 carries OIDs bare in ``@root``; homeCommunityIds in this module's dataclasses are
normalised to ``urn:oid:`` (XCA form) and written back bare.

Service recipe (responding gateway)::

    el = iti55.normalise_hl7(body)
    default_schemas().validate(el)            # Sender fault if schema-invalid
    try:
        query = iti55.parse_request(el)
    except Iti55RequestError as err:
        if err.is_fault:
            raise err.to_fault()
        return iti55.build_response(err.query, err.outcome(), ...)   # AE
    outcome = await matching.match_patients(...)  # PacsError → CannotAnswer("ResponderBusy"/"InternalError")
    return iti55.build_response(query, outcome, ...)

Validate first: the response echoes ``queryByParameter`` verbatim, so a schema-invalid request would give
a schema-invalid response. A ``responsePriorityCode`` of ``D`` (Deferred option) is the service's business
(MCCI_IN000002UV01 accept ack with NS250 when unsupported); this module does not build that message.
"""

from __future__ import annotations

import calendar
import re
import uuid
from copy import deepcopy
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Final, Literal

from lxml import etree

from gateway.errors import XIG_MALFORMED, SoapFault, XigError, sender_fault
from gateway.soap import ns
from gateway.soap.schema import standalone_copy

HL7: Final = ns.HL7

REQUEST_INTERACTION: Final = "PRPA_IN201305UV02"
RESPONSE_INTERACTION: Final = "PRPA_IN201306UV02"
REQUEST_TRIGGER: Final = "PRPA_TE201305UV02"
RESPONSE_TRIGGER: Final = "PRPA_TE201306UV02"
#: HL7 interaction / trigger-event code system
INTERACTION_SYSTEM: Final = "2.16.840.1.113883.1.6"
ADMINISTRATIVE_GENDER_SYSTEM: Final = "2.16.840.1.113883.5.1"
#: HL7 AcknowledgementDetailCode (INTERR, SYN102, SYN105, ...)
ACK_DETAIL_SYSTEM: Final = "2.16.840.1.113883.5.1100"
#: HL7 ActCode: the detectedIssueEvent code
DETECTED_ISSUE_SYSTEM: Final = "2.16.840.1.113883.5.4"
DETECTED_ISSUE_CODE: Final = "ActAdministrativeDetectedIssueCode"
#: ITI TF-2 3.55.4.2.2.6 (Case 3) ActOrderRequired codes
MORE_ATTRIBUTES_SYSTEM: Final = "1.3.6.1.4.1.19376.1.2.27.1"
#: ITI TF-2 3.55.4.2.2.5 custodian/assignedEntity/code
HEALTH_DATA_LOCATOR_SYSTEM: Final = "1.3.6.1.4.1.19376.1.2.27.2"
#: ITI TF-2 3.55.4.2.2.7 (Case 5) DetectedIssueManagement codes
ISSUE_MANAGEMENT_SYSTEM: Final = "1.3.6.1.4.1.19376.1.2.27.3"
QUERY_MATCH_CODE: Final = "IHE_PDQ"

GENDER_REQUESTED: Final = "LivingSubjectAdministrativeGenderRequested"
ADDRESS_REQUESTED: Final = "PatientAddressRequested"
TELECOM_REQUESTED: Final = "PatientTelecomRequested"
BIRTH_PLACE_NAME_REQUESTED: Final = "LivingSubjectBirthPlaceNameRequested"
BIRTH_PLACE_ADDRESS_REQUESTED: Final = "LivingSubjectBirthPlaceAddressRequested"
MOTHERS_MAIDEN_NAME_REQUESTED: Final = "MothersMaidenNameRequested"
#: The IHE value set of ActOrderRequired codes, in the order XIG emits them.
MORE_ATTRIBUTE_CODES: Final = (
    GENDER_REQUESTED,
    ADDRESS_REQUESTED,
    TELECOM_REQUESTED,
    BIRTH_PLACE_NAME_REQUESTED,
    BIRTH_PLACE_ADDRESS_REQUESTED,
    MOTHERS_MAIDEN_NAME_REQUESTED,
)

IssueCode = Literal["ResponderBusy", "AnswerNotAvailable", "InternalError"]
ISSUE_CODES: Final = ("ResponderBusy", "AnswerNotAvailable", "InternalError")

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
# HL7 TS: YYYY[MM[DD[HH[MM[SS[.S{1,4}]]]]]][+/-ZZZZ]
_TS_RE = re.compile(
    r"^(?P<y>\d{4})(?:(?P<m>\d{2})(?:(?P<d>\d{2})(?:(?P<hh>\d{2})(?:(?P<mi>\d{2})(?:(?P<ss>\d{2})(?:\.\d{1,4})?)?)?)?)?)?"
    r"(?:[+-]\d{4})?$"
)
_WS_RE = re.compile(r"\s+")


# -- data types -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class II:
    """An HL7 instance identifier: ``root`` (OID/UUID) and optional ``extension``."""

    root: str
    extension: str | None = None

    def __str__(self) -> str:
        return self.root if self.extension is None else f"{self.extension}^^^&{self.root}&ISO"


@dataclass(frozen=True)
class PersonName:
    """An HL7 PN / EN. Several ``family`` parts are a double family name (``García`` + ``López``)."""

    family: tuple[str, ...] = ()
    given: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    #: unstructured content when the name has no parts (``<value>John Smith</value>``)
    text: str | None = None
    use: str | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.family or self.given or self.prefix or self.suffix or self.text)

    @classmethod
    def from_dicom(cls, pn: str) -> PersonName:
        """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` (first component group) → PersonName.

        The family component is kept whole (``García López``); given and middle names are split at spaces.
        """
        alphabetic = pn.split("=", 1)[0]
        comps = [_clean(c) or "" for c in alphabetic.split("^")] + [""] * 5
        family, given, middle, prefix, suffix = comps[:5]
        return cls(
            family=(family,) if family else (),
            given=tuple(given.split()) + tuple(middle.split()),
            prefix=tuple(prefix.split()),
            suffix=tuple(suffix.split()),
        )


@dataclass(frozen=True)
class Address:
    street: tuple[str, ...] = ()
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None
    use: str | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.street or self.city or self.state or self.postal_code or self.country)


@dataclass(frozen=True)
class Telecom:
    """An HL7 TEL: a URL such as ``tel:+1-555-0100`` or ``mailto:x@y``; ``use`` e.g. HP, WP, MC."""

    value: str
    use: str | None = None


@dataclass(frozen=True)
class BirthTime:
    """LivingSubject.birthTime as queried: an exact or partial date (``value``) or a ``low``/``high`` range.

    Dates are kept as ``YYYY``, ``YYYYMM`` or ``YYYYMMDD`` (any time of day is dropped). A range may be
    open on one side.
    """

    value: str | None = None
    low: str | None = None
    high: str | None = None

    @property
    def is_range(self) -> bool:
        return self.value is None

    def bounds(self) -> tuple[date, date]:
        """Earliest and latest birth date the criterion admits (inclusive)."""
        if self.value is not None:
            return date_bounds(self.value)
        low = date_bounds(self.low)[0] if self.low else date.min
        high = date_bounds(self.high)[1] if self.high else date.max
        return low, high


@dataclass(frozen=True)
class PatientDemographics:
    """What one side knows about a patient: the parameters of a request, or a matched patient's traits.

    ``ids`` are identifiers in other assigning authorities (LivingSubjectId in a request, asOtherIDs in a
    response). ``birth_time`` is a (possibly partial) date ``YYYY[MM[DD]]``; in a parsed response it is
    kept as sent by the partner.
    """

    names: tuple[PersonName, ...] = ()
    gender: str | None = None
    birth_time: str | None = None
    addresses: tuple[Address, ...] = ()
    telecoms: tuple[Telecom, ...] = ()
    ids: tuple[II, ...] = ()
    mothers_maiden_name: PersonName | None = None
    birth_place_name: str | None = None
    birth_place_address: Address | None = None


@dataclass(frozen=True)
class PatientDiscoveryQuery:
    """A parsed PRPA_IN201305UV02 (ITI TF-2 3.55.4.1.2)."""

    message_id: II
    sender_device_id: II
    query_id: II
    #: the original ``queryByParameter`` (in urn:hl7-org:v3), echoed in the response
    query_by_parameter: etree._Element = field(compare=False, repr=False)
    creation_time: str | None = None
    #: initiator homeCommunityId (sender/device/asAgent/representedOrganization/id/@root), ``urn:oid:`` form
    sender_home_community_id: str | None = None
    receiver_device_id: II | None = None
    receiver_home_community_id: str | None = None
    #: respondTo/telecom (Deferred Response option)
    respond_to: str | None = None
    #: authorOrPerformer[AUT]/assignedDevice/id/@root: the patient-ID assigning authority for the reverse query
    assigning_authority: str | None = None
    processing_code: str | None = None
    processing_mode_code: str | None = None
    accept_ack_code: str | None = None
    response_priority_code: str | None = None
    response_modality_code: str | None = None
    match_algorithm: str | None = None
    minimum_degree_match: int | None = None
    #: LivingSubjectName values (several = OR)
    names: tuple[PersonName, ...] = ()
    birth_time: BirthTime | None = None
    gender: str | None = None
    ids: tuple[II, ...] = ()
    addresses: tuple[Address, ...] = ()
    telecoms: tuple[Telecom, ...] = ()
    mothers_maiden_names: tuple[PersonName, ...] = ()
    birth_place_addresses: tuple[Address, ...] = ()
    birth_place_names: tuple[str, ...] = ()
    principal_care_provider_ids: tuple[II, ...] = ()

    @property
    def initiator_patient_id(self) -> II | None:
        """The LivingSubjectId in the initiator's assigning authority (for the reverse XCA query)."""
        if self.assigning_authority is None:
            return None
        return next((i for i in self.ids if i.root == self.assigning_authority and i.extension), None)


# -- outcomes (responding side) ---------------------------------------------------------------------


@dataclass(frozen=True)
class MatchedPatient:
    """One local patient to return: ``patient_id`` in our assigning authority, with its score (0-100)."""

    patient_id: str
    score: int
    demographics: PatientDemographics = field(default_factory=PatientDemographics)


@dataclass(frozen=True)
class Matches:
    """Cases 1 and 2: AA / OK with one registrationEvent per patient."""

    patients: tuple[MatchedPatient, ...]

    def __post_init__(self) -> None:
        if not self.patients:
            raise ValueError("Matches needs at least one patient (use NoMatch)")


@dataclass(frozen=True)
class MoreAttributesRequested:
    """Case 3: AA / OK, no patient, ActOrderRequired codes (``MORE_ATTRIBUTE_CODES``)."""

    codes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.codes:
            raise ValueError("MoreAttributesRequested needs at least one code")


@dataclass(frozen=True)
class NoMatch:
    """Case 4: AA / NF."""


@dataclass(frozen=True)
class CannotAnswer:
    """Case 5: AE / AE. ``code`` is the DetectedIssueManagement code (omitted when None); ``text`` and
    ``detail_code`` (HL7 AcknowledgementDetailCode) go into acknowledgement/acknowledgementDetail."""

    code: IssueCode | None = "InternalError"
    text: str | None = None
    detail_code: str = "INTERR"


Outcome = Matches | MoreAttributesRequested | NoMatch | CannotAnswer


# -- results (initiating side) ----------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveredPatient:
    """A registrationEvent of a partner's response."""

    patient_id: II
    demographics: PatientDemographics
    #: custodian/assignedEntity/id/@root, ``urn:oid:`` form (None when absent or empty)
    home_community_id: str | None = None
    #: True for SupportsHealthDataLocator, False for NotHealthDataLocator, None when absent
    health_data_locator: bool | None = None
    score: int | None = None


@dataclass(frozen=True)
class AckDetail:
    code: str | None
    text: str | None
    type_code: str | None = None


@dataclass(frozen=True)
class PatientDiscoveryResult:
    """A parsed PRPA_IN201306UV02."""

    ack_code: str | None
    query_response_code: str | None
    patients: tuple[DiscoveredPatient, ...] = ()
    #: Case 3 ActOrderRequired codes
    more_attributes_requested: tuple[str, ...] = ()
    #: Case 5 DetectedIssueManagement codes
    issue_codes: tuple[str, ...] = ()
    ack_details: tuple[AckDetail, ...] = ()
    message_id: II | None = None
    target_message_id: II | None = None
    query_id: II | None = None
    creation_time: str | None = None
    sender_device_id: II | None = None
    sender_home_community_id: str | None = None

    @property
    def status(self) -> Literal["match", "more-attributes", "no-match", "error"]:
        if self.ack_code == "AE" or self.query_response_code in ("AE", "QE"):
            return "error"
        if self.patients:
            return "match"
        if self.more_attributes_requested:
            return "more-attributes"
        return "no-match"


# -- errors -------------------------------------------------------------------------------------------


class Iti55RequestError(XigError):
    """A PRPA_IN201305UV02 XIG cannot use.

    ``query is None`` (``is_fault``): the message is unparseable or schema-invalid (no message id, sender,
    controlActProcess, queryByParameter, queryId or parameterList) → answer with :meth:`to_fault`, a SOAP
    Sender fault. Otherwise the query is structurally valid but cannot be satisfied (invalid birth time,
    neither name nor id) → answer ``build_response(err.query, err.outcome(), ...)``, an AE response.
    """

    def __init__(self, reason: str, *, query: PatientDiscoveryQuery | None = None, detail_code: str = "SYN") -> None:
        super().__init__(reason)
        self.reason = reason
        self.query = query
        self.detail_code = detail_code

    @property
    def is_fault(self) -> bool:
        return self.query is None

    def to_fault(self) -> SoapFault:
        return sender_fault(XIG_MALFORMED, f"unusable PRPA_IN201305UV02: {self.reason}")

    def outcome(self) -> CannotAnswer:
        return CannotAnswer(code=None, text=self.reason, detail_code=self.detail_code)


class Iti55ResponseError(XigError):
    """A partner's PRPA_IN201306UV02 is not usable (wrong element, no acknowledgement at all)."""


class _ParameterError(Exception):
    def __init__(self, reason: str, detail_code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail_code = detail_code


# -- small helpers ------------------------------------------------------------------------------------


def _q(local: str) -> str:
    return f"{{{HL7}}}{local}"


def _path(*steps: str) -> str:
    return "/".join(_q(s) for s in steps)


def _find(el: etree._Element | None, *steps: str) -> etree._Element | None:
    if el is None:
        return None
    return el.find(_path(*steps))


def _findall(el: etree._Element | None, *steps: str) -> list[etree._Element]:
    if el is None:
        return []
    return list(el.iterfind(_path(*steps)))


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    value = _WS_RE.sub(" ", text).strip()
    return value or None


def _attr(el: etree._Element | None, name: str) -> str | None:
    if el is None:
        return None
    return _clean(el.get(name))


def _code(el: etree._Element | None, *steps: str) -> str | None:
    return _attr(_find(el, *steps), "code")


def _ii(el: etree._Element | None) -> II | None:
    if el is None or el.get("nullFlavor"):
        return None
    root = _attr(el, "root")
    if not root:
        return None
    return II(root, _attr(el, "extension"))


def _local(el: etree._Element) -> str | None:
    return ns.local(el) or None


def bare_oid(value: str) -> str:
    """``urn:oid:1.2.3`` → ``1.2.3`` (anything else is returned trimmed)."""
    v = value.strip()
    return v[8:] if v.lower().startswith("urn:oid:") else v


def hcid_urn(root: str | None) -> str | None:
    """An ``@root`` homeCommunityId → ``urn:oid:<oid>``; a non-OID value is kept as sent; empty → None."""
    if root is None:
        return None
    v = bare_oid(root).strip("{} ")
    if not v:
        return None
    return f"urn:oid:{v}" if _OID_RE.match(v) else root.strip()


def parse_date(value: str) -> str:
    """An HL7 TS → ``YYYY``, ``YYYYMM`` or ``YYYYMMDD`` (time of day and zone dropped).

    Raises ValueError for anything that is not a real calendar date (``19849711``, ``$dob$``).
    """
    m = _TS_RE.match(value.strip())
    if m is None:
        raise ValueError(f"{value!r} is not an HL7 date/time (YYYY[MM[DD[HHMM[SS]]]][+ZZZZ])")
    year = int(m["y"])
    if year < 1:
        raise ValueError(f"{value!r}: year 0000 does not exist")
    if m["m"] is None:
        return m["y"]
    month = int(m["m"])
    if not 1 <= month <= 12:
        raise ValueError(f"{value!r}: month {m['m']} does not exist")
    if m["d"] is None:
        return m["y"] + m["m"]
    try:
        date(year, month, int(m["d"]))
    except ValueError:
        raise ValueError(f"{value!r}: day {m['d']} does not exist in {m['y']}-{m['m']}") from None
    if m["hh"] is not None and (
        int(m["hh"]) > 23 or (m["mi"] is not None and int(m["mi"]) > 59) or (m["ss"] is not None and int(m["ss"]) > 60)
    ):
        raise ValueError(f"{value!r}: invalid time of day")
    return m["y"] + m["m"] + m["d"]


def date_bounds(partial: str) -> tuple[date, date]:
    """``YYYY`` / ``YYYYMM`` / ``YYYYMMDD`` → first and last day it covers."""
    year = int(partial[:4])
    if len(partial) < 6:
        return date(year, 1, 1), date(year, 12, 31)
    month = int(partial[4:6])
    if len(partial) < 8:
        return date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1])
    day = date(year, month, int(partial[6:8]))
    return day, day


def _timestamp(now: datetime | None) -> str:
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment.year:04d}{moment.month:02d}{moment.day:02d}{moment.hour:02d}{moment.minute:02d}{moment.second:02d}"


def normalise_hl7(element: etree._Element) -> etree._Element:
    """A standalone copy of ``element`` in which every element without a namespace is put into
    ``urn:hl7-org:v3`` (real peers send un-namespaced ``receiver``/``sender``). The original is untouched;
    the copy can be schema-validated and parsed.
    """
    copy = standalone_copy(element)
    for el in copy.iter():
        if isinstance(el.tag, str) and not el.tag.startswith("{"):
            el.tag = _q(el.tag)
    return copy


def _prepare(element: etree._Element, expected: str) -> etree._Element | None:
    """The HL7-normalised copy of ``element`` (or of the body of a SOAP envelope), None if it is not ``expected``."""
    if element.tag in (ns.q(ns.SOAP12, "Envelope"), ns.q(ns.SOAP11, "Envelope")):
        body = next((c for c in element if _local(c) == "Body"), None)
        payload = next((c for c in body if isinstance(c.tag, str)), None) if body is not None else None
        if payload is None:
            return None
        element = payload
    if not isinstance(element.tag, str):
        return None
    qname = etree.QName(element)
    if qname.localname != expected or qname.namespace not in (HL7, None):
        return None
    return normalise_hl7(element)


# -- HL7 data type readers ----------------------------------------------------------------------------


def _parse_pn(el: etree._Element) -> PersonName | None:
    if el.get("nullFlavor"):
        return None
    parts: dict[str, list[str]] = {"family": [], "given": [], "prefix": [], "suffix": []}
    for child in el:
        local = _local(child)
        if local in parts:
            text = _clean("".join(child.itertext()))
            if text:
                parts[local].append(text)
    text = None
    if not any(parts.values()):
        text = _clean("".join(el.itertext()))
    name = PersonName(
        family=tuple(parts["family"]),
        given=tuple(parts["given"]),
        prefix=tuple(parts["prefix"]),
        suffix=tuple(parts["suffix"]),
        text=text,
        use=_attr(el, "use"),
    )
    return None if name.is_empty else name


def _parse_ad(el: etree._Element) -> Address | None:
    if el.get("nullFlavor"):
        return None
    street: list[str] = []
    values: dict[str, str] = {}
    for child in el:
        local = _local(child)
        text = _clean("".join(child.itertext()))
        if not local or not text:
            continue
        if local in ("streetAddressLine", "streetName", "houseNumber", "additionalLocator", "unitID"):
            street.append(text)
        elif local in ("city", "state", "postalCode", "country") and local not in values:
            values[local] = text
    addr = Address(
        street=tuple(street),
        city=values.get("city"),
        state=values.get("state"),
        postal_code=values.get("postalCode"),
        country=values.get("country"),
        use=_attr(el, "use"),
    )
    return None if addr.is_empty else addr


def _parse_tel(el: etree._Element) -> Telecom | None:
    value = _attr(el, "value")
    if not value or el.get("nullFlavor"):
        return None
    return Telecom(value, _attr(el, "use"))


def _parse_en_text(el: etree._Element) -> str | None:
    if el.get("nullFlavor"):
        return None
    return _clean(" ".join(t for t in el.itertext() if t.strip()))


def _parse_birth_time(el: etree._Element) -> BirthTime | None:
    """An IVL_TS criterion; raises _ParameterError for impossible dates."""
    if el.get("nullFlavor"):
        return None

    def date_of(raw: str, what: str) -> str:
        try:
            return parse_date(raw)
        except ValueError as exc:
            raise _ParameterError(f"livingSubjectBirthTime {what}: {exc}", "SYN102") from None

    value = _attr(el, "value")
    if value:
        return BirthTime(value=date_of(value, "value"))
    center = _attr(_find(el, "center"), "value")
    if center:
        return BirthTime(value=date_of(center, "center"))
    low_raw = _attr(_find(el, "low"), "value")
    high_raw = _attr(_find(el, "high"), "value")
    if not low_raw and not high_raw:
        return None
    low = date_of(low_raw, "low") if low_raw else None
    high = date_of(high_raw, "high") if high_raw else None
    bt = BirthTime(low=low, high=high)
    lo, hi = bt.bounds()
    if lo > hi:
        raise _ParameterError(f"livingSubjectBirthTime range {low}..{high} is empty (low after high)", "SYN102")
    return bt


def _values(param: etree._Element) -> list[etree._Element]:
    return [c for c in param if _local(c) == "value"]


# -- parse_request -----------------------------------------------------------------------------------


def parse_request(element: etree._Element) -> PatientDiscoveryQuery:
    """Read a PRPA_IN201305UV02 (the body element, namespaced or not; a SOAP envelope is also accepted).

    Raises :class:`Iti55RequestError` (see its docstring for fault vs AE).
    """
    root = _prepare(element, REQUEST_INTERACTION)
    if root is None:
        tag = element.tag if isinstance(element.tag, str) else repr(element.tag)
        raise Iti55RequestError(f"expected a {{{HL7}}}{REQUEST_INTERACTION} element, got {tag}")

    message_id = _ii(_find(root, "id"))
    if message_id is None:
        raise Iti55RequestError("the message has no id (PRPA_IN201305UV02/id/@root)")
    sender_device = _find(root, "sender", "device")
    sender_device_id = _ii(_find(sender_device, "id"))
    if sender_device_id is None:
        raise Iti55RequestError("the message has no sender/device/id")
    receiver_device = _find(root, "receiver", "device")
    cap = _find(root, "controlActProcess")
    if cap is None:
        raise Iti55RequestError("the message has no controlActProcess")
    qbp = _find(cap, "queryByParameter")
    if qbp is None:
        raise Iti55RequestError("the controlActProcess has no queryByParameter")
    query_id = _ii(_find(qbp, "queryId"))
    if query_id is None:
        raise Iti55RequestError("the queryByParameter has no queryId/@root")
    params = _find(qbp, "parameterList")
    if params is None:
        raise Iti55RequestError("the queryByParameter has no parameterList")

    assigning_authority = None
    for aop in _findall(cap, "authorOrPerformer"):
        if aop.get("typeCode", "AUT") == "AUT":
            dev_id = _ii(_find(aop, "assignedDevice", "id"))
            if dev_id is not None:
                assigning_authority = bare_oid(dev_id.root)
                break

    min_degree: int | None = None
    min_raw = _attr(_find(qbp, "matchCriterionList", "minimumDegreeMatch", "value"), "value")
    if min_raw is not None:
        try:
            min_degree = int(min_raw)
        except ValueError:
            min_degree = None
    algorithm_el = _find(qbp, "matchCriterionList", "matchAlgorithm", "value")

    query = PatientDiscoveryQuery(
        message_id=message_id,
        sender_device_id=sender_device_id,
        query_id=query_id,
        query_by_parameter=qbp,
        creation_time=_attr(_find(root, "creationTime"), "value"),
        sender_home_community_id=hcid_urn(
            _attr(_find(sender_device, "asAgent", "representedOrganization", "id"), "root")
        ),
        receiver_device_id=_ii(_find(receiver_device, "id")),
        receiver_home_community_id=hcid_urn(
            _attr(_find(receiver_device, "asAgent", "representedOrganization", "id"), "root")
        ),
        respond_to=_attr(_find(root, "respondTo", "telecom"), "value"),
        assigning_authority=assigning_authority,
        processing_code=_code(root, "processingCode"),
        processing_mode_code=_code(root, "processingModeCode"),
        accept_ack_code=_code(root, "acceptAckCode"),
        response_priority_code=_code(qbp, "responsePriorityCode"),
        response_modality_code=_code(qbp, "responseModalityCode"),
        match_algorithm=_clean("".join(algorithm_el.itertext())) if algorithm_el is not None else None,
        minimum_degree_match=min_degree,
    )
    try:
        query = _parse_parameters(query, params)
    except _ParameterError as exc:
        raise Iti55RequestError(exc.reason, query=query, detail_code=exc.detail_code) from None
    if not query.names and not query.ids:
        raise Iti55RequestError(
            "the query has neither a livingSubjectName nor a livingSubjectId (ITI TF-2 3.55.4.1.2.1)",
            query=query,
            detail_code="SYN105",
        )
    return query


def _parse_parameters(query: PatientDiscoveryQuery, params: etree._Element) -> PatientDiscoveryQuery:
    names: list[PersonName] = []
    ids: list[II] = []
    addresses: list[Address] = []
    telecoms: list[Telecom] = []
    mmn: list[PersonName] = []
    bp_addresses: list[Address] = []
    bp_names: list[str] = []
    providers: list[II] = []
    gender: str | None = None
    birth_time: BirthTime | None = None
    for param in params:
        local = _local(param)
        values = _values(param)
        if local == "livingSubjectName":
            names.extend(n for n in map(_parse_pn, values) if n is not None)
        elif local == "livingSubjectAdministrativeGender":
            for v in values:
                code = _attr(v, "code")
                if code and gender is None:
                    gender = code.upper()
        elif local == "livingSubjectBirthTime":
            for v in values:
                bt = _parse_birth_time(v)
                if bt is not None and birth_time is None:
                    birth_time = bt
        elif local == "livingSubjectId":
            ids.extend(i for i in map(_ii, values) if i is not None)
        elif local == "patientAddress":
            addresses.extend(a for a in map(_parse_ad, values) if a is not None)
        elif local == "patientTelecom":
            telecoms.extend(t for t in map(_parse_tel, values) if t is not None)
        elif local == "mothersMaidenName":
            mmn.extend(n for n in map(_parse_pn, values) if n is not None)
        elif local == "livingSubjectBirthPlaceAddress":
            bp_addresses.extend(a for a in map(_parse_ad, values) if a is not None)
        elif local == "livingSubjectBirthPlaceName":
            bp_names.extend(n for n in map(_parse_en_text, values) if n)
        elif local == "principalCareProviderId":
            providers.extend(i for i in map(_ii, values) if i is not None)
    return replace(
        query,
        names=tuple(names),
        gender=gender,
        birth_time=birth_time,
        ids=tuple(ids),
        addresses=tuple(addresses),
        telecoms=tuple(telecoms),
        mothers_maiden_names=tuple(mmn),
        birth_place_addresses=tuple(bp_addresses),
        birth_place_names=tuple(bp_names),
        principal_care_provider_ids=tuple(providers),
    )


# -- XML writers -------------------------------------------------------------------------------------


def _sub(parent: etree._Element, local: str, text: str | None = None, **attrib: str | None) -> etree._Element:
    el = etree.SubElement(parent, _q(local), {k: v for k, v in attrib.items() if v is not None})
    if text is not None:
        el.text = text
    return el


def _write_ii(parent: etree._Element, local: str, ii: II) -> etree._Element:
    attrib = {"root": ii.root}
    if ii.extension is not None:
        attrib["extension"] = ii.extension
    return _sub(parent, local, **attrib)


def _write_pn(parent: etree._Element, local: str, name: PersonName | None) -> etree._Element:
    attrib: dict[str, str] = {}
    if name is None or name.is_empty:
        return _sub(parent, local, nullFlavor="NA")
    if name.use:
        attrib["use"] = name.use
    el = _sub(parent, local, **attrib)
    if not (name.family or name.given or name.prefix or name.suffix):
        el.text = name.text
        return el
    ordered = (("prefix", name.prefix), ("given", name.given), ("family", name.family), ("suffix", name.suffix))
    for tag, parts in ordered:
        for part in parts:
            _sub(el, tag, part)
    return el


def _write_ad(parent: etree._Element, local: str, addr: Address) -> etree._Element:
    el = _sub(parent, local, **({"use": addr.use} if addr.use else {}))
    for line in addr.street:
        _sub(el, "streetAddressLine", line)
    for tag, value in (
        ("city", addr.city),
        ("state", addr.state),
        ("postalCode", addr.postal_code),
        ("country", addr.country),
    ):
        if value:
            _sub(el, tag, value)
    return el


def _write_tel(parent: etree._Element, local: str, tel: Telecom) -> etree._Element:
    return _sub(parent, local, value=tel.value, use=tel.use)


def _hl7_gender(code: str | None) -> str | None:
    """DICOM/HL7 sex → HL7 AdministrativeGender (M, F, UN)."""
    if not code:
        return None
    c = code.strip().upper()
    return c if c in ("M", "F") else "UN"


def _new_root(interaction: str) -> etree._Element:
    return etree.Element(_q(interaction), nsmap={None: HL7, "xsi": ns.XSI}, ITSVersion="XML_1.0")


def _write_device(
    parent: etree._Element, role: str, type_code: str, device_id: II, hcid: str | None
) -> etree._Element:
    wrapper = _sub(parent, role, typeCode=type_code)
    device = _sub(wrapper, "device", classCode="DEV", determinerCode="INSTANCE")
    _write_ii(device, "id", device_id)
    if hcid:
        agent = _sub(device, "asAgent", classCode="AGNT")
        org = _sub(agent, "representedOrganization", classCode="ORG", determinerCode="INSTANCE")
        _sub(org, "id", root=bare_oid(hcid))
    return wrapper


def _write_header(
    root: etree._Element,
    *,
    message_id: II,
    now: datetime | None,
    interaction: str,
    processing_code: str,
    accept_ack_code: str,
) -> None:
    _write_ii(root, "id", message_id)
    _sub(root, "creationTime", value=_timestamp(now))
    _sub(root, "interactionId", root=INTERACTION_SYSTEM, extension=interaction)
    _sub(root, "processingCode", code=processing_code)
    _sub(root, "processingModeCode", code="T")
    _sub(root, "acceptAckCode", code=accept_ack_code)


# -- build_response ----------------------------------------------------------------------------------


def build_response(
    query: PatientDiscoveryQuery,
    outcome: Outcome,
    *,
    responder_device_id: str,
    home_community_id: str,
    assigning_authority: str,
    now: datetime | None = None,
) -> etree._Element:
    """The PRPA_IN201306UV02 answering ``query`` with ``outcome`` (ITI TF-2 3.55.4.2).

    ``responder_device_id`` is our device OID (sender/device/id and the root of the response id),
    ``home_community_id`` our HCID (``urn:oid:`` or bare; written bare into sender/asAgent and each
    custodian), ``assigning_authority`` the OID of the local patient-ID domain (each Patient.id root).
    """
    device_oid = bare_oid(responder_device_id)
    hcid = bare_oid(home_community_id)
    aa = bare_oid(assigning_authority)
    error = isinstance(outcome, CannotAnswer)

    root = _new_root(RESPONSE_INTERACTION)
    _write_header(
        root,
        message_id=II(device_oid, str(uuid.uuid4())),
        now=now,
        interaction=RESPONSE_INTERACTION,
        processing_code=query.processing_code or "P",
        accept_ack_code="NE",
    )
    _write_device(root, "receiver", "RCV", query.sender_device_id, query.sender_home_community_id)
    _write_device(root, "sender", "SND", II(device_oid), hcid)

    ack = _sub(root, "acknowledgement")
    _sub(ack, "typeCode", code="AE" if error else "AA")
    _write_ii(_sub(ack, "targetMessage"), "id", query.message_id)
    if isinstance(outcome, CannotAnswer):
        detail = _sub(ack, "acknowledgementDetail", typeCode="E")
        _sub(detail, "code", code=outcome.detail_code, codeSystem=ACK_DETAIL_SYSTEM)
        if outcome.text:
            _sub(detail, "text", outcome.text)

    cap = _sub(root, "controlActProcess", classCode="CACT", moodCode="EVN")
    _sub(cap, "code", code=RESPONSE_TRIGGER, codeSystem=INTERACTION_SYSTEM)

    if isinstance(outcome, Matches):
        for patient in outcome.patients:
            _write_registration_event(cap, patient, aa=aa, hcid=hcid)
    elif isinstance(outcome, MoreAttributesRequested):
        issue = _detected_issue(cap)
        for code in dict.fromkeys(outcome.codes):
            trigger = _sub(issue, "triggerFor", typeCode="TRIG")
            order = _sub(trigger, "actOrderRequired", classCode="ACT", moodCode="RQO")
            _sub(order, "code", code=code, codeSystem=MORE_ATTRIBUTES_SYSTEM)
    elif isinstance(outcome, CannotAnswer) and outcome.code is not None:
        issue = _detected_issue(cap)
        mitigated = _sub(issue, "mitigatedBy", typeCode="MITGT")
        management = _sub(mitigated, "detectedIssueManagement", classCode="ACT", moodCode="EVN")
        _sub(management, "code", code=outcome.code, codeSystem=ISSUE_MANAGEMENT_SYSTEM)

    query_ack = _sub(cap, "queryAck")
    _write_ii(query_ack, "queryId", query.query_id)
    _sub(query_ack, "statusCode", code="aborted" if error else "deliveredResponse")
    response_code = "AE" if error else "NF" if isinstance(outcome, NoMatch) else "OK"
    _sub(query_ack, "queryResponseCode", code=response_code)
    cap.append(deepcopy(query.query_by_parameter))
    return root


def _detected_issue(cap: etree._Element) -> etree._Element:
    reason = _sub(cap, "reasonOf", typeCode="RSON")
    issue = _sub(reason, "detectedIssueEvent", classCode="ALRT", moodCode="EVN")
    _sub(issue, "code", code=DETECTED_ISSUE_CODE, codeSystem=DETECTED_ISSUE_SYSTEM)
    return issue


def _write_registration_event(cap: etree._Element, patient: MatchedPatient, *, aa: str, hcid: str) -> None:
    demo = patient.demographics
    subject = _sub(cap, "subject", typeCode="SUBJ")
    event = _sub(subject, "registrationEvent", classCode="REG", moodCode="EVN")
    _sub(event, "id", nullFlavor="NA")
    _sub(event, "statusCode", code="active")
    subject1 = _sub(event, "subject1", typeCode="SBJ")
    pat = _sub(subject1, "patient", classCode="PAT")
    _write_ii(pat, "id", II(aa, patient.patient_id))
    _sub(pat, "statusCode", code="active")
    person = _sub(pat, "patientPerson", classCode="PSN", determinerCode="INSTANCE")
    names: list[PersonName | None] = [n for n in demo.names if not n.is_empty] or [None]
    for name in names:
        _write_pn(person, "name", name)
    for tel in demo.telecoms:
        _write_tel(person, "telecom", tel)
    gender = _hl7_gender(demo.gender)
    if gender:
        _sub(person, "administrativeGenderCode", code=gender, codeSystem=ADMINISTRATIVE_GENDER_SYSTEM)
    if demo.birth_time:
        _sub(person, "birthTime", value=demo.birth_time)
    for addr in demo.addresses:
        _write_ad(person, "addr", addr)
    for other in demo.ids:
        other_ids = _sub(person, "asOtherIDs", classCode="PAT")
        _write_ii(other_ids, "id", other)
        org = _sub(other_ids, "scopingOrganization", classCode="ORG", determinerCode="INSTANCE")
        _sub(org, "id", root=other.root)
    if demo.birth_place_name or demo.birth_place_address:
        birth_place = _sub(person, "birthPlace", classCode="BIRTHPL")
        place = _sub(birth_place, "birthplace", classCode="PLC", determinerCode="INSTANCE")
        if demo.birth_place_name:
            _sub(place, "name", demo.birth_place_name)
        if demo.birth_place_address:
            _write_ad(place, "addr", demo.birth_place_address)
    subject_of = _sub(pat, "subjectOf1")
    observation = _sub(subject_of, "queryMatchObservation", classCode="COND", moodCode="EVN")
    _sub(observation, "code", code=QUERY_MATCH_CODE)
    value = _sub(observation, "value", value=str(max(0, min(100, int(patient.score)))))
    value.set(ns.q(ns.XSI, "type"), "INT")
    custodian = _sub(event, "custodian", typeCode="CST")
    entity = _sub(custodian, "assignedEntity", classCode="ASSIGNED")
    _sub(entity, "id", root=hcid)
    _sub(entity, "code", code="NotHealthDataLocator", codeSystem=HEALTH_DATA_LOCATOR_SYSTEM)


# -- build_request (initiating side) -----------------------------------------------------------------


def build_request(
    demographics: PatientDemographics,
    *,
    sender_device_id: str,
    home_community_id: str,
    receiver_device_id: str,
    assigning_authority: str | None = None,
    local_patient_id: str | None = None,
    now: datetime | None = None,
    receiver_home_community_id: str | None = None,
    processing_code: str = "P",
) -> tuple[etree._Element, II]:
    """A PRPA_IN201305UV02 for ``demographics`` and its message id (matched by the response's
    acknowledgement/targetMessage/id).

    With ``assigning_authority`` and ``local_patient_id`` our own id is sent as a livingSubjectId and the
    authority as authorOrPerformer/assignedDevice/id so the responder can query us back (3.55.4.1.2.4).
    Raises ValueError when there is neither a name nor an id, or the birth time is not a date.
    """
    ids = list(demographics.ids)
    if assigning_authority and local_patient_id:
        ids.insert(0, II(bare_oid(assigning_authority), local_patient_id))
    names = [n for n in demographics.names if not n.is_empty]
    if not names and not ids:
        raise ValueError("an XCPD query needs a name or a patient id")
    birth_time = parse_date(demographics.birth_time) if demographics.birth_time else None
    device_oid = bare_oid(sender_device_id)
    message_id = II(device_oid, str(uuid.uuid4()))

    root = _new_root(REQUEST_INTERACTION)
    _write_header(
        root,
        message_id=message_id,
        now=now,
        interaction=REQUEST_INTERACTION,
        processing_code=processing_code,
        accept_ack_code="AL",
    )
    _write_device(root, "receiver", "RCV", II(bare_oid(receiver_device_id)), receiver_home_community_id)
    _write_device(root, "sender", "SND", II(device_oid), home_community_id)
    cap = _sub(root, "controlActProcess", classCode="CACT", moodCode="EVN")
    _sub(cap, "code", code=REQUEST_TRIGGER, codeSystem=INTERACTION_SYSTEM)
    if assigning_authority:
        aop = _sub(cap, "authorOrPerformer", typeCode="AUT")
        device = _sub(aop, "assignedDevice", classCode="ASSIGNED")
        _sub(device, "id", root=bare_oid(assigning_authority))
    qbp = _sub(cap, "queryByParameter")
    _write_ii(qbp, "queryId", II(device_oid, str(uuid.uuid4())))
    _sub(qbp, "statusCode", code="new")
    _sub(qbp, "responseModalityCode", code="R")
    _sub(qbp, "responsePriorityCode", code="I")
    params = _sub(qbp, "parameterList")

    def parameter(local: str) -> etree._Element:
        return _sub(params, local)

    def semantics(el: etree._Element, text: str) -> None:
        _sub(el, "semanticsText", text)

    # ParameterList children in schema order (PRPA_MT201306UV02.ParameterList)
    gender = _hl7_gender(demographics.gender)
    if gender:
        p = parameter("livingSubjectAdministrativeGender")
        _sub(p, "value", code=gender, codeSystem=ADMINISTRATIVE_GENDER_SYSTEM)
        semantics(p, "LivingSubject.administrativeGender")
    if demographics.birth_place_address:
        p = parameter("livingSubjectBirthPlaceAddress")
        _write_ad(p, "value", demographics.birth_place_address)
        semantics(p, "LivingSubject.BirthPlace.Addr")
    if demographics.birth_place_name:
        p = parameter("livingSubjectBirthPlaceName")
        _sub(p, "value", demographics.birth_place_name)
        semantics(p, "LivingSubject.BirthPlace.Place.Name")
    if birth_time:
        p = parameter("livingSubjectBirthTime")
        _sub(p, "value", value=birth_time)
        semantics(p, "LivingSubject.birthTime")
    for ident in ids:
        p = parameter("livingSubjectId")
        _write_ii(p, "value", ident)
        semantics(p, "LivingSubject.id")
    for name in names:
        p = parameter("livingSubjectName")
        _write_pn(p, "value", name)
        semantics(p, "LivingSubject.name")
    if demographics.mothers_maiden_name and not demographics.mothers_maiden_name.is_empty:
        p = parameter("mothersMaidenName")
        _write_pn(p, "value", demographics.mothers_maiden_name)
        semantics(p, "Person.MothersMaidenName")
    if demographics.addresses:
        p = parameter("patientAddress")
        for addr in demographics.addresses:
            _write_ad(p, "value", addr)
        semantics(p, "Patient.addr")
    if demographics.telecoms:
        p = parameter("patientTelecom")
        for tel in demographics.telecoms:
            _write_tel(p, "value", tel)
        semantics(p, "Patient.telecom")
    return root, message_id


# -- parse_response (initiating side) ----------------------------------------------------------------


def parse_response(element: etree._Element) -> PatientDiscoveryResult:
    """Read a partner's PRPA_IN201306UV02 (body element or whole SOAP envelope), tolerating the quirks
    listed in the module docstring. Raises :class:`Iti55ResponseError` for any other element."""
    root = _prepare(element, RESPONSE_INTERACTION)
    if root is None:
        tag = element.tag if isinstance(element.tag, str) else repr(element.tag)
        raise Iti55ResponseError(f"expected a {{{HL7}}}{RESPONSE_INTERACTION} element, got {tag}")
    ack = _find(root, "acknowledgement")
    cap = _find(root, "controlActProcess")
    query_ack = _find(cap, "queryAck")
    if ack is None and query_ack is None:
        raise Iti55ResponseError("the response has neither an acknowledgement nor a queryAck")
    sender_device = _find(root, "sender", "device")

    details = tuple(
        AckDetail(
            code=_code(d, "code"),
            text=_clean("".join(t.itertext())) if (t := _find(d, "text")) is not None else None,
            type_code=_attr(d, "typeCode"),
        )
        for d in _findall(ack, "acknowledgementDetail")
    )
    more: list[str] = []
    issues: list[str] = []
    for event in _findall(cap, "reasonOf", "detectedIssueEvent"):
        more.extend(c for c in (_code(o, "code") for o in _findall(event, "triggerFor", "actOrderRequired")) if c)
        issues.extend(
            c for c in (_code(m, "code") for m in _findall(event, "mitigatedBy", "detectedIssueManagement")) if c
        )
    patients = tuple(
        p for p in (_parse_registration_event(e) for e in _findall(cap, "subject", "registrationEvent")) if p
    )
    return PatientDiscoveryResult(
        ack_code=_code(ack, "typeCode"),
        query_response_code=_code(query_ack, "queryResponseCode"),
        patients=patients,
        more_attributes_requested=tuple(dict.fromkeys(more)),
        issue_codes=tuple(dict.fromkeys(issues)),
        ack_details=details,
        message_id=_ii(_find(root, "id")),
        target_message_id=_ii(_find(ack, "targetMessage", "id")),
        query_id=_ii(_find(query_ack, "queryId")),
        creation_time=_attr(_find(root, "creationTime"), "value"),
        sender_device_id=_ii(_find(sender_device, "id")),
        sender_home_community_id=hcid_urn(
            _attr(_find(sender_device, "asAgent", "representedOrganization", "id"), "root")
        ),
    )


def _parse_registration_event(event: etree._Element) -> DiscoveredPatient | None:
    patient = _find(event, "subject1", "patient")
    if patient is None:
        return None
    patient_ids = [i for i in map(_ii, _findall(patient, "id")) if i is not None]
    if not patient_ids:
        return None
    person = _find(patient, "patientPerson")
    other_ids = patient_ids[1:] + [
        i for i in (_ii(_find(o, "id")) for o in _findall(person, "asOtherIDs")) if i is not None
    ]
    names = tuple(n for n in map(_parse_pn, _findall(person, "name")) if n is not None)
    telecoms = tuple(
        t for t in map(_parse_tel, _findall(patient, "telecom") + _findall(person, "telecom")) if t is not None
    )
    addresses = tuple(
        a for a in map(_parse_ad, _findall(patient, "addr") + _findall(person, "addr")) if a is not None
    )
    birth_place = _find(person, "birthPlace", "birthplace")
    bp_name_el = _find(birth_place, "name")
    bp_addr_el = _find(birth_place, "addr")
    if bp_addr_el is None:
        bp_addr_el = _find(person, "birthPlace", "addr")
    demographics = PatientDemographics(
        names=names,
        gender=_code(person, "administrativeGenderCode"),
        birth_time=_attr(_find(person, "birthTime"), "value"),
        addresses=addresses,
        telecoms=telecoms,
        ids=tuple(dict.fromkeys(other_ids)),
        birth_place_name=_parse_en_text(bp_name_el) if bp_name_el is not None else None,
        birth_place_address=_parse_ad(bp_addr_el) if bp_addr_el is not None else None,
    )
    score: int | None = None
    score_raw = _attr(_find(patient, "subjectOf1", "queryMatchObservation", "value"), "value")
    if score_raw is not None:
        try:
            score = int(float(score_raw))
        except ValueError:
            score = None
    entity = _find(event, "custodian", "assignedEntity")
    locator_code = _code(entity, "code")
    locator = {"SupportsHealthDataLocator": True, "NotHealthDataLocator": False}.get(locator_code or "")
    return DiscoveredPatient(
        patient_id=patient_ids[0],
        demographics=demographics,
        home_community_id=hcid_urn(_attr(_find(entity, "id"), "root")),
        health_data_locator=locator,
        score=score,
    )

