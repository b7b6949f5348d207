"""What several scenarios build on, fetched once per run: the test patient's id at the partner (ITI-55),
its KOS DocumentEntries (ITI-38) and the manifests themselves (ITI-39).

The scenario that owns a transaction (``xcpd-match``, ``iti38-find-leafclass``, ``iti39-retrieve-kos``) judges
it and stores what it learned in the session; any other scenario that needs it first and finds nothing
stored performs the exchange itself (recorded in its own result) and aborts with a clear reason when the
partner's answer is unusable.
"""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

from conformance.checks.xcpd import agrees, describe
from conformance.context import ScenarioContext
from conformance.session import Manifest, Match, Sent
from gateway.dicom.kos import KosError, parse_kos
from gateway.errors import SoapFault
from gateway.ihe import ebrim, iti38, iti39, iti55
from gateway.ihe.ebrim import DocumentEntry
from gateway.ihe.iti39 import DocumentRequest, RetrieveResult
from gateway.ihe.iti55 import PatientDemographics, PatientDiscoveryResult
from gateway.initiating.partners import ITI38, ITI39, ITI55
from gateway.soap import mtom

#: an ITI-39 answer larger than this is refused (a KOS is kilobytes)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def discovery_request(ctx: ScenarioContext, demographics: PatientDemographics) -> etree._Element:
    g = ctx.session.config.gateway
    p = ctx.session.partner
    body, _ = iti55.build_request(demographics, sender_device_id=g.home_community_id,
                                  home_community_id=g.home_community_id, receiver_device_id=p.hcid_oid,
                                  receiver_home_community_id=p.home_community_id)
    return body


def parse_discovery(sent: Sent) -> PatientDiscoveryResult | None:
    if not sent.answered or sent.reply is None:
        return None
    try:
        return iti55.parse_response(sent.reply.body)
    except iti55.Iti55ResponseError:
        return None


def remember_match(ctx: ScenarioContext, result: PatientDiscoveryResult) -> Match | None:
    """Store the first returned patient whose demographics agree with the test patient."""
    for p in result.patients:
        if p.patient_id.extension and agrees(p, ctx.session.patient) is None:
            hcid = p.home_community_id or ctx.session.partner.home_community_id
            match = Match(ebrim.CX(p.patient_id.extension, p.patient_id.root), ebrim.normalize_hcid(hcid))
            ctx.session.match = match
            return match
    return None


def why(sent: Sent) -> str:
    """Why an exchange gave nothing usable, in one sentence."""
    if sent.problem:
        return sent.problem
    if sent.reply is not None and sent.reply.fault is not None:
        f = sent.reply.fault
        return f"SOAP fault {f.code}{'/' + str(f.subcode) if f.subcode else ''}: {f.reason}"
    return "the reply is not usable"


async def matched_patient(ctx: ScenarioContext) -> Match:
    s = ctx.session
    if s.match is not None:
        return s.match
    sent = await ctx.send(ITI55, discovery_request(ctx, s.patient.demographics()))
    result = parse_discovery(sent)
    if result is None:
        ctx.abort(f"prerequisite ITI-55 for the test patient {s.patient.describe()} failed: {why(sent)}")
    match = remember_match(ctx, result)
    if match is None:
        ctx.abort(f"prerequisite: the partner does not find the test patient {s.patient.describe()} "
                  f"({describe(result)}); see scenario xcpd-match")
    return match


def find_query(match: Match, return_type: iti38.ReturnType = "LeafClass") -> etree._Element:
    return iti38.build_query(iti38.find_documents_for_kos(match.patient_id), return_type=return_type,
                             home_community_id=match.home_community_id)


def parse_query_reply(sent: Sent) -> iti38.QueryResult | None:
    if not sent.answered or sent.reply is None:
        return None
    body = sent.reply.body
    if not isinstance(body.tag, str) or etree.QName(body).localname != "AdhocQueryResponse":
        return None
    return iti38.parse_response(body)


async def kos_entries(ctx: ScenarioContext) -> list[DocumentEntry]:
    s = ctx.session
    if s.entries is not None:
        return s.entries
    match = await matched_patient(ctx)
    sent = await ctx.send(ITI38, find_query(match))
    result = parse_query_reply(sent)
    if result is None:
        ctx.abort(f"prerequisite ITI-38 FindDocuments for patient {match.patient_id} failed: {why(sent)}")
    if not result.entries:
        ctx.abort(f"prerequisite: ITI-38 FindDocuments lists no KOS document for patient {match.patient_id} "
                  f"(status {result.status}); see scenario iti38-find-leafclass")
    s.entries = list(result.entries)
    return s.entries


def retrieve_request(entry: DocumentEntry, default_home: str) -> DocumentRequest:
    return DocumentRequest(ebrim.normalize_hcid(entry.home_community_id or default_home),
                           entry.repository_unique_id or "", entry.unique_id)


def parse_retrieve_reply(sent: Sent) -> RetrieveResult | None:
    if not sent.answered or sent.reply is None:
        return None
    body = sent.reply.body
    if not isinstance(body.tag, str) or etree.QName(body).localname != "RetrieveDocumentSetResponse":
        return None
    try:
        return iti39.parse_response(body, sent.reply.attachments)
    except SoapFault:
        return None


async def retrieve_documents(ctx: ScenarioContext, requests: Sequence[DocumentRequest],
                             ) -> list[tuple[Sent, RetrieveResult | None]]:
    """ITI-39 of ``requests`` in batches of the partner's ``max_documents_per_request``."""
    size = ctx.session.partner.max_documents_per_request
    out = []
    for start in range(0, len(requests), size):
        body = iti39.build_request(list(requests[start:start + size]))
        sent = await ctx.send(ITI39, body, sink_factory=lambda _info: mtom.MemorySink(MAX_MANIFEST_BYTES))
        out.append((sent, parse_retrieve_reply(sent)))
    return out


def collect_manifests(entries: Sequence[DocumentEntry], results: Sequence[RetrieveResult | None],
                      default_home: str) -> list[Manifest]:
    by_uid = {e.unique_id: e for e in entries}
    found: list[Manifest] = []
    for result in results:
        for doc in (result.documents if result is not None else []):
            entry = by_uid.get(doc.document_unique_id.strip())
            if entry is None or doc.data is None:
                continue
            try:
                kos = parse_kos(doc.data)
            except KosError:
                continue
            found.append(Manifest(entry, retrieve_request(entry, default_home),
                                  doc.new_document_unique_id or doc.document_unique_id, doc.data, kos))
    return found


async def manifests(ctx: ScenarioContext) -> list[Manifest]:
    s = ctx.session
    if s.manifests is not None:
        return s.manifests
    entries = await kos_entries(ctx)
    home = s.partner.home_community_id
    usable = [e for e in entries if e.repository_unique_id]
    replies = await retrieve_documents(ctx, [retrieve_request(e, home) for e in usable])
    for sent, result in replies:
        if result is None:
            ctx.abort(f"prerequisite ITI-39 of the KOS documents failed: {why(sent)}")
    found = collect_manifests(usable, [r for _, r in replies], home)
    if not found:
        ctx.abort("prerequisite: no KOS manifest could be retrieved and read; see scenario iti39-retrieve-kos")
    s.manifests = found
    return found


__all__ = ["collect_manifests", "discovery_request", "find_query", "kos_entries", "manifests", "matched_patient",
           "parse_discovery", "parse_query_reply", "parse_retrieve_reply", "remember_match",
           "retrieve_documents", "retrieve_request", "why"]
