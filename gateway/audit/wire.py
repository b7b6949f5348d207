"""From one transaction as it crossed the wire to its ATNA audit messages (pure; no I/O, no clock).

Both sides audit from the same facts: the request body that was sent or received, the response body
(``None`` when the exchange failed before one existed) and the SOAP fault, if any. Reading the wire,
rather than asking each service, audits exactly what was disclosed or received — including answers a
service never produced (faults, busy answers) — and keeps services free of audit plumbing.

The audit never fails the transaction: a body that cannot be read for the audit still gives a message
(the transaction, its outcome, the raw request as the query object where the table has one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lxml import etree

from gateway.audit import events
from gateway.audit.model import MAJOR_FAILURE, MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditMessage, Outcome
from gateway.ihe import ebrim, iti38, iti39, iti55, rad75
from gateway.ihe.iti39 import DocumentRequest
from gateway.soap import ns

_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
_PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"


def registry_outcome(status: str | None) -> Outcome:
    """ebRS status → EventOutcomeIndicator: Success 0, PartialSuccess 4 (minor), anything else 8."""
    if status == _SUCCESS:
        return SUCCESS
    if status == _PARTIAL:
        return MINOR_FAILURE
    return SERIOUS_FAILURE


def _bytes(el: etree._Element) -> bytes:
    return bytes(etree.tostring(el, encoding="UTF-8"))


def _find(el: etree._Element, local: str) -> etree._Element | None:
    for child in el.iter():
        if ns.local(child) == local:
            return child
    return None


def _fail(ctx: events.Context, description: str | None, outcome: Outcome = SERIOUS_FAILURE) -> events.Context:
    return dataclasses.replace(ctx, outcome=outcome, outcome_description=description or ctx.outcome_description)


def _ii_cx(ii: iti55.II) -> str:
    return ebrim.format_cx(ii.extension or "", iti55.bare_oid(ii.root)) if ii.extension else ii.root


def iti55_messages(ctx: events.Context, request: etree._Element, response: etree._Element | None, *,
                   community: str, fault: str | None = None) -> list[AuditMessage]:
    """ITI-55: the QueryByParameter as the query object; on the responding side one message per patient
    returned (ITI TF-2 3.55.5.1)."""
    qbp = _find(request, "queryByParameter")
    query = _bytes(qbp if qbp is not None else request)
    query_id = ""
    qid = _find(qbp, "queryId") if qbp is not None else None
    if qid is not None:  # the HL7 queryId (II): extension within root, or the root alone
        query_id = f"{qid.get('extension')}^{qid.get('root')}" if qid.get("extension") else qid.get("root", "")
    patients: list[str] = []
    if fault is not None or response is None:
        ctx = _fail(ctx, fault)
    else:
        try:
            result = iti55.parse_response(response)
        except Exception as exc:  # noqa: BLE001 - an unreadable answer is audited as a failure
            ctx = _fail(ctx, f"unreadable ITI-55 response: {exc}")
        else:
            if result.status == "error":
                ctx = _fail(ctx, "; ".join(d.text for d in result.ack_details if d.text) or None)
            else:
                ctx = dataclasses.replace(ctx, outcome=SUCCESS)
            if ctx.side == "responding":
                patients = [_ii_cx(p.patient_id) for p in result.patients]
    return events.iti55(ctx, query=query, home_community_id=community, patients=patients, query_id=query_id)


def iti38_messages(ctx: events.Context, request: etree._Element, response: etree._Element | None, *,
                   community: str, fault: str | None = None) -> list[AuditMessage]:
    """ITI-38: the stored query id and the whole AdhocQueryRequest; the patient of FindDocuments."""
    query_id, patient = "", None
    try:
        stored = iti38.parse_query(request)
        query_id = str(stored.query_id.value)
        if stored.find_documents is not None:
            patient = str(stored.find_documents.patient_id)
    except Exception:  # noqa: BLE001 - a query we refused is still audited, with what we can read
        adhoc = _find(request, "AdhocQuery")
        query_id = adhoc.get("id", "") if adhoc is not None else ""
    if fault is not None or response is None:
        ctx = _fail(ctx, fault)
    else:
        try:
            result = iti38.parse_response(response)
            ctx = dataclasses.replace(ctx, outcome=registry_outcome(result.status),
                                      outcome_description="; ".join(f"{e.code}: {e.context}" for e in result.errors)
                                      or ctx.outcome_description)
        except Exception as exc:  # noqa: BLE001
            ctx = _fail(ctx, f"unreadable ITI-38 response: {exc}")
    return events.iti38(ctx, query=_bytes(request), query_id=query_id, home_community_id=community, patient=patient)


def _documents(requests: Sequence[DocumentRequest], delivered: set[str], default_hcid: str,
               ) -> tuple[list[events.DocumentRef], list[events.DocumentRef]]:
    ok: list[events.DocumentRef] = []
    failed: list[events.DocumentRef] = []
    for r in requests:
        ref = events.DocumentRef(r.document_unique_id, r.repository_unique_id, r.home_community_id or default_hcid)
        (ok if r.document_unique_id in delivered else failed).append(ref)
    return ok, failed


def _retrieved(response: etree._Element | None) -> tuple[set[str], str | None, str | None]:
    """(delivered document ids, ebRS status, error text) of an ITI-39 / RAD-75 response."""
    if response is None:
        return set(), None, None
    try:
        result = iti39.parse_response(response)
    except Exception as exc:  # noqa: BLE001
        return set(), None, f"unreadable response: {exc}"
    errors = "; ".join(f"{e.code}: {e.context}" for e in result.errors) or None
    return {d.document_unique_id for d in result.documents}, result.status, errors


def iti39_messages(ctx: events.Context, request: etree._Element, response: etree._Element | None, *,
                   community: str, fault: str | None = None) -> list[AuditMessage]:
    """ITI-39: one Document object per requested document; delivered and failed audited separately."""
    try:
        requests = iti39.parse_request(request)
    except Exception:  # noqa: BLE001
        requests = []
    delivered, status, errors = _retrieved(response)
    ctx = _fail(ctx, fault) if fault is not None or response is None else dataclasses.replace(
        ctx, outcome=registry_outcome(status), outcome_description=errors or ctx.outcome_description)
    ok, failed = _documents(requests, delivered, community)
    return events.iti39(ctx, documents=ok, failed=failed)


def rad75_messages(ctx: events.Context, request: etree._Element, response: etree._Element | None, *,
                   community: str, fault: str | None = None) -> list[AuditMessage]:
    """RAD-75: one Study object per requested study; a study with any delivered instance is in ``studies``,
    one with any instance not delivered also in ``failed``."""
    try:
        req: rad75.ImagingRetrieveRequest | None = rad75.parse_request(request)
    except Exception:  # noqa: BLE001
        req = None
    delivered, status, errors = _retrieved(response)
    ctx = _fail(ctx, fault) if fault is not None or response is None else dataclasses.replace(
        ctx, outcome=registry_outcome(status), outcome_description=errors or ctx.outcome_description)
    ok: list[events.StudyRef] = []
    failed: list[events.StudyRef] = []
    for study in (req.studies if req is not None else ()):
        docs = [d for s in study.series for d in s.documents]
        first = docs[0]
        ref = events.StudyRef(study.study_instance_uid, first.repository_unique_id,
                              first.home_community_id or community)
        if any(d.document_unique_id in delivered for d in docs):
            ok.append(ref)
        if any(d.document_unique_id not in delivered for d in docs):
            failed.append(ref)
    return events.rad75(ctx, studies=ok, failed=failed)


_BY_TRANSACTION = {"ITI-55": iti55_messages, "ITI-38": iti38_messages, "ITI-39": iti39_messages,
                   "RAD-75": rad75_messages}


def transaction_messages(transaction: str, ctx: events.Context, request: etree._Element | None,
                         response: etree._Element | None, *, community: str,
                         fault: str | None = None) -> list[AuditMessage]:
    """The audit messages of one ITI-55 / ITI-38 / ITI-39 / RAD-75 exchange (``request`` = the SOAP body's
    payload element). A request that could not be parsed at all is audited with an empty body."""
    build = _BY_TRANSACTION[transaction]
    body = request if request is not None else etree.Element("unreadable")
    try:
        return build(ctx, body, response, community=community, fault=fault)
    except Exception as exc:  # noqa: BLE001 - last resort: never lose the event itself
        return build(_fail(ctx, f"audit could not read the exchange: {exc}", MAJOR_FAILURE),
                     etree.Element("unreadable"), None, community=community, fault=fault or str(exc))
