"""ITI-38 and ITI-39 scenarios: the test patient's KOS DocumentEntries and the manifests themselves."""

from __future__ import annotations

from conformance import spec
from conformance.checks.common import listing
from conformance.checks.kos import kos_checks
from conformance.checks.metadata import entry_checks, query_checks
from conformance.checks.retrieve import retrieve_checks
from conformance.context import Scenario, ScenarioContext
from conformance.prerequisites import (
    collect_manifests,
    find_query,
    kos_entries,
    matched_patient,
    parse_query_reply,
    retrieve_documents,
    retrieve_request,
)
from conformance.scenarios.common import judge, unexpected_body
from conformance.session import Sent
from gateway.ihe import ebrim, iti38
from gateway.ihe.ebrim import DocumentEntry
from gateway.initiating.partners import ITI38, ITI39, ITI55


def _query_result(ctx: ScenarioContext, sent: Sent, label: str = "") -> iti38.QueryResult | None:
    if not judge(ctx, sent, label=label):
        return None
    result = parse_query_reply(sent)
    if result is None:
        ctx.check("iti38.readable", "iti38", "the answer is a query:AdhocQueryResponse", spec.XCA_QUERY, False,
                  unexpected_body(sent, "query:AdhocQueryResponse"), label=label)
    return result


async def find_leafclass(ctx: ScenarioContext) -> None:
    match = await matched_patient(ctx)
    sent = await ctx.send(ITI38, find_query(match))
    result = _query_result(ctx, sent)
    if result is None:
        return
    ctx.add(query_checks(result, "LeafClass"))
    if result.entries:
        ctx.add(entry_checks(result.entries, patient_id=match.patient_id))
        ctx.session.entries = list(result.entries)


async def find_objectref(ctx: ScenarioContext) -> None:
    entries = await kos_entries(ctx)
    match = await matched_patient(ctx)
    sent = await ctx.send(ITI38, find_query(match, "ObjectRef"))
    result = _query_result(ctx, sent)
    if result is None:
        return
    ctx.add(query_checks(result, "ObjectRef"))
    got = {r.id for r in result.object_refs}
    want = {e.entry_uuid for e in entries}
    detail = "" if got == want else "; ".join(p for p in (
        f"missing {listing(sorted(want - got))}" if want - got else "",
        f"unexpected {listing(sorted(got - want))}" if got - want else "") if p)
    ctx.check("iti38.object-refs", "iti38", "the ObjectRefs name the entries of the LeafClass answer (entryUUIDs)",
              spec.RETURN_TYPE, got == want, detail)


def _same(a: DocumentEntry, b: DocumentEntry) -> list[str]:
    fields = ("entry_uuid", "unique_id", "patient_id", "mime_type", "object_type", "format_code", "type_code",
              "class_code", "repository_unique_id", "home_community_id")
    return [f for f in fields if getattr(a, f) != getattr(b, f)]


async def get_documents(ctx: ScenarioContext) -> None:
    entries = await kos_entries(ctx)
    home = ebrim.normalize_hcid(entries[0].home_community_id or ctx.session.partner.home_community_id)
    mine = [e for e in entries if ebrim.same_hcid(e.home_community_id or home, home)]
    by_uid = {e.unique_id: e for e in mine}
    for label, params in (
        ("by uniqueId", iti38.GetDocumentsParams(home_community_id=home, unique_ids=tuple(by_uid))),
        ("by entryUUID (after ObjectRef)", iti38.GetDocumentsParams(home_community_id=home,
                                                                    entry_uuids=tuple(e.entry_uuid for e in mine))),
    ):
        sent = await ctx.send(ITI38, iti38.build_query(params))
        result = _query_result(ctx, sent, label)
        if result is None:
            continue
        ctx.add(query_checks(result, "LeafClass"), label=label)
        got = {e.unique_id: e for e in result.entries}
        missing = sorted(set(by_uid) - set(got))
        extra = sorted(set(got) - set(by_uid))
        ctx.check("iti38.get-documents", "iti38", "GetDocuments returns exactly the requested entries",
                  spec.GET_DOCUMENTS, not missing and not extra,
                  "; ".join(p for p in (f"missing {listing(missing)}" if missing else "",
                                        f"unexpected {listing(extra)}" if extra else "") if p), label=label)
        differ = [f"{uid}: {', '.join(d)}" for uid, e in got.items() if uid in by_uid and (d := _same(e, by_uid[uid]))]
        ctx.check("iti38.consistent", "iti38", "the entries are the ones FindDocuments listed (same ids, patient, "
                  "codes)", spec.GET_DOCUMENTS, not differ, listing(differ), label=label)
        if result.entries:
            ctx.add(entry_checks(result.entries), label=label)
    label = "by uniqueId, ObjectRef"
    params = iti38.GetDocumentsParams(home_community_id=home, unique_ids=tuple(by_uid))
    sent = await ctx.send(ITI38, iti38.build_query(params, return_type="ObjectRef"))
    refs = _query_result(ctx, sent, label)
    if refs is not None:
        ctx.add(query_checks(refs, "ObjectRef"), label=label)
        got_ids, want_ids = {r.id for r in refs.object_refs}, {e.entry_uuid for e in mine}
        ctx.check("iti38.get-documents", "iti38", "GetDocuments returns exactly the requested entries",
                  spec.GET_DOCUMENTS, got_ids == want_ids,
                  "" if got_ids == want_ids else f"ObjectRefs {listing(sorted(got_ids))}, expected "
                                                 f"{listing(sorted(want_ids))}", label=label)


