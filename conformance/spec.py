"""The clauses the conformance checks enforce, in one place (each :class:`~conformance.model.Check` cites one).

References follow the IHE numbering (ITI TF-2 = IT Infrastructure Technical Framework Volume 2, RAD TF-3 =
Radiology TF Volume 3), the W3C/OASIS specifications the profiles build on, DICOM, and the Carequality
Imaging Data Exchange Implementation Guide (CQ Imaging IG).
"""

from __future__ import annotations

from typing import Final

# -- SOAP, WS-Addressing, MTOM, WS-Security --------------------------------------------------------
SOAP12: Final = "SOAP 1.2 Part 1 5; ITI TF-2 V.3"
SOAP_FAULT: Final = "SOAP 1.2 Part 1 5.4"
SOAP_HTTP_STATUS: Final = "SOAP 1.2 Part 2 7.5.1.2"
WSA_RELATES_TO: Final = "WS-Addressing 1.0 Core 3.4; ITI TF-2 V.3.2"
WSA_MESSAGE_ID: Final = "WS-Addressing 1.0 Core 3.1, 3.4"
WSA_FAULT_ACTION: Final = "WS-Addressing 1.0 SOAP Binding 6"
MTOM: Final = "ITI TF-2 3.43.5; ITI TF-2 V.8"
XUA: Final = "ITI TF-2 3.40.4.1.3; WSS 1.0 SOAP Message Security 12"
CQ_SOAP_ERROR: Final = "CQ Imaging IG 8.4.1 (Error in SOAP request)"

#: the response wsa:Action of each transaction
ACTION: Final = {
    "ITI-55": "ITI TF-2 3.55.6.1.1",
    "ITI-38": "ITI TF-2 3.38.5 (Table 3.38.5-2)",
    "ITI-39": "ITI TF-2 3.39.5 (Table 3.39.5-2)",
    "RAD-75": "RAD TF-3 4.75 (WSDL, urn:ihe:rad:xdsi-b:2009)",
}
#: the schema of each transaction's response body
XSD: Final = {
    "ITI-55": "ITI TF-2 3.55.4.2.2 (PRPA_IN201306UV02.xsd)",
    "ITI-38": "ITI TF-2 3.38.4.1.3; ITI TF-2 3.18.4.1.2 (query.xsd)",
    "ITI-39": "ITI TF-2 3.39.4.1.3; ITI TF-2 3.43.4.2 (XDS.b_DocumentRepository.xsd)",
    "RAD-75": "RAD TF-3 4.75 (XDS.b_DocumentRepository.xsd)",
}

# -- ITI-55 ------------------------------------------------------------------------------------------
XCPD_CASES: Final = "ITI TF-2 3.55.4.2.3"
XCPD_RESPONSE: Final = "ITI TF-2 3.55.4.2.2"
XCPD_PATIENT: Final = "ITI TF-2 Table 3.55.4.2.2.2-1"
XCPD_HCID: Final = "ITI TF-2 3.55.4.2.2.4"
XCPD_DETECTED_ISSUE: Final = "ITI TF-2 3.55.4.2.2.6"
XCPD_MATCHING: Final = "ITI TF-2 3.55.4.1.3.1"

# -- ITI-38 ------------------------------------------------------------------------------------------
XCA_QUERY: Final = "ITI TF-2 3.38.4.1.2"
XCA_HOME: Final = "ITI TF-2 3.38.4.1.3"
XCA_UNKNOWN_PATIENT: Final = "ITI TF-2 3.38.4.1.2.2"
FIND_DOCUMENTS: Final = "ITI TF-2 3.18.4.1.2.3.7.1"
GET_DOCUMENTS: Final = "ITI TF-2 3.18.4.1.2.3.7.5"
RETURN_TYPE: Final = "ITI TF-2 3.18.4.1.2.3.1"
ENTRY_TYPE: Final = "ITI TF-2 3.18.4.1.2.3.6.2"
STATUS: Final = "ITI TF-3 4.2.4.2"
ERROR_CODES: Final = "ITI TF-3 Table 4.2.4.1-2"
DOCUMENT_ENTRY: Final = "ITI TF-3 4.2.3.2 (Table 4.2.3.2-1)"
KOS_METADATA: Final = "RAD TF-3 4.68.4.1.2.3.2"
CQ_METADATA: Final = "CQ Imaging IG 8.7.3"

# -- ITI-39 ------------------------------------------------------------------------------------------
XCA_RETRIEVE: Final = "ITI TF-2 3.39.4.1.3"
RETRIEVE_RESPONSE: Final = "ITI TF-2 3.43.4.2"
ON_DEMAND_RETRIEVE: Final = "ITI TF-2 3.43.4.2.3; ITI TF-2 3.39.4.1.2"

# -- KOS ---------------------------------------------------------------------------------------------
KOS_IOD: Final = "DICOM PS3.3 A.35.4 (Key Object Selection Document IOD)"
KOS_MANIFEST: Final = "RAD TF-3 4.68 (XDS-I.b manifest); DICOM PS3.16 CID 7010"
KOS_RETRIEVE_LOCATION: Final = "RAD TF-3 4.75; CQ Imaging IG 7.2.4 step 4"
DICOM_FILE: Final = "DICOM PS3.10 7"

# -- RAD-75 ------------------------------------------------------------------------------------------
RAD75: Final = "RAD TF-3 4.75; CQ Imaging IG 8.7.2"
RAD75_RESPONSE: Final = "RAD TF-3 4.75 (RAD TF-3 4.69.4.2); ITI TF-2 3.43.4.2"
RAD75_TRANSFER_SYNTAX: Final = "RAD TF-3 4.69 (RAD69-005)"
