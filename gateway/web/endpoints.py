"""The four SOAP endpoints of a responding gateway and what each accepts (pure data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    #: transaction name, e.g. ``ITI-55``
    transaction: str
    path: str
    #: key of the WSDL in :mod:`gateway.soap.wsdl`
    service: str
    request_action: str
    response_action: str
    #: ITI TF-2 3.43.5 (inherited by ITI-39 and, via RAD-69, by RAD-75): MTOM both ways.
    mtom: bool


XCPD = Endpoint("ITI-55", "/ihe/xcpd", "xcpd",
                "urn:hl7-org:v3:PRPA_IN201305UV02:CrossGatewayPatientDiscovery",
                "urn:hl7-org:v3:PRPA_IN201306UV02:CrossGatewayPatientDiscovery", mtom=False)
XCA_QUERY = Endpoint("ITI-38", "/ihe/xca/query", "xca-query",
                     "urn:ihe:iti:2007:CrossGatewayQuery", "urn:ihe:iti:2007:CrossGatewayQueryResponse",
                     mtom=False)
XCA_RETRIEVE = Endpoint("ITI-39", "/ihe/xca/retrieve", "xca-retrieve",
                        "urn:ihe:iti:2007:CrossGatewayRetrieve", "urn:ihe:iti:2007:CrossGatewayRetrieveResponse",
                        mtom=True)
XCAI_RETRIEVE = Endpoint("RAD-75", "/ihe/xcai/retrieve", "xcai-retrieve",
                         "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSet",
                         "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSetResponse", mtom=True)

ENDPOINTS: tuple[Endpoint, ...] = (XCPD, XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE)
BY_TRANSACTION = {e.transaction: e for e in ENDPOINTS}
