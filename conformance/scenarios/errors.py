"""Error flows: a broken SOAP request, an unknown patient, community and document."""

from __future__ import annotations

import uuid

from lxml import etree

from conformance import spec
from conformance.checks.common import listing
from conformance.checks.retrieve import refusal_checks
from conformance.checks.soap import fault_checks
from conformance.context import Scenario, ScenarioContext
from conformance.prerequisites import find_query, kos_entries, matched_patient, parse_query_reply, parse_retrieve_reply
from conformance.scenarios.common import judge, unexpected_body
from conformance.session import Match
from gateway.ihe import ebrim, iti38, iti39
from gateway.ihe.iti39 import DocumentRequest
from gateway.ihe.registry import FAILURE, SUCCESS, RegistryErrorCode
from gateway.initiating.partners import ITI38, ITI39, ITI55
from gateway.soap import mtom, ns

UNKNOWN_ACTION = "urn:xig:conformance:NoSuchAction"


def _unknown_hcid() -> str:
    return f"urn:oid:2.25.{uuid.uuid4().int}"


def _invalid_query() -> etree._Element:
    """An AdhocQueryRequest without its mandatory rim:AdhocQuery: not valid against query.xsd."""
    root = etree.Element(ns.q(ns.QUERY, "AdhocQueryRequest"), nsmap={"query": ns.QUERY, "rim": ns.RIM})
    option = etree.SubElement(root, ns.q(ns.QUERY, "ResponseOption"))
    option.set("returnType", "LeafClass")
    option.set("returnComposedObjects", "true")
    return root


async def soap_request(ctx: ScenarioContext) -> None:
    match = await matched_patient(ctx)
    clause = f"{spec.CQ_SOAP_ERROR}; {spec.SOAP_FAULT}"
    label = "schema-invalid body"
    sent = await ctx.send(ITI38, _invalid_query())
    ctx.add(fault_checks(sent, family="soap", clause=clause, what="the faulty request"), label=label)
    label = "unknown wsa:Action"
    sent = await ctx.send(ITI38, find_query(match), action=UNKNOWN_ACTION)
    ctx.add(fault_checks(sent, family="soap", clause=f"{spec.WSA_FAULT_ACTION}; {spec.CQ_SOAP_ERROR}",
                         what="the faulty request", subcode_namespace=ns.WSA,
                         subcodes={"ActionNotSupported"}), label=label)
    label = "no wsa:MessageID"
    sent = await ctx.send(ITI38, find_query(match), with_message_id=False)
    ctx.add(fault_checks(sent, family="soap", clause=f"{spec.WSA_MESSAGE_ID}; {spec.CQ_SOAP_ERROR}",
                         what="the faulty request", subcode_namespace=ns.WSA,
                         subcodes={"MessageAddressingHeaderRequired"}), label=label)


async def unknown_patient(ctx: ScenarioContext) -> None:
    match = await matched_patient(ctx)
    pid = ebrim.CX(f"XIGCONF-{uuid.uuid4().hex[:12].upper()}", match.patient_id.assigning_authority)
    sent = await ctx.send(ITI38, find_query(Match(pid, match.home_community_id)))
    if not judge(ctx, sent):
        return
    result = parse_query_reply(sent)
    if result is None:
        ctx.check("registry.readable", "registry", "the answer is a query:AdhocQueryResponse", spec.XCA_QUERY, False,
                  unexpected_body(sent, "query:AdhocQueryResponse"))
        return
    errors = [e for e in result.errors if e.is_error]
    codes = [e.code for e in errors]
    empty = result.status == SUCCESS and not errors
    unknown = RegistryErrorCode.XDSUnknownPatientId in codes
    ctx.check("registry.unknown-patient", "registry", "an unknown patient id gives Success with zero results or "
              "XDSUnknownPatientId", spec.XCA_UNKNOWN_PATIENT, (empty or unknown) and not result.entries,
              f"status {result.status}, {len(result.entries)} entries"
              + (f", errors {listing([str(c) for c in codes])}" if codes else ""))


