"""ITI-55 answers (family ``xcpd``): the response case, the echoes, every match's identity and custodian."""

from __future__ import annotations

from collections.abc import Collection

from lxml import etree

from conformance import spec
from conformance.checks.common import check, listing
from conformance.model import Check
from conformance.target import TestPatient
from gateway.ihe import iti55
from gateway.ihe.iti55 import II, DiscoveredPatient, PatientDiscoveryResult
from gateway.responding.matching import fold
from gateway.soap import ns

CASES = {1: "Case 1 (one match)", 2: "Case 2 (several matches)", 3: "Case 3 (more attributes requested)",
         4: "Case 4 (no match)", 5: "Case 5 (cannot answer)"}


def _h(local: str) -> str:
    return ns.q(ns.HL7, local)


def request_ids(body: etree._Element) -> tuple[II, II]:
    """``(message id, queryId)`` of our own PRPA_IN201305UV02."""
    mid = body.find(_h("id"))
    qid = body.find(f"{_h('controlActProcess')}/{_h('queryByParameter')}/{_h('queryId')}")
    assert mid is not None and qid is not None, "build_request always writes id and queryId"
    return II(mid.get("root", ""), mid.get("extension")), II(qid.get("root", ""), qid.get("extension"))


def case_of(result: PatientDiscoveryResult) -> int | None:
    """The ITI TF-2 3.55.4.2.3 case the codes describe, None when they contradict each other."""
    ack, qrc = result.ack_code, result.query_response_code
    if ack == "AE" or qrc in ("AE", "QE"):
        return 5
    if ack != "AA":
        return None
    if qrc == "OK" and result.patients:
        return 1 if len(result.patients) == 1 else 2
    if qrc == "OK" and result.more_attributes_requested:
        return 3
    if qrc == "NF" and not result.patients and not result.more_attributes_requested:
        return 4
    return None


def describe(result: PatientDiscoveryResult) -> str:
    c = case_of(result)
    codes = (f"acknowledgement {result.ack_code or 'missing'}, "
             f"queryResponseCode {result.query_response_code or 'missing'}")
    events = f"{len(result.patients)} registrationEvent(s)"
    more = f", more attributes requested: {', '.join(result.more_attributes_requested)}" \
        if result.more_attributes_requested else ""
    issues = f", issues: {', '.join(result.issue_codes)}" if result.issue_codes else ""
    texts = [d.text for d in result.ack_details if d.text]
    text = f" ({'; '.join(texts)})" if texts and c == 5 else ""
    return f"{CASES.get(c or 0, 'inconsistent answer')}: {codes}, {events}{more}{issues}{text}"


def response_checks(result: PatientDiscoveryResult, element: etree._Element, *, message_id: II,
                    query_id: II) -> list[Check]:
    """Structure every ITI-55 answer must have, whatever its case."""
    out: list[Check] = []
    target = result.target_message_id
    out.append(check("xcpd.target-message", "xcpd", "acknowledgement/targetMessage/id is our message id",
                     spec.XCPD_RESPONSE, target == message_id,
                     "" if target == message_id else f"targetMessage id {target}, our message id {message_id}"))
    qid = result.query_id
    out.append(check("xcpd.query-id", "xcpd", "queryAck/queryId echoes our queryId", spec.XCPD_RESPONSE,
                     qid == query_id, "" if qid == query_id else f"queryAck/queryId {qid}, our queryId {query_id}"))
    case = case_of(result)
    out.append(check("xcpd.case-codes", "xcpd", "acknowledgement, queryResponseCode and registrationEvents "
                     "describe one case", spec.XCPD_CASES, case is not None, describe(result)))
    if result.patients:
        out.append(_patients_check(element))
        missing = [str(p.patient_id) for p in result.patients if not p.home_community_id]
        out.append(check("xcpd.custodian", "xcpd", "every match names its community "
                         "(custodian/assignedEntity/id/@root)", spec.XCPD_HCID, not missing,
                         f"no custodian homeCommunityId for {listing(missing)}" if missing else ""))
    if result.more_attributes_requested:
        unknown = [c for c in result.more_attributes_requested if c not in iti55.MORE_ATTRIBUTE_CODES]
        out.append(check("xcpd.more-attribute-codes", "xcpd", "requested attributes use the IHE codes "
                         f"({iti55.MORE_ATTRIBUTES_SYSTEM})", spec.XCPD_DETECTED_ISSUE, not unknown,
                         f"unknown code(s) {listing(unknown)}" if unknown else ""))
    return out


def _patients_check(element: etree._Element) -> Check:
    """Each registrationEvent's Patient has exactly one id (root and extension) and statusCode active."""
    root = iti55.normalise_hl7(element)
    problems: list[str] = []
    events = root.findall(f"{_h('controlActProcess')}/{_h('subject')}/{_h('registrationEvent')}")
    for i, event in enumerate(events, 1):
        patient = event.find(f"{_h('subject1')}/{_h('patient')}")
        if patient is None:
            problems.append(f"registrationEvent {i} has no subject1/patient")
            continue
        ids = patient.findall(_h("id"))
        if len(ids) != 1 or not ids[0].get("root") or not ids[0].get("extension"):
            problems.append(f"registrationEvent {i}: {len(ids)} Patient.id, expected exactly one with root and "
                            "extension")
        status = patient.find(_h("statusCode"))
        if status is None or status.get("code") != "active":
            problems.append(f"registrationEvent {i}: Patient.statusCode is "
                            f"{status.get('code') if status is not None else 'missing'}, expected active")
    return check("xcpd.patient", "xcpd", "every match has exactly one Patient.id and statusCode active",
                 spec.XCPD_PATIENT, not problems, "; ".join(problems))


def case_check(result: PatientDiscoveryResult, expected: Collection[int], *, why: str = "") -> Check:
    case = case_of(result)
    wanted = " or ".join(CASES[c] for c in sorted(expected))
    detail = describe(result) + (f" — {why}" if why and case not in expected else "")
    return check("xcpd.case", "xcpd", f"the answer is {wanted}", spec.XCPD_CASES, case in expected, detail)


def agrees(patient: DiscoveredPatient, test: TestPatient) -> str | None:
    """None when the returned patient plausibly is the test patient (family name, birth date, gender), else why not."""
    d = patient.demographics
    families = {fold(" ".join(n.family)) for n in d.names if n.family}
    if families and fold(test.family) not in families:
        return f"family name {', '.join(sorted(families))}, expected {test.family}"
    if d.birth_time and not d.birth_time.startswith(test.birth_date[: len(d.birth_time[:8])]):
        return f"birth date {d.birth_time}, expected {test.birth_date}"
    if d.gender in ("M", "F") and test.gender in ("M", "F") and d.gender != test.gender:
        return f"gender {d.gender}, expected {test.gender}"
    return None


def demographics_check(patients: Collection[DiscoveredPatient], test: TestPatient) -> Check:
    bad = [f"{p.patient_id}: {why}" for p in patients if (why := agrees(p, test)) is not None]
    return check("xcpd.demographics", "xcpd", "returned patients carry the queried demographics",
                 spec.XCPD_MATCHING, bool(patients) and not bad,
                 "; ".join(bad) if bad else ("no patient returned" if not patients else ""))


__all__ = ["CASES", "agrees", "case_check", "case_of", "demographics_check", "describe", "request_ids",
           "response_checks"]
