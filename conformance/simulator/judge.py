"""Judge one raw request an initiating gateway sent to the simulated community.

The judgement is independent of what the responding gateway then does with the request (XIG's own
pipeline is tolerant of real-world quirks; the judge is strict): every rule of
:mod:`conformance.simulator.rules` that can be evaluated becomes a :class:`~conformance.model.Check`.
A stage that cannot be passed (an undecodable MTOM package, a body that is not XML, not a SOAP 1.2
envelope) ends the judgement: later rules are not evaluated rather than reported as failures.

Stages: HTTP media type and MTOM packaging → SOAP 1.2 envelope and WS-Addressing → WS-Security / XUA
(signature and trust via :func:`gateway.security.wssecurity.verify_security_header`, each Carequality
attribute via :func:`gateway.security.saml.extract_identity`) → XSD of the body → transaction rules
(ITI-55 wrappers, ITI-38 homeCommunityId and patient-id rules, ITI-39 document references, RAD-75
grouping against what the simulated community holds and the manifests it delivered).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from lxml import etree

from conformance.model import Check
from conformance.simulator.community import Truth
from conformance.simulator.rules import rule
from gateway.config import Config
from gateway.errors import SoapFault
from gateway.ihe import ebrim, iti38, iti39, iti55, rad75
from gateway.ihe.ebrim import same_hcid
from gateway.ihe.registry import RegistryErrorCode
from gateway.security.saml import (
    ATTRIBUTE_NAMES,
    NHIN_PURPOSE_OID,
    SNOMED_CT_OID,
    AssertionClaims,
    extract_identity,
)
from gateway.security.wssecurity import verify_security_header
from gateway.soap import mtom, ns, xml
from gateway.soap.envelope import UNDERSTOOD_HEADER_NAMESPACES, check_must_understand, is_true
from gateway.soap.schema import SchemaSet, default_schemas
from gateway.store.ledger import EntryRecord
from gateway.web.app import verification_policy
from gateway.web.endpoints import Endpoint

log = logging.getLogger("xig.conformance.simulator")

_UID: Final = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
SOAP12_MEDIA: Final = "application/soap+xml"
EXPECTED_BODY: Final = {"ITI-55": ns.q(ns.HL7, "PRPA_IN201305UV02"), "ITI-38": ns.q(ns.QUERY, "AdhocQueryRequest"),
                        "ITI-39": ns.q(ns.XDSB, "RetrieveDocumentSetRequest"),
                        "RAD-75": ns.q(ns.XDSI, "RetrieveImagingDocumentSetRequest")}
_PATIENT_ID_PARAMS: Final = ("$XDSDocumentEntryPatientId", "$XDSSubmissionSetPatientId", "$XDSFolderPatientId",
                             "$patientId")
#: attribute rule → logical attribute name of :mod:`gateway.security.saml`
_ATTRIBUTES: Final = (("security.attr.subject-id", "subject_id"), ("security.attr.organization", "organization"),
                      ("security.attr.organization-id", "organization_id"),
                      ("security.attr.home-community-id", "home_community_id"), ("security.attr.role", "role"),
                      ("security.attr.purpose-of-use", "purpose_of_use"))
MAX_LISTED: Final = 5


class LedgerView(Protocol):
    """What the judge reads from the simulated community's ledger."""

    def find_entry(self, unique_id: str | None = None, entry_uuid: str | None = None) -> EntryRecord | None: ...

    def authorized(self, sop_instance_uids: Iterable[str], home_community_id: str,
                   window: dt.timedelta) -> set[str]: ...


@dataclass
class Judgement:
    checks: list[Check]
    #: who sent it: "organization (homeCommunityId)" from the assertion, or "unidentified initiator"
    requester: str = "unidentified initiator"
    #: the judgement itself broke off (a bug of the judge, not a finding about the request)
    error: str | None = None


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname if isinstance(el.tag, str) else ""


def _text(el: etree._Element | None) -> str | None:
    return "".join(el.itertext()).strip() if el is not None else None


def _strict_hcid(value: str) -> bool:
    return value.startswith("urn:oid:") and len(value) <= 64 and bool(_UID.match(value[8:]))


