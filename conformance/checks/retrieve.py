"""Retrieve answers (ITI-39 family ``iti39``; RAD-75 uses the same response) and RegistryError outcomes."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from conformance import spec
from conformance.checks.common import check, listing
from conformance.model import Check
from gateway.ihe import ebrim
from gateway.ihe.ebrim import DocumentEntry
from gateway.ihe.iti39 import DocumentRequest, RetrievedDocument, RetrieveResult
from gateway.ihe.registry import FAILURE, PARTIAL_SUCCESS, SUCCESS


def _key(uid: str) -> str:
    return uid.strip()


def echo_problems(docs: Sequence[RetrievedDocument], requests: Sequence[DocumentRequest]) -> list[str]:
    """DocumentResponses whose ids do not echo a request (HomeCommunityId, RepositoryUniqueId, DocumentUniqueId)."""
    by_uid = {_key(r.document_unique_id): r for r in requests}
    problems: list[str] = []
    for d in docs:
        req = by_uid.get(_key(d.document_unique_id))
        if req is None:
            problems.append(f"{d.document_unique_id} was not requested")
            continue
        if d.repository_unique_id.strip() != req.repository_unique_id:
            problems.append(f"{d.document_unique_id}: RepositoryUniqueId {d.repository_unique_id}, requested "
                            f"{req.repository_unique_id}")
        if req.home_community_id and not ebrim.same_hcid(d.home_community_id, req.home_community_id):
            problems.append(f"{d.document_unique_id}: HomeCommunityId {d.home_community_id or 'missing'}, requested "
                            f"{req.home_community_id}")
    return problems


def retrieve_checks(result: RetrieveResult, requests: Sequence[DocumentRequest],
                    entries: Mapping[str, DocumentEntry]) -> list[Check]:
    """ITI-39 of KOS documents that all exist: Success, all returned, ids echoed, mimeType, On-Demand rules."""
    out: list[Check] = []
    errors = [e for e in result.errors if e.is_error]
    ok = result.status == SUCCESS and not errors
    out.append(check("iti39.status", "iti39", "the retrieve succeeds (status Success, no RegistryError)",
                     spec.STATUS, ok, "" if ok else f"status {result.status or 'missing'}"
                     + (f"; {listing([f'{e.code}: {e.context}' for e in errors])}" if errors else "")))
    got = {_key(d.document_unique_id) for d in result.documents}
    missing = [r.document_unique_id for r in requests if _key(r.document_unique_id) not in got]
    out.append(check("iti39.all-returned", "iti39", "every requested document is returned", spec.XCA_RETRIEVE,
                     not missing, f"missing: {listing(missing)}" if missing else f"{len(got)} returned"))
    problems = echo_problems(result.documents, requests) + result.problems
    out.append(check("iti39.echo", "iti39", "DocumentResponses echo HomeCommunityId, RepositoryUniqueId and "
                     "DocumentUniqueId", spec.RETRIEVE_RESPONSE, not problems, listing(problems)))
    bad_mime = [f"{d.document_unique_id}: {d.mime_type or 'none'}" for d in result.documents
                if d.mime_type != ebrim.MIME_DICOM]
    out.append(check("iti39.mime-type", "iti39", "mimeType is application/dicom, as listed", spec.RETRIEVE_RESPONSE,
                     not bad_mime, listing(bad_mime)))
    bad_new: list[str] = []
    for d in result.documents:
        entry = entries.get(_key(d.document_unique_id))
        if entry is not None and entry.is_on_demand:
            if not d.new_document_unique_id:
                bad_new.append(f"{d.document_unique_id}: no NewDocumentUniqueId")
            elif d.new_document_unique_id == d.document_unique_id:
                bad_new.append(f"{d.document_unique_id}: NewDocumentUniqueId equals the On-Demand uniqueId")
    if any(e.is_on_demand for e in entries.values()):
        out.append(check("iti39.on-demand", "iti39", "On-Demand documents come with a NewDocumentUniqueId that differs "
                         "from the requested uniqueId", spec.ON_DEMAND_RETRIEVE, not bad_new, listing(bad_new)))
    empty = [d.document_unique_id for d in result.documents if d.data is None and d.attachment is None]
    out.append(check("iti39.content", "iti39", "every DocumentResponse carries its document (XOP part or inline)",
                     spec.MTOM, not empty, f"without content: {listing(empty)}" if empty else ""))
    return out


def refusal_checks(result: RetrieveResult, *, family: str, uid: str, codes: Collection[str], what: str,
                   clause: str, all_refused: bool = True) -> list[Check]:
    """The document ``uid`` is refused with an Error RegistryError of one of ``codes`` naming it, and not
    returned; with ``all_refused`` the status is Failure, else PartialSuccess."""
    errors = [e for e in result.errors if e.is_error]
    wanted = " or ".join(sorted(codes))
    found = [e for e in errors if e.code in codes]
    seen = listing([f"{e.code} ({e.location or 'no location'}): {e.context}" for e in errors]) or "no RegistryError"
    out = [check(f"{family}.error-code", family, f"{what} is answered with {wanted}", clause, bool(found), seen)]
    named = [e for e in found if e.location and uid in e.location]
    if found:
        out.append(check(f"{family}.error-location", family, "the RegistryError's location names the document",
                         spec.XCA_RETRIEVE, bool(named), "" if named else f"location {found[0].location!r}"))
    returned = [d.document_unique_id for d in result.documents if _key(d.document_unique_id) == _key(uid)]
    out.append(check(f"{family}.not-returned", family, f"{what} is not returned as a document", clause, not returned,
                     "a DocumentResponse was returned for it" if returned else ""))
    status = FAILURE if all_refused else PARTIAL_SUCCESS
    out.append(check(f"{family}.error-status", family, f"status is {status.rsplit(':', 1)[-1]}", spec.STATUS,
                     result.status == status, f"status {result.status or 'missing'}"))
    return out


__all__ = ["echo_problems", "refusal_checks", "retrieve_checks"]