async def retrieve_kos(ctx: ScenarioContext) -> None:
    entries = await kos_entries(ctx)
    home = ctx.session.partner.home_community_id
    usable = [e for e in entries if e.repository_unique_id]
    if not usable:
        ctx.abort("no listed KOS entry has a repositoryUniqueId to retrieve it from (see iti38-find-leafclass)")
    requests = [retrieve_request(e, home) for e in usable]
    by_uid = {e.unique_id: e for e in usable}
    replies = await retrieve_documents(ctx, requests)
    size = ctx.session.partner.max_documents_per_request
    results = []
    for index, (sent, result) in enumerate(replies):
        label = f"request {index + 1}" if len(replies) > 1 else ""
        batch = requests[index * size:(index + 1) * size]
        if not judge(ctx, sent, label=label):
            continue
        if result is None:
            ctx.check("iti39.readable", "iti39", "the answer is a RetrieveDocumentSetResponse whose parts resolve",
                      spec.RETRIEVE_RESPONSE, False, unexpected_body(sent, "RetrieveDocumentSetResponse"),
                      label=label)
            continue
        results.append(result)
        ctx.add(retrieve_checks(result, batch, {r.document_unique_id: by_uid[r.document_unique_id] for r in batch}),
                label=label)
        for doc in result.documents:
            entry = by_uid.get(doc.document_unique_id.strip())
            if doc.data is None:
                continue
            checks, _ = kos_checks(doc.data, document_uid=doc.new_document_unique_id or doc.document_unique_id,
                                   entry=entry, patient=ctx.session.patient, scratch=ctx.workdir)
            ctx.add(checks, label=f"KOS {doc.new_document_unique_id or doc.document_unique_id}")
    found = collect_manifests(usable, results, home)
    if found:
        ctx.session.manifests = found


SCENARIOS = (
    Scenario("iti38-find-leafclass", "ITI-38: FindDocuments lists the KOS manifests with RAD TF-3 4.68 metadata",
             f"{spec.FIND_DOCUMENTS}; {spec.KOS_METADATA}; {spec.CQ_METADATA}", (ITI38, ITI55),
             "FindDocuments (KOS formatCode, Approved, Stable and On-Demand, LeafClass) for the patient id XCPD "
             "returned: every mandatory DocumentEntry attribute of an imaging manifest.", find_leafclass, "ITI-38"),
    Scenario("iti38-find-objectref", "ITI-38: FindDocuments with ObjectRef returns references with home",
             f"{spec.RETURN_TYPE}; {spec.XCA_HOME}", (ITI38, ITI55),
             "The same query asking for ObjectRef: rim:ObjectRef only, each with home, naming the LeafClass "
             "entries.", find_objectref, "ITI-38"),
    Scenario("iti38-get-documents", "ITI-38: GetDocuments by uniqueId and by entryUUID", spec.GET_DOCUMENTS,
             (ITI38, ITI55), "GetDocuments with the homeCommunityId for the listed uniqueIds, then for the "
             "entryUUIDs (the ObjectRef follow-up): the same entries and metadata; and by uniqueId asking for "
             "ObjectRef: their entryUUIDs, with home.", get_documents, "ITI-38"),
    Scenario("iti39-retrieve-kos", "ITI-39: every KOS manifest is retrieved and valid",
             f"{spec.XCA_RETRIEVE}; {spec.ON_DEMAND_RETRIEVE}; {spec.KOS_IOD}", (ITI39, ITI38, ITI55),
             "ITI-39 (MTOM) of each listed manifest: ids echoed, NewDocumentUniqueId for On-Demand entries, and each "
             "KOS a valid manifest of the test patient's study (dciodvfy when installed).", retrieve_kos, "ITI-39"),
)
