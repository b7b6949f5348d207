"""The XML codec of DICOM PS3.15 A.5 audit messages: :class:`AuditMessage` ⇄ UTF-8 XML bytes (pure).

:func:`serialize` writes exactly the elements and attributes of the DICOM audit message schema
(PS3.15 A.5.1, shipped in ``schemas/dicom-audit/``) in the order it requires, plus the IHE extension
``EventIdentification/PurposeOfUse`` (ITI TF-2 3.20.7.1.2). ``ParticipantObjectQuery`` and every
``ParticipantObjectDetail`` value are base64 (A.5.1: "all values ... are encoded as xsd:base64Binary");
``EventDateTime`` is an ``xsd:dateTime`` that always carries its UTC offset (A.5.2.5). Characters XML
cannot carry (NUL and other C0 controls) are replaced by U+FFFD; everything else round-trips:
``parse(serialize(m)) == m``.

:func:`parse` reads untrusted bytes through the hardened parser of :mod:`gateway.soap.xml` (no DTD, no
entities, no network, bounded size and depth) and raises :class:`AuditParseError` naming the problem.
:func:`validate` checks bytes against the shipped RELAX NG schema (loaded once) and raises
:class:`AuditSchemaError` carrying the validator's lines.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, cast

from lxml import etree

from gateway import resources
from gateway.audit.model import (
    Action,
    AuditMessage,
    AuditSource,
    Code,
    Outcome,
    Participant,
    ParticipantObject,
)
from gateway.errors import SoapFault
from gateway.soap import xml as hardened

#: The schema folder below ``schemas/`` and its two grammars (see its README.md).
SCHEMA_DIR = "dicom-audit"
SCHEMA_FILES: dict[str, str] = {
    "ihe": "ihe-audit-message.rng",  # DICOM PS3.15 A.5.1 + IHE EventIdentification/PurposeOfUse
    "dicom": "dicom-audit-message.rng",  # DICOM PS3.15 A.5.1 exactly as published
}
Profile = Literal["ihe", "dicom"]

_ACTIONS: frozenset[str] = frozenset({"C", "R", "U", "D", "E"})
_OUTCOMES: frozenset[int] = frozenset({0, 4, 8, 12})
_ACCESS_POINT_TYPES: frozenset[str] = frozenset({"1", "2", "3", "4", "5"})
_OBJECT_TYPES: frozenset[str] = frozenset({"1", "2", "3", "4"})
_XML_ILLEGAL = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class AuditParseError(ValueError):
    """Bytes that are not a readable DICOM audit message (not XML, forbidden XML, a missing part)."""


class AuditSchemaError(ValueError):
    """A message that does not match the DICOM audit message schema; ``problems`` are the validator's lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("audit message does not match the DICOM audit message schema (PS3.15 A.5.1): "
                         + "; ".join(self.problems))


# ------------------------------------------------------------------------------------------ serialize

def _text(value: str) -> str:
    return _XML_ILLEGAL.sub("\ufffd", value)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _datetime(when: dt.datetime) -> str:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"EventDateTime {when.isoformat()} has no time zone; DICOM PS3.15 A.5.2.5 needs one")
    return when.isoformat()


def _code(parent: etree._Element, tag: str, code: Code) -> None:
    el = etree.SubElement(parent, tag)
    el.set("csd-code", _text(code.code))
    el.set("codeSystemName", _text(code.system))
    el.set("originalText", _text(code.meaning))


def _participant(root: etree._Element, p: Participant) -> None:
    el = etree.SubElement(root, "ActiveParticipant")
    el.set("UserID", _text(p.user_id))
    if p.alternative_user_id is not None:
        el.set("AlternativeUserID", _text(p.alternative_user_id))
    if p.user_name is not None:
        el.set("UserName", _text(p.user_name))
    el.set("UserIsRequestor", "true" if p.is_requestor else "false")
    if p.network_access_point is not None:
        el.set("NetworkAccessPointID", _text(p.network_access_point))
    if p.network_access_point_type is not None:
        el.set("NetworkAccessPointTypeCode", p.network_access_point_type)
    for role in p.roles:
        _code(el, "RoleIDCode", role)