async def unknown_community(ctx: ScenarioContext) -> None:
    hcid = _unknown_hcid()
    label = "ITI-38 GetDocuments"
    params = iti38.GetDocumentsParams(home_community_id=hcid, unique_ids=(f"2.25.{uuid.uuid4().int}",))
    sent = await ctx.send(ITI38, iti38.build_query(params))
    if judge(ctx, sent, label=label):
        result = parse_query_reply(sent)
        if result is None:
            ctx.check("registry.readable", "registry", "the answer is a query:AdhocQueryResponse", spec.XCA_QUERY,
                      False, unexpected_body(sent, "query:AdhocQueryResponse"), label=label)
        else:
            codes = [e.code for e in result.errors if e.is_error]
            ok = RegistryErrorCode.XDSUnknownCommunity in codes
            ctx.check("registry.error-code", "registry", "a query for an unknown homeCommunityId is answered with "
                      "XDSUnknownCommunity", spec.XCA_HOME, ok, listing([str(c) for c in codes]) or
                      f"no RegistryError (status {result.status}, {len(result.entries)} entries)", label=label)
            ctx.check("registry.error-status", "registry", "status is Failure", spec.STATUS,
                      result.status == FAILURE, f"status {result.status or 'missing'}", label=label)
    label = "ITI-39"
    entries = await kos_entries(ctx)  # a real repository: only the community is unknown
    repo = next((e.repository_unique_id for e in entries if e.repository_unique_id), f"2.25.{uuid.uuid4().int}")
    request = DocumentRequest(hcid, repo, f"2.25.{uuid.uuid4().int}")
    sent = await ctx.send(ITI39, iti39.build_request([request]),
                          sink_factory=lambda _info: mtom.MemorySink(1024 * 1024))
    if judge(ctx, sent, label=label):
        result39 = parse_retrieve_reply(sent)
        if result39 is None:
            ctx.check("registry.readable", "registry", "the answer is a RetrieveDocumentSetResponse",
                      spec.RETRIEVE_RESPONSE, False, unexpected_body(sent, "RetrieveDocumentSetResponse"), label=label)
        else:
            ctx.add(refusal_checks(result39, family="registry", uid=request.document_unique_id,
                                   codes={RegistryErrorCode.XDSUnknownCommunity},
                                   what="a document of an unknown HomeCommunityId", clause=spec.XCA_RETRIEVE),
                    label=label)


async def unknown_document(ctx: ScenarioContext) -> None:
    entries = await kos_entries(ctx)
    entry = next((e for e in entries if e.repository_unique_id), None)
    if entry is None:
        ctx.abort("no listed entry has a repositoryUniqueId (see iti38-find-leafclass)")
    home = ebrim.normalize_hcid(entry.home_community_id or ctx.session.partner.home_community_id)
    request = DocumentRequest(home, entry.repository_unique_id or "", f"2.25.{uuid.uuid4().int}")
    sent = await ctx.send(ITI39, iti39.build_request([request]),
                          sink_factory=lambda _info: mtom.MemorySink(1024 * 1024))
    if not judge(ctx, sent):
        return
    result = parse_retrieve_reply(sent)
    if result is None:
        ctx.check("registry.readable", "registry", "the answer is a RetrieveDocumentSetResponse",
                  spec.RETRIEVE_RESPONSE, False, unexpected_body(sent, "RetrieveDocumentSetResponse"))
        return
    ctx.add(refusal_checks(result, family="registry", uid=request.document_unique_id,
                           codes={RegistryErrorCode.XDSDocumentUniqueIdError}, what="an unknown DocumentUniqueId",
                           clause=f"{spec.XCA_RETRIEVE}; {spec.ERROR_CODES}"))


SCENARIOS = (
    Scenario("error-soap-request", "Errors: a faulty SOAP request is refused with a SOAP fault",
             f"{spec.CQ_SOAP_ERROR}; {spec.SOAP_FAULT}; {spec.WSA_FAULT_ACTION}", (ITI38, ITI55),
             "A schema-invalid query body, an unknown wsa:Action and a request without wsa:MessageID: each a SOAP "
             "1.2 Sender fault with the WS-Addressing fault Action (and the WS-Addressing subcodes).", soap_request,
             "Errors"),
    Scenario("error-unknown-patient", "Errors: a query for an unknown patient id",
             spec.XCA_UNKNOWN_PATIENT, (ITI38, ITI55),
             "FindDocuments for an invented id in the partner's assigning authority: Success with zero results or "
             "XDSUnknownPatientId.", unknown_patient, "Errors"),
    Scenario("error-unknown-community", "Errors: an unknown homeCommunityId gives XDSUnknownCommunity",
             f"{spec.XCA_HOME}; {spec.XCA_RETRIEVE}", (ITI38, ITI39, ITI55),
             "GetDocuments with an invented home and an ITI-39 DocumentRequest with an invented HomeCommunityId.",
             unknown_community, "Errors"),
    Scenario("error-unknown-document", "Errors: an unknown DocumentUniqueId gives XDSDocumentUniqueIdError",
             f"{spec.XCA_RETRIEVE}; {spec.ERROR_CODES}", (ITI39, ITI38, ITI55),
             "ITI-39 of an invented document in the partner's repository: Failure, an Error naming it, no document.",
             unknown_document, "Errors"),
)
