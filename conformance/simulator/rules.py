"""The rules the simulated community judges an initiating gateway's requests by, each citing its clause.

Clause numbers follow the project's spec digest (``shared/spec/spec-digest.md``); for RAD-75, whose
RAD TF-3 text was not reachable, the IHE assertion ids the digest quotes (RAD69-001 …) are named too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from conformance.model import Check


@dataclass(frozen=True)
class Rule:
    check_id: str
    family: str
    title: str
    spec: str

    def check(self, passed: bool, detail: str = "") -> Check:
        return Check(self.check_id, self.family, self.title, self.spec, passed, detail)

    def ok(self, detail: str = "") -> Check:
        return self.check(True, detail)

    def fail(self, detail: str) -> Check:
        return self.check(False, detail)


def _rules(*items: Rule) -> dict[str, Rule]:
    return {r.check_id: r for r in items}


#: per transaction: (clause of the request Action, clause of the body schema, clause requiring MTOM or None)
TRANSACTION_SPECS: Final[dict[str, tuple[str, str, str | None]]] = {
    "ITI-55": ("ITI TF-2 3.55.6.1.1", "ITI TF-2 3.55.4.1.2 (PRPA_IN201305UV02.xsd)", None),
    "ITI-38": ("ITI TF-2 Table 3.38.5-2", "ITI TF-2 3.38.4.1.2 (query.xsd, rim.xsd)", None),
    "ITI-39": ("ITI TF-2 Table 3.39.5-2", "ITI TF-2 3.39.4.1.2 (XDS.b_DocumentRepository.xsd)",
               "ITI TF-2 3.39.5 / 3.43.5 (MTOM/XOP request and response)"),
    "RAD-75": ("RAD TF-3 4.75 (IHE RAD-75 WSDL)", "RAD TF-3 4.75.4.1.2 (XDSI.b_ImagingDocumentSource.xsd)",
               "RAD TF-3 4.75 via RAD-69 (RAD69-003) → ITI TF-2 3.43.5 (MTOM/XOP both ways)"),
}
#: the clause of each transaction as a whole (a ScenarioResult's ``spec``)
TRANSACTION_CLAUSE: Final = {"ITI-55": "ITI TF-2 3.55", "ITI-38": "ITI TF-2 3.38", "ITI-39": "ITI TF-2 3.39",
                             "RAD-75": "RAD TF-3 4.75"}

RULES: Final[dict[str, Rule]] = _rules(
    # -- HTTP / MTOM ------------------------------------------------------------------------------
    Rule("http.media-type", "soap", "SOAP 1.2 media type (application/soap+xml or MTOM multipart/related)",
         "RFC 3902; ITI TF-2 Appendix V §V.9.3"),
    Rule("mtom.required", "mtom", "request sent as MTOM/XOP where the transaction requires it", ""),
    Rule("mtom.package", "mtom", "well-formed MTOM/XOP package (type, start, start-info, root part)",
         "ITI TF-2 Appendix V §V.9.3; W3C XOP 1.0 §4"),
    Rule("http.action-parameter", "soap", "Content-Type action parameter, when present, equals wsa:Action",
         "RFC 3902 (action parameter); W3C WS-Addressing 1.0 SOAP Binding"),
    # -- SOAP / WS-Addressing ---------------------------------------------------------------------
    Rule("soap.envelope", "soap", "SOAP 1.2 envelope with a Body holding exactly one element",
         "W3C SOAP 1.2 Part 1 §5; ITI TF-2 Appendix V §V.3"),
    Rule("soap.must-understand", "soap", "no mustUnderstand header the responder cannot process",
         "W3C SOAP 1.2 Part 1 §5.2.3"),
    Rule("wsa.action", "wsa", "wsa:Action present once, mustUnderstand, the transaction's request Action", ""),
    Rule("wsa.message-id", "wsa", "wsa:MessageID present and unique", "W3C WS-Addressing 1.0 Core §3.1, §3.4"),
    Rule("wsa.reply-to", "wsa", "wsa:ReplyTo with the anonymous address (synchronous exchange)",
         "ITI TF-2 Appendix V §V.3.2.2"),
    # -- XUA ----------------------------------------------------------------------------------------
    Rule("security.header", "security", "wsse:Security header with one SAML 2.0 assertion and a wsu:Timestamp",
         "ITI TF-2 3.40.4.1.2; WSS SOAP Message Security 1.0 §10"),
    Rule("security.assertion", "security", "assertion signed, trusted, within its validity window, policy met",
         "ITI TF-2 3.40.4.1.3; SAML Core 2.0 §5.4"),
    Rule("security.attr.subject-id", "security", "XUA attribute subject-id (user name)",
         "ITI TF-2 3.40.4.1.2 (XSPA subject-id); Carequality XUA"),
    Rule("security.attr.organization", "security", "XUA attribute organization (name)",
         "ITI TF-2 3.40.4.1.2 (XSPA organization); Carequality XUA"),
    Rule("security.attr.organization-id", "security", "XUA attribute organization-id (urn:oid or URL)",
         "ITI TF-2 3.40.4.1.2 (XSPA organization-id); Carequality XUA"),
    Rule("security.attr.home-community-id", "security", "XUA attribute homeCommunityId (urn:oid)",
         "ITI TF-2 3.40.4.1.2 (urn:ihe:iti:xca:2010:homeCommunityId); NHIN urn:nhin:names:saml:homeCommunityId"),
    Rule("security.attr.role", "security", "XUA attribute subject role (SNOMED CT coded)",
         "ITI TF-2 3.40.4.1.2 Subject-Role option"),
    Rule("security.attr.purpose-of-use", "security", "XUA attribute purpose of use (NHIN coded, permitted)",
         "ITI TF-2 3.40.4.1.2 PurposeOfUse option; Carequality permitted purposes"),
    # -- schema -------------------------------------------------------------------------------------
    Rule("xsd.body", "xsd", "the Body element is the transaction's request and valid against its XSD", ""),
    # -- ITI-55 -------------------------------------------------------------------------------------
    Rule("xcpd.request", "xcpd", "PRPA_IN201305UV02 has message id, sender, receiver and queryByParameter",
         "ITI TF-2 Table 3.55.4.1.2.3-1"),
    Rule("xcpd.transmission", "xcpd", "processingModeCode T, acceptAckCode AL, one receiver",
         "ITI TF-2 Table 3.55.4.1.2.3-1"),
    Rule("xcpd.query", "xcpd", "queryByParameter: responseModalityCode R, responsePriorityCode I or D",
         "ITI TF-2 Table 3.55.4.1.2.2-1"),
    Rule("xcpd.demographics", "xcpd", "name and birth time given unless a LivingSubjectId is used",
         "ITI TF-2 3.55.4.1.2.1"),
    Rule("xcpd.sender-home-community", "xcpd", "initiator homeCommunityId in sender/device/asAgent/"
         "representedOrganization/id/@root", "ITI TF-2 3.55.4.1.2.4"),
    # -- ITI-38 -------------------------------------------------------------------------------------
    Rule("iti38.stored-query", "iti38", "a known stored query with its required parameters",
         "ITI TF-2 3.18.4.1.2.3.7; ITI TF-2 Table 3.38.4.1.2.3-1"),
    Rule("iti38.return-type", "iti38", "ResponseOption returnType LeafClass or ObjectRef",
         "ITI TF-2 3.18.4.1.2.3.1"),
    Rule("iti38.home.required", "iti38", "AdhocQuery/@home on a query without a patient id",
         "ITI TF-2 3.38.4.1.2.1"),
    Rule("iti38.home.format", "iti38", "homeCommunityId as urn:oid:<OID>, at most 64 characters",
         "ITI TF-2 3.38.4.1.2.1"),
    Rule("iti38.home.known", "iti38", "homeCommunityId is one this community returned",
         "ITI TF-2 3.38.4.1.3.2 (XDSUnknownCommunity)"),
    Rule("iti38.patient-id", "iti38", "patient id is the one learned from XCPD (CX in the community's authority)",
         "ITI TF-2 3.38.4.1.2.2"),
    # -- ITI-39 -------------------------------------------------------------------------------------
    Rule("iti39.home.required", "iti39", "every DocumentRequest carries a HomeCommunityId", "ITI TF-2 3.39.5"),
    Rule("iti39.home.known", "iti39", "HomeCommunityId is this community's (urn:oid form)",
         "ITI TF-2 3.38.4.1.3.2; ITI TF-2 3.39.4.1.3 (XDSUnknownCommunity)"),
    Rule("iti39.document", "iti39", "RepositoryUniqueId and DocumentUniqueId of a DocumentEntry this community "
         "returned", "ITI TF-2 3.43.4.1.2"),
    # -- RAD-75 -------------------------------------------------------------------------------------
    Rule("rad75.structure", "rad75", "StudyRequest/SeriesRequest/DocumentRequest and TransferSyntaxUIDList all "
         "present", "RAD TF-3 4.69.4.1.2 via 4.75 (RAD75-001)"),
    Rule("rad75.home", "rad75", "every DocumentRequest carries this community's HomeCommunityId",
         "RAD TF-3 4.75.4.1.2 (RAD69-001, RAD69-002)"),
    Rule("rad75.grouping", "rad75", "one RepositoryUniqueId per SeriesRequest (a series has one Retrieve "
         "Location UID in the KOS)",
         "RAD TF-3 4.69.4.1.2 (RAD69-001); DICOM PS3.3 Hierarchical SOP Instance Reference Macro"),
    Rule("rad75.nesting", "rad75", "each instance requested under its own study and series, as in the KOS",
         "RAD TF-3 4.69.4.1.2 (RAD69-001)"),
    Rule("rad75.repository", "rad75", "RepositoryUniqueId = the KOS Retrieve Location UID of the instance",
         "RAD TF-3 4.69.4.1.2 (RAD69-001)"),
    Rule("rad75.manifest-first", "rad75", "instances belong to a manifest delivered to this community (ITI-39 "
         "before RAD-75)", "Carequality Imaging Data Exchange (Imaging-002); RAD TF-3 4.75 (XCA-I flow)"),
    Rule("rad75.transfer-syntax", "rad75", "TransferSyntaxUIDList lists at least one well-formed UID",
         "RAD TF-3 4.69.4.1.2 (RAD69-005)"),
)


def rule(check_id: str, transaction: str | None = None) -> Rule:
    """The rule ``check_id``; the Action, XSD and MTOM rules take their clause from ``transaction``."""
    r = RULES[check_id]
    if transaction is None or r.spec:
        return r
    action, schema, needs_mtom = TRANSACTION_SPECS[transaction]
    spec = {"wsa.action": action, "xsd.body": schema,
            "mtom.required": needs_mtom or "ITI TF-2 Appendix V §V.8.1 (Simple SOAP default)"}[check_id]
    return Rule(r.check_id, r.family, r.title, spec)


__all__ = ["RULES", "TRANSACTION_CLAUSE", "TRANSACTION_SPECS", "Rule", "rule"]