def _object(root: etree._Element, o: ParticipantObject) -> None:
    if o.name is not None and o.query is not None:
        raise ValueError(f"participant object {o.object_id!r} has both a name and a query; the DICOM schema "
                         "allows one of ParticipantObjectName and ParticipantObjectQuery")
    el = etree.SubElement(root, "ParticipantObjectIdentification")
    el.set("ParticipantObjectID", _text(o.object_id))
    if o.type_code is not None:
        el.set("ParticipantObjectTypeCode", o.type_code)
    if o.role is not None:
        el.set("ParticipantObjectTypeCodeRole", o.role)
    if o.lifecycle is not None:
        el.set("ParticipantObjectDataLifeCycle", o.lifecycle)
    _code(el, "ParticipantObjectIDTypeCode", o.id_type)
    if o.name is not None:
        etree.SubElement(el, "ParticipantObjectName").text = _text(o.name)
    if o.query is not None:
        etree.SubElement(el, "ParticipantObjectQuery").text = _b64(o.query)
    for kind, value in o.details:
        detail = etree.SubElement(el, "ParticipantObjectDetail")
        detail.set("type", _text(kind))
        detail.set("value", _b64(value))
    if o.sop_classes or o.accession_numbers:
        description = etree.SubElement(el, "ParticipantObjectDescription")
        for number in o.accession_numbers:  # schema order: MPPS*, Accession*, SOPClass*, ...
            etree.SubElement(description, "Accession").set("Number", _text(number))
        for uid, count in o.sop_classes:
            sop = etree.SubElement(description, "SOPClass")
            if uid:
                sop.set("UID", _text(uid))
            sop.set("NumberOfInstances", str(count))


def to_element(message: AuditMessage) -> etree._Element:
    """The ``AuditMessage`` element of ``message`` (see :func:`serialize`)."""
    root = etree.Element("AuditMessage")
    event = etree.SubElement(root, "EventIdentification")
    event.set("EventActionCode", message.action)
    event.set("EventDateTime", _datetime(message.when))
    event.set("EventOutcomeIndicator", str(message.outcome))
    _code(event, "EventID", message.event_id)
    for event_type in message.event_types:
        _code(event, "EventTypeCode", event_type)
    if message.outcome_description is not None:
        etree.SubElement(event, "EventOutcomeDescription").text = _text(message.outcome_description)
    for purpose in message.purposes_of_use:
        _code(event, "PurposeOfUse", purpose)
    for participant in message.participants:
        _participant(root, participant)
    source = etree.SubElement(root, "AuditSourceIdentification")
    if message.source.enterprise_site_id is not None:
        source.set("AuditEnterpriseSiteID", _text(message.source.enterprise_site_id))
    source.set("AuditSourceID", _text(message.source.source_id))
    for type_code in message.source.type_codes:
        etree.SubElement(source, "AuditSourceTypeCode").set("csd-code", _text(type_code))
    for obj in message.objects:
        _object(root, obj)
    return root


def serialize(message: AuditMessage) -> bytes:
    """UTF-8 XML of ``message`` without an XML declaration (the syslog MSG of ITI TF-2 3.20.4.1.2).

    Raises ``ValueError`` for a message the schema cannot express: a naive ``when``, or an object with
    both a name and a query."""
    return hardened.tostring(to_element(message))


# ------------------------------------------------------------------------------------------ parse

def _fail(message: str) -> AuditParseError:
    return AuditParseError(message)


def _children(el: etree._Element, tag: str) -> list[etree._Element]:
    return [child for child in el if child.tag == tag]


def _one(el: etree._Element, tag: str) -> etree._Element:
    found = _children(el, tag)
    if len(found) != 1:
        raise _fail(f"{el.tag} needs exactly one {tag}, found {len(found)}")
    return found[0]