class _Run:
    """The checks of one request, with the transaction they are judged for."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.checks: list[Check] = []

    def add(self, check_id: str, passed: bool, detail: str = "") -> None:
        self.checks.append(rule(check_id, self.endpoint.transaction).check(passed, detail))


class Judge:
    def __init__(self, config: Config, truth: Truth, ledger: LedgerView, *, schemas: SchemaSet | None = None) -> None:
        self.truth = truth
        self.ledger = ledger
        self.policy = verification_policy(config)
        self.schemas = schemas or default_schemas()
        self.window = dt.timedelta(hours=config.responder.rad75_authorization_hours)
        self._message_ids: set[str] = set()
        self._lock = threading.Lock()

    # -- entry point ------------------------------------------------------------------------------------
    def judge(self, endpoint: Endpoint, headers: Sequence[tuple[str, str]], body: bytes) -> Judgement:
        """Every check that can be evaluated; an unexpected failure of the judge itself is reported as the
        judgement's ``error`` (the checks made so far are kept), never raised."""
        run = _Run(endpoint)
        try:
            return self._judge(run, headers, body)
        except Exception as exc:  # noqa: BLE001 - a judge bug must not take the simulated community down
            log.exception("judging a %s request failed", endpoint.transaction)
            return Judgement(run.checks, error=f"the judge failed on this request: {type(exc).__name__}: {exc}")

    def _judge(self, run: _Run, headers: Sequence[tuple[str, str]], body: bytes) -> Judgement:
        endpoint = run.endpoint
        judgement = Judgement(run.checks)
        content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
        decoded = self._encoding(run, content_type, body)
        if decoded is None:
            return judgement
        root_bytes, action_parameter = decoded
        envelope = self._envelope(run, root_bytes, action_parameter)
        if envelope is None:
            return judgement
        root, headers_els, payload = envelope
        claims = self._security(run, headers_els)
        if claims is not None:
            org = claims.organization or "(no organization)"
            judgement.requester = f"{org} ({claims.home_community_id or 'no homeCommunityId'})"
        expected = EXPECTED_BODY[endpoint.transaction]
        if payload.tag != expected:
            run.add("xsd.body", False, f"the Body holds {{{etree.QName(payload).namespace}}}{_local(payload)}; "
                    f"{endpoint.transaction} at {endpoint.path} expects {expected}")
            return judgement
        errors = self.schemas.errors(payload)
        shown = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
        run.add("xsd.body", not errors, shown or f"valid against {self.schemas.schema_file(expected)}")
        hcid = claims.home_community_id if claims is not None else None
        {"ITI-55": lambda: self._iti55(run, payload), "ITI-38": lambda: self._iti38(run, payload),
         "ITI-39": lambda: self._iti39(run, payload),
         "RAD-75": lambda: self._rad75(run, payload, hcid)}[endpoint.transaction]()
        return judgement

    # -- HTTP and MTOM ----------------------------------------------------------------------------------
    def _encoding(self, run: _Run, content_type: str, body: bytes) -> tuple[bytes, str | None] | None:
        ct = mtom.parse_content_type(content_type)
        is_mtom = ct.media_type == mtom.MULTIPART_RELATED
        if run.endpoint.mtom:
            run.add("mtom.required", is_mtom,
                    "MTOM/XOP (multipart/related)" if is_mtom else
                    f"sent as {ct.media_type or 'no Content-Type'}; {run.endpoint.transaction} requests must be "
                    "MTOM/XOP packages (multipart/related; type=\"application/xop+xml\") even without attachments")
        if not is_mtom:
            ok = ct.media_type == SOAP12_MEDIA
            run.add("http.media-type", ok, ct.media_type if ok else
                    f"Content-Type {content_type or '(none)'!r}: SOAP 1.2 is sent as {SOAP12_MEDIA}"
                    + (" (text/xml is SOAP 1.1's media type)" if ct.media_type == "text/xml" else ""))
            if ct.media_type not in (SOAP12_MEDIA, "text/xml", "application/xml"):
                return None
            return body, ct.get("action")
        run.add("http.media-type", True, mtom.MULTIPART_RELATED)
        try:
            message = mtom.decode_mtom_bytes(content_type, body)
        except SoapFault as exc:
            run.add("mtom.package", False, f"the MTOM package cannot be decoded: {exc.reason}")
            return None
        problems: list[str] = []
        if (ct.get("type") or "").lower() != mtom.XOP_MEDIA_TYPE:
            problems.append(f"Content-Type type parameter is {ct.get('type')!r}, expected \"{mtom.XOP_MEDIA_TYPE}\"")
        if (ct.get("start-info") or "").lower() != SOAP12_MEDIA:
            problems.append(f"start-info is {ct.get('start-info')!r}, expected \"{SOAP12_MEDIA}\"")
        if not ct.get("start"):
            problems.append("no start parameter naming the root part")
        root_ct = mtom.parse_content_type(message.root_content_type)
        if root_ct.media_type != mtom.XOP_MEDIA_TYPE or (root_ct.get("type") or "").lower() != SOAP12_MEDIA:
            problems.append(f"root part Content-Type is {message.root_content_type!r}, expected "
                            f"{mtom.XOP_MEDIA_TYPE}; type=\"{SOAP12_MEDIA}\"")
        run.add("mtom.package", not problems,
                "; ".join(problems) or f"{len(message.parts)} part(s), root <{message.root_content_id}>")
        return message.root, ct.get("action") or root_ct.get("action")

    # -- SOAP 1.2 and WS-Addressing --------------------------------------------------------------------
    def _envelope(self, run: _Run, data: bytes, action_parameter: str | None,
                  ) -> tuple[etree._Element, list[etree._Element], etree._Element] | None:
        try:
            root = xml.parse(data)
        except SoapFault as exc:
            run.add("soap.envelope", False, f"the message is not usable XML: {exc.reason}")
            return None
        if root.tag == ns.q(ns.SOAP11, "Envelope"):
            run.add("soap.envelope", False, f"a SOAP 1.1 envelope; IHE requires SOAP 1.2 ({ns.SOAP12})")
            return None
        if root.tag != ns.q(ns.SOAP12, "Envelope"):
            run.add("soap.envelope", False, f"the root element is {root.tag}, not a SOAP 1.2 Envelope")
            return None
        header = root.find(ns.q(ns.SOAP12, "Header"))
        body = root.find(ns.q(ns.SOAP12, "Body"))
        payload = [c for c in body if isinstance(c.tag, str)] if body is not None else []
        if len(payload) != 1:
            run.add("soap.envelope", False, "the envelope has no Body" if body is None else
                    f"the Body holds {len(payload)} elements, expected exactly one")
            return None
        run.add("soap.envelope", True, "SOAP 1.2")
        headers = [h for h in header if isinstance(h.tag, str)] if header is not None else []
        try:
            check_must_understand(headers, UNDERSTOOD_HEADER_NAMESPACES)
            run.add("soap.must-understand", True)
        except SoapFault as exc:
            run.add("soap.must-understand", False, exc.reason)
        self._addressing(run, headers, action_parameter)
        return root, headers, payload[0]

    def _addressing(self, run: _Run, headers: list[etree._Element], action_parameter: str | None) -> None:
        def wsa(local: str) -> list[etree._Element]:
            return [h for h in headers if h.tag == ns.q(ns.WSA, local)]

        expected = run.endpoint.request_action
        actions = wsa("Action")
        if len(actions) != 1:
            run.add("wsa.action", False, "no wsa:Action header" if not actions else
                    f"{len(actions)} wsa:Action headers, expected one")
        else:
            value = _text(actions[0]) or ""
            problems = []
            if value != expected:
                problems.append(f"wsa:Action is {value!r}; {run.endpoint.transaction} at {run.endpoint.path} "
                                f"requires {expected!r}")
            if not is_true(actions[0].get(ns.q(ns.SOAP12, "mustUnderstand"))):
                problems.append("wsa:Action lacks mustUnderstand=\"true\"")
            run.add("wsa.action", not problems, "; ".join(problems) or value)
            if action_parameter is not None:
                run.add("http.action-parameter", action_parameter == value,
                        action_parameter if action_parameter == value else
                        f"the Content-Type action parameter {action_parameter!r} differs from wsa:Action {value!r}")
        ids = wsa("MessageID")
        mid = _text(ids[0]) if len(ids) == 1 else None
        if not mid:
            run.add("wsa.message-id", False, "no wsa:MessageID header" if not ids else
                    f"{len(ids)} wsa:MessageID headers, expected one" if len(ids) > 1 else "empty wsa:MessageID")
        else:
            with self._lock:
                repeated = mid in self._message_ids
                self._message_ids.add(mid)
            run.add("wsa.message-id", not repeated,
                    f"wsa:MessageID {mid} was already used by an earlier request" if repeated else mid)
        reply = wsa("ReplyTo")
        address = _text(reply[0].find(ns.q(ns.WSA, "Address"))) if len(reply) == 1 else None
        run.add("wsa.reply-to", address == ns.WSA_ANONYMOUS,
                address or "" if address == ns.WSA_ANONYMOUS else
                "no wsa:ReplyTo header" if not reply else
                f"wsa:ReplyTo address is {address!r}, expected {ns.WSA_ANONYMOUS!r} (synchronous exchange)")

    # -- XUA --------------------------------------------------------------------------------------------
    def _security(self, run: _Run, headers: list[etree._Element]) -> AssertionClaims | None:
        security = [h for h in headers if h.tag == ns.q(ns.WSSE, "Security")]
        if len(security) != 1:
            run.add("security.header", False, "no wsse:Security header: XUA requires a signed SAML 2.0 assertion"
                    if not security else f"{len(security)} wsse:Security headers, expected one")
            return None
        header = security[0]
        assertions = header.findall(ns.q(ns.SAML2, "Assertion"))
        timestamps = header.findall(ns.q(ns.WSU, "Timestamp"))
        problems = []
        if len(assertions) != 1:
            problems.append(f"{len(assertions)} saml2:Assertion children of wsse:Security, expected one")
        if len(timestamps) != 1:
            problems.append(f"{len(timestamps)} wsu:Timestamp elements, expected one")
        run.add("security.header", not problems, "; ".join(problems) or "assertion and timestamp")
        try:
            identity = verify_security_header(header, self.policy)
            run.add("security.assertion", True, f"signed by {identity.signer_subject}")
        except SoapFault as exc:
            run.add("security.assertion", False, f"{exc.subcode or exc.code}: {exc.reason}")
        if len(assertions) != 1:
            return None
        try:
            claims = extract_identity(assertions[0])
        except SoapFault as exc:
            for check_id, _ in _ATTRIBUTES:
                run.add(check_id, False, f"the assertion's attributes cannot be read: {exc.reason}")
            return None
        errors = dict(claims.attribute_errors)
        for check_id, logical in _ATTRIBUTES:
            value = getattr(claims, logical)
            if logical in errors:
                run.add(check_id, False, errors[logical])
            elif value in (None, ""):
                run.add(check_id, False, f"attribute {' or '.join(ATTRIBUTE_NAMES[logical])} is missing from the "
                                         "AttributeStatement")
            elif logical == "role" and value.code_system != SNOMED_CT_OID:
                run.add(check_id, False, f"role {value.code} has codeSystem {value.code_system}, expected SNOMED CT "
                                         f"{SNOMED_CT_OID}")
            elif logical == "purpose_of_use" and value.code_system != NHIN_PURPOSE_OID:
                run.add(check_id, False, f"purpose of use {value.code} has codeSystem {value.code_system}, expected "
                                         f"the NHIN purpose of use {NHIN_PURPOSE_OID}")
            elif logical == "purpose_of_use" and value.code.upper() not in self.policy.permitted_purposes:
                run.add(check_id, False, f"purpose of use {value.code} is not permitted here (permitted: "
                                         f"{', '.join(sorted(self.policy.permitted_purposes))})")
            else:
                run.add(check_id, True, value.code if hasattr(value, "code") else str(value))
        return claims

    # -- ITI-55 -----------------------------------------------------------------------------------------
    def _iti55(self, run: _Run, payload: etree._Element) -> None:
        try:
            q = iti55.parse_request(payload)
        except iti55.Iti55RequestError as exc:
            run.add("xcpd.request", False, str(exc))
            return
        run.add("xcpd.request", True, f"message {q.message_id.root}")
        receivers = payload.findall(ns.q(ns.HL7, "receiver"))
        problems = []
        if q.processing_mode_code != "T":
            problems.append(f"processingModeCode is {q.processing_mode_code!r}, expected 'T'")
        if q.accept_ack_code != "AL":
            problems.append(f"acceptAckCode is {q.accept_ack_code!r}, expected 'AL'")
        if len(receivers) != 1 or q.receiver_device_id is None:
            problems.append(f"{len(receivers)} receiver(s) with a device id, expected exactly one")
        run.add("xcpd.transmission", not problems, "; ".join(problems))
        problems = []
        if q.response_modality_code != "R":
            problems.append(f"responseModalityCode is {q.response_modality_code!r}, expected 'R'")
        if q.response_priority_code not in ("I", "D"):
            problems.append(f"responsePriorityCode is {q.response_priority_code!r}, expected 'I' or 'D'")
        run.add("xcpd.query", not problems, "; ".join(problems))
        missing = [what for what, value in (("livingSubjectName", q.names), ("livingSubjectBirthTime", q.birth_time))
                   if not value]
        run.add("xcpd.demographics", bool(q.ids) or not missing,
                "by LivingSubjectId" if q.ids else
                f"no {' and no '.join(missing)} and no LivingSubjectId" if missing else "name and birth time")
        hcid = q.sender_home_community_id
        run.add("xcpd.sender-home-community", hcid is not None, hcid or
                "sender/device/asAgent/representedOrganization/id/@root is missing: the responder cannot tell which "
                "community asks (nor query it back)")

    # -- ITI-38 -----------------------------------------------------------------------------------------
    def _iti38(self, run: _Run, payload: etree._Element) -> None:
        query = payload.find(ns.q(ns.RIM, "AdhocQuery"))
        option = payload.find(ns.q(ns.QUERY, "ResponseOption"))
        return_type = option.get("returnType") if option is not None else None
        run.add("iti38.return-type", return_type in iti38.RETURN_TYPES,
                return_type or "" if return_type in iti38.RETURN_TYPES else
                f"ResponseOption returnType is {return_type!r}, expected LeafClass or ObjectRef")
        parsed: iti38.StoredQuery | None = None
        try:
            parsed = iti38.parse_query(payload)
            run.add("iti38.stored-query", True, parsed.name)
        except iti38.QueryError as exc:
            missing_home = exc.code == RegistryErrorCode.XDSMissingHomeCommunityId
            run.add("iti38.stored-query", missing_home, "" if missing_home else str(exc))
        if query is None:
            return
        slots = {(s.get("name") or "").strip() for s in query if _local(s) == "Slot"}
        home = (query.get("home") or "").strip() or None
        home_param = next((s for s in query if _local(s) == "Slot"
                           and (s.get("name") or "").strip() == iti38.P_HOME_COMMUNITY_ID), None)
        if home is None and home_param is not None:
            values = iti38.decode_slot_value(_text(home_param.find(f"{{{ns.RIM}}}ValueList/{{{ns.RIM}}}Value")) or "")
            home = values[0] if values else None
        with_patient = any(p in slots for p in _PATIENT_ID_PARAMS)
        if not with_patient:
            run.add("iti38.home.required", home is not None, home or
                    f"the {query.get('id')} query has no patient id, so AdhocQuery/@home must name the community")
        if home is not None:
            run.add("iti38.home.format", _strict_hcid(home), home if _strict_hcid(home) else
                    f"homeCommunityId {home!r} is not urn:oid:<OID> of at most 64 characters")
            known = same_hcid(home, self.truth.home_community_id)
            run.add("iti38.home.known", known, home if known else
                    f"homeCommunityId {home} is not this community's ({self.truth.home_community_id}); it was never "
                    "returned by it (XDSUnknownCommunity)")
        if with_patient:
            self._patient_id(run, parsed)

    def _patient_id(self, run: _Run, parsed: iti38.StoredQuery | None) -> None:
        if parsed is None or parsed.find_documents is None:
            raw = [v for p in _PATIENT_ID_PARAMS for vs in (parsed.values(p) if parsed else []) for v in vs]
            if not raw:
                run.add("iti38.patient-id", False, "the patient id parameter could not be read")
                return
            cx = ebrim.parse_cx(raw[0])
        else:
            cx = parsed.find_documents.patient_id
        aa = self.truth.assigning_authority
        if cx.assigning_authority != aa or cx.assigning_authority_type != "ISO":
            run.add("iti38.patient-id", False, f"patient id {cx} is not in this community's assigning authority "
                    f"{aa} (&{aa}&ISO): use the Patient.id its XCPD answer returned")
        elif cx.id not in self.truth.patients:
            run.add("iti38.patient-id", False, f"patient id {cx.id} was never returned by this community's XCPD")
        else:
            run.add("iti38.patient-id", True, str(cx))

    # -- ITI-39 -----------------------------------------------------------------------------------------
    def _iti39(self, run: _Run, payload: etree._Element) -> None:
        try:
            requests = iti39.parse_request(payload)
        except SoapFault as exc:
            run.add("iti39.document", False, exc.reason)
            return
        self._homes(run, "iti39.home.required", "iti39.home.known", [(r.document_unique_id, r) for r in requests])
        problems = []
        for r in requests:
            if r.repository_unique_id != self.truth.repository_unique_id:
                problems.append(f"{r.document_unique_id}: RepositoryUniqueId {r.repository_unique_id} is not the "
                                f"DocumentEntry's {self.truth.repository_unique_id}")
            elif self.ledger.find_entry(unique_id=r.document_unique_id) is None:
                problems.append(f"{r.document_unique_id}: no DocumentEntry with this uniqueId was returned by ITI-38")
        run.add("iti39.document", not problems, _listed(problems) or f"{len(requests)} document(s)")

    def _homes(self, run: _Run, required: str, known: str, items: list[tuple[str, iti39.DocumentRequest]]) -> None:
        missing = [uid for uid, r in items if not r.home_community_id]
        run.add(required, not missing, f"no HomeCommunityId for {_listed(missing)}" if missing else "")
        wrong = sorted({r.home_community_id for _, r in items if r.home_community_id and not (
            _strict_hcid(r.home_community_id) and same_hcid(r.home_community_id, self.truth.home_community_id))})
        if len(missing) < len(items):
            run.add(known, not wrong, f"HomeCommunityId {_listed(wrong)} is not this community's "
                    f"{self.truth.home_community_id} in urn:oid form" if wrong else self.truth.home_community_id)

    # -- RAD-75 -----------------------------------------------------------------------------------------
    def _rad75(self, run: _Run, payload: etree._Element, requester_hcid: str | None) -> None:
        try:
            request = rad75.parse_request(payload)
        except SoapFault as exc:
            run.add("rad75.structure", False, exc.reason)
            return
        items = list(rad75.iter_document_requests(request))
        run.add("rad75.structure", True, f"{len(request.studies)} study(ies), {len(items)} instance(s)")
        missing = [d.document_unique_id for _, _, d in items if not d.home_community_id]
        wrong = sorted({d.home_community_id for _, _, d in items if d.home_community_id and not (
            _strict_hcid(d.home_community_id) and same_hcid(d.home_community_id, self.truth.home_community_id))})
        problems = ([f"no HomeCommunityId for {_listed(missing)}"] if missing else []) + (
            [f"HomeCommunityId {_listed(wrong)} is not this community's {self.truth.home_community_id}"] if wrong
            else [])
        run.add("rad75.home", not problems, "; ".join(problems) or self.truth.home_community_id)
        mixed = []
        for study in request.studies:
            for series in study.series:
                repos = sorted({d.repository_unique_id for d in series.documents})
                if len(repos) > 1:
                    mixed.append(f"series {series.series_instance_uid} mixes RepositoryUniqueIds {', '.join(repos)}")
        run.add("rad75.grouping", not mixed, _listed(mixed))
        misplaced, misrouted = [], []
        for study_uid, series_uid, d in items:
            known = self.truth.instances.get(d.document_unique_id)
            if known is None:
                misplaced.append(f"{d.document_unique_id} is not an instance of this community")
                continue
            if (study_uid, series_uid) != (known.study_instance_uid, known.series_instance_uid):
                misplaced.append(f"{d.document_unique_id} requested under study {study_uid} / series {series_uid}; "
                                 f"it belongs to study {known.study_instance_uid} / series "
                                 f"{known.series_instance_uid}")
            if d.repository_unique_id.strip().removeprefix("urn:oid:") != known.repository:
                misrouted.append(f"{d.document_unique_id}: RepositoryUniqueId {d.repository_unique_id}, its KOS "
                                 f"Retrieve Location UID is {known.repository}")
        run.add("rad75.nesting", not misplaced, _listed(misplaced))
        run.add("rad75.repository", not misrouted, _listed(misrouted))
        uids = [d.document_unique_id for _, _, d in items]
        if requester_hcid:
            allowed = self.ledger.authorized(uids, requester_hcid, self.window)
            refused = [u for u in dict.fromkeys(uids) if u not in allowed]
            run.add("rad75.manifest-first", not refused,
                    f"no manifest referencing {_listed(refused)} was delivered (ITI-39) to {requester_hcid}"
                    if refused else f"all {len(uids)} in delivered manifests")
        else:
            run.add("rad75.manifest-first", False, "the requesting community is unknown (no usable homeCommunityId "
                                                   "in the assertion)")
        bad = [ts for ts in request.transfer_syntaxes if not (_UID.match(ts) and len(ts) <= 64)]
        run.add("rad75.transfer-syntax", not bad, f"malformed TransferSyntaxUID {_listed(bad)}" if bad
                else ", ".join(request.transfer_syntaxes))


__all__ = ["EXPECTED_BODY", "Judge", "Judgement", "LedgerView"]