def _optional(el: etree._Element, tag: str) -> etree._Element | None:
    found = _children(el, tag)
    if len(found) > 1:
        raise _fail(f"{el.tag} has {len(found)} {tag} elements, at most one is allowed")
    return found[0] if found else None


def _attr(el: etree._Element, name: str) -> str:
    value = el.get(name)
    if value is None:
        raise _fail(f"{el.tag} has no {name} attribute")
    return str(value)


def _read_code(el: etree._Element) -> Code:
    # csd-code since DICOM 2016; "code" is the RFC 3881 attribute some older senders still write
    code = el.get("csd-code", el.get("code"))
    if code is None:
        raise _fail(f"{el.tag} has no csd-code attribute")
    meaning = el.get("originalText", el.get("displayName", ""))
    return Code(code, el.get("codeSystemName", ""), meaning)


def _read_b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _fail(f"{what} is not base64") from None


def _read_datetime(value: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise _fail(f"EventDateTime {value!r} is not an xsd:dateTime") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)  # no offset: taken as UTC


def _member(value: str | None, allowed: Iterable[str], what: str) -> str | None:
    if value is not None and value not in allowed:
        raise _fail(f"{what} {value!r} is not one of the schema's values")
    return value


def _read_participant(el: etree._Element) -> Participant:
    requestor = _attr(el, "UserIsRequestor").strip()
    if requestor not in ("true", "false", "1", "0"):
        raise _fail(f"UserIsRequestor {requestor!r} is not an xsd:boolean")
    access_type = _member(el.get("NetworkAccessPointTypeCode"), _ACCESS_POINT_TYPES, "NetworkAccessPointTypeCode")
    return Participant(
        user_id=_attr(el, "UserID"),
        is_requestor=requestor in ("true", "1"),
        roles=tuple(_read_code(role) for role in _children(el, "RoleIDCode")),
        alternative_user_id=el.get("AlternativeUserID"),
        user_name=el.get("UserName"),
        network_access_point=el.get("NetworkAccessPointID"),
        network_access_point_type=cast(Literal["1", "2", "3", "4", "5"] | None, access_type),
    )


def _read_object(el: etree._Element) -> ParticipantObject:
    name_el = _optional(el, "ParticipantObjectName")
    query_el = _optional(el, "ParticipantObjectQuery")
    details = tuple((_attr(d, "type"), _read_b64(_attr(d, "value"), "ParticipantObjectDetail value"))
                    for d in _children(el, "ParticipantObjectDetail"))
    sop_classes: list[tuple[str, int]] = []
    accessions: list[str] = []
    for description in _children(el, "ParticipantObjectDescription"):
        accessions.extend(_attr(a, "Number") for a in _children(description, "Accession"))
        for sop in _children(description, "SOPClass"):
            count = _attr(sop, "NumberOfInstances")
            try:
                sop_classes.append((sop.get("UID", ""), int(count)))
            except ValueError:
                raise _fail(f"NumberOfInstances {count!r} is not an integer") from None
    type_code = _member(el.get("ParticipantObjectTypeCode"), _OBJECT_TYPES, "ParticipantObjectTypeCode")
    return ParticipantObject(
        object_id=_attr(el, "ParticipantObjectID"),
        id_type=_read_code(_one(el, "ParticipantObjectIDTypeCode")),
        type_code=cast(Literal["1", "2", "3", "4"] | None, type_code),
        role=el.get("ParticipantObjectTypeCodeRole"),
        lifecycle=el.get("ParticipantObjectDataLifeCycle"),
        name=(name_el.text or "") if name_el is not None else None,
        query=_read_b64(query_el.text or "", "ParticipantObjectQuery") if query_el is not None else None,
        details=details,
        sop_classes=tuple(sop_classes),
        accession_numbers=tuple(accessions),
    )


def from_element(root: etree._Element) -> AuditMessage:
    """The :class:`AuditMessage` of an already parsed ``AuditMessage`` element (see :func:`parse`)."""
    if root.tag != "AuditMessage":
        raise _fail(f"the root element is {root.tag!r}, not AuditMessage")
    event = _one(root, "EventIdentification")
    action = _attr(event, "EventActionCode")
    if action not in _ACTIONS:
        raise _fail(f"EventActionCode {action!r} is not one of C, R, U, D, E")
    outcome_text = _attr(event, "EventOutcomeIndicator").strip()
    if not outcome_text.isdigit() or int(outcome_text) not in _OUTCOMES:
        raise _fail(f"EventOutcomeIndicator {outcome_text!r} is not one of 0, 4, 8, 12")
    description = _optional(event, "EventOutcomeDescription")
    source_el = _one(root, "AuditSourceIdentification")
    source = AuditSource(
        source_id=_attr(source_el, "AuditSourceID"),
        enterprise_site_id=source_el.get("AuditEnterpriseSiteID"),
        type_codes=tuple(_read_code(t).code for t in _children(source_el, "AuditSourceTypeCode")),
    )
    participants = tuple(_read_participant(p) for p in _children(root, "ActiveParticipant"))
    if not participants:
        raise _fail("AuditMessage has no ActiveParticipant")
    return AuditMessage(
        event_id=_read_code(_one(event, "EventID")),
        action=cast(Action, action),
        outcome=cast(Outcome, int(outcome_text)),
        when=_read_datetime(_attr(event, "EventDateTime")),
        source=source,
        participants=participants,
        objects=tuple(_read_object(o) for o in _children(root, "ParticipantObjectIdentification")),
        event_types=tuple(_read_code(c) for c in _children(event, "EventTypeCode")),
        purposes_of_use=tuple(_read_code(c) for c in _children(event, "PurposeOfUse")),
        outcome_description=(description.text or "") if description is not None else None,
    )


def _parse_xml(data: bytes) -> etree._Element:
    try:
        return hardened.parse(data)
    except SoapFault as exc:  # the hardened parser speaks SOAP faults; here it is just bad input
        raise AuditParseError(exc.reason) from None


def parse(data: bytes) -> AuditMessage:
    """Read untrusted audit message bytes (hardened: no DTD/entities, no network, size and depth limits).

    Raises :class:`AuditParseError` naming the problem. Lenient where the schema's history differs
    (RFC 3881 ``code`` attribute, no UTC offset = UTC); strict checking is :func:`validate`'s job."""
    return from_element(_parse_xml(data))


# ------------------------------------------------------------------------------------------ validate

_schemas: dict[str, etree.RelaxNG] = {}
_lock = threading.Lock()  # RelaxNG objects keep their error log: one validation at a time


def schema_path(profile: Profile = "ihe") -> Path:
    """The shipped RELAX NG grammar of ``profile`` (``schemas/dicom-audit/...``)."""
    return resources.schemas_dir() / SCHEMA_DIR / SCHEMA_FILES[profile]


def _schema(profile: Profile) -> etree.RelaxNG:
    schema = _schemas.get(profile)
    if schema is None:
        parser = etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False)
        schema = etree.RelaxNG(etree.parse(str(schema_path(profile)), parser=parser))
        _schemas[profile] = schema
    return schema


def validate(data: bytes, *, profile: Profile = "ihe") -> None:
    """Check ``data`` against the DICOM audit message schema (PS3.15 A.5.1).

    ``profile="ihe"`` (default) is the DICOM schema plus the IHE ``PurposeOfUse`` extension (ITI TF-2
    3.20.7.1.2), what every XIG message must satisfy; ``"dicom"`` is the DICOM schema as published.
    Raises :class:`AuditSchemaError` with the validator's lines (bad XML too: one line saying why)."""
    try:
        root = _parse_xml(data)
    except AuditParseError as exc:
        raise AuditSchemaError([str(exc)]) from None
    with _lock:
        schema = _schema(profile)
        if schema.validate(root):
            return
        problems = [f"line {e.line}: {e.message}" for e in schema.error_log]
    raise AuditSchemaError(problems or ["the document does not match the schema"])
