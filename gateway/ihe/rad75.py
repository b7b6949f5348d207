"""RAD-75 Cross Gateway Retrieve Imaging Document Set (XCA-I): request codec and streamed response.

Request [RAD TF-3 §4.75 = §4.69 semantics; IHE ``XDSI.b_ImagingDocumentSource.xsd``]::

    iherad:RetrieveImagingDocumentSetRequest            urn:ihe:rad:xdsi-b:2009
      iherad:StudyRequest @studyInstanceUID             1..n
        iherad:SeriesRequest @seriesInstanceUID         1..n
          xds:DocumentRequest                           1..n  (HomeCommunityId, RepositoryUniqueId,
                                                                DocumentUniqueId = SOP Instance UID)
      iherad:TransferSyntaxUIDList/TransferSyntaxUID    1..n

``DocumentRequest`` is in the XDS.b namespace ``urn:ihe:iti:xds-b:2007`` in the IHE/NIST/dcm4chee
schema (``SeriesRequest`` extends ``RetrieveDocumentSetRequestType``) but in
``urn:ihe:rad:xdsi-b:2009`` in IPF's ``IHEXDSIB.xsd``; :func:`parse_request` accepts both and
:func:`build_request` emits XDS.b.

Response
    A plain ``xds:RetrieveDocumentSetResponse`` (built by :func:`gateway.ihe.iti39.build_response`):
    one DocumentResponse per returned instance with ``mimeType`` ``application/dicom`` and the Part 10
    bytes as an MTOM part; one RegistryError per instance not returned (``location`` =
    ``<SOP Instance UID> (<homeCommunityId>)``); status Success / PartialSuccess / Failure.
    Errors as the NIST RIG tests expect them: transfer syntax not available → XDSRepositoryError
    (:func:`transfer_syntax_failure`); unknown instance → XDSDocumentUniqueIdError; unknown
    RepositoryUniqueId → XDSUnknownRepositoryId (NIST's ``XDSIUnknownIdsUid`` is not an IHE code).

Streaming constraint
    The root MIME part — the SOAP envelope with ``RegistryResponse/@status``, the list of
    DocumentResponses and the RegistryErrors — references every binary part by Content-ID. XIG's
    MTOM encoder, like most stacks, sends the root part *first*, so everything in it has to be
    decided before the first image byte leaves: which instances succeed, which fail and so the
    status. A streaming responder therefore has two options:

    1. **Outcomes up front** (what :func:`build_response_skeleton` supports): resolve every
       requested instance first (it exists, the repository is ours, a requested transfer syntax is
       available or producible), build the root from those outcomes with Content-IDs chosen in
       advance (``mtom.new_content_id``), send it, then stream each instance's part. An instance that
       fails *after* the root has gone can no longer be reported as a RegistryError; the only honest
       signal left is to abort the HTTP response (a truncated multipart is a protocol error at the
       receiver), never to send a part with wrong content.
    2. **Root last**: XOP identifies the root by the ``start`` parameter of the multipart
       Content-Type, not by position (W3C XOP §4.1, RFC 2387), so a responder may stream all binary
       parts first and send the root at the end with the final outcome; parts of instances that
       failed midway are simply not referenced. This keeps the root truthful but relies on the
       receiver honouring ``start`` — not every deployed stack does, so XIG defaults to option 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lxml import etree

from gateway.errors import XIG_MALFORMED, sender_fault
from gateway.ihe.ebrim import MIME_DICOM as MIME_DICOM
from gateway.ihe.iti39 import (
    DocumentFailure,
    DocumentRequest,
    DocumentResult,
    Outcome,
    RetrievedDocument,
    RetrieveResult,
    append_document_request,
    parse_document_request,
)
from gateway.ihe.iti39 import build_response as _build_retrieve_response
from gateway.ihe.iti39 import parse_response as _parse_retrieve_response
from gateway.ihe.registry import RegistryErrorCode
from gateway.soap import mtom, ns

# Transfer syntaxes (DICOM PS3.5 Annex A / PS3.6 Table A-1)
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
#: JPIP syntaxes trigger Pixel Data Provider behaviour (RAD69-006); XIG does not serve them.
JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"

ACTION = "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSet"
RESPONSE_ACTION = "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSetResponse"


@dataclass(frozen=True)
class SeriesRequest:
    series_instance_uid: str
    documents: tuple[DocumentRequest, ...]


@dataclass(frozen=True)
class StudyRequest:
    study_instance_uid: str
    series: tuple[SeriesRequest, ...]


@dataclass(frozen=True)
class ImagingRetrieveRequest:
    """A RAD-75 (or RAD-69) request: studies → series → instances, and the acceptable transfer syntaxes."""

    studies: tuple[StudyRequest, ...]
    transfer_syntaxes: tuple[str, ...]

    @property
    def document_requests(self) -> list[DocumentRequest]:
        return [d for _, _, d in iter_document_requests(self)]


def iter_document_requests(req: ImagingRetrieveRequest) -> Iterator[tuple[str, str, DocumentRequest]]:
    """``(StudyInstanceUID, SeriesInstanceUID, DocumentRequest)`` in request order."""
    for study in req.studies:
        for series in study.series:
            for doc in series.documents:
                yield study.study_instance_uid, series.series_instance_uid, doc


def requests_by_repository(req: ImagingRetrieveRequest) -> dict[str, list[tuple[str, str, DocumentRequest]]]:
    """Instances grouped by RepositoryUniqueId (one Imaging Document Source each), request order kept."""
    out: dict[str, list[tuple[str, str, DocumentRequest]]] = {}
    for item in iter_document_requests(req):
        out.setdefault(item[2].repository_unique_id, []).append(item)
    return out


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------

def _malformed(reason: str) -> Exception:
    return sender_fault(XIG_MALFORMED, f"RetrieveImagingDocumentSetRequest: {reason}")


def parse_request(el: etree._Element) -> ImagingRetrieveRequest:
    """Parse a ``RetrieveImagingDocumentSetRequest``; DocumentRequest in xds-b or xdsi-b namespace.

    Structural gaps (no study/series/instance/transfer syntax, missing UID attributes) raise a Sender
    fault ``xig:MalformedMessage``: every element is mandatory (RAD TF-3 §4.69 / GAZELLE rad69.uml).
    A missing HomeCommunityId is *not* a fault; answer it per instance (``iti39.screen_requests``).
    """
    studies: list[StudyRequest] = []
    syntaxes: list[str] = []
    for child in el:
        kind = ns.local(child)
        if kind == "StudyRequest":
            study_uid = (child.get("studyInstanceUID") or "").strip()
            if not study_uid:
                raise _malformed("StudyRequest without studyInstanceUID")
            series_list: list[SeriesRequest] = []
            for s in child:
                if ns.local(s) != "SeriesRequest":
                    continue
                series_uid = (s.get("seriesInstanceUID") or "").strip()
                if not series_uid:
                    raise _malformed(f"SeriesRequest without seriesInstanceUID in study {study_uid}")
                docs = tuple(parse_document_request(d) for d in s if ns.local(d) == "DocumentRequest")
                if not docs:
                    raise _malformed(f"SeriesRequest {series_uid} without DocumentRequest")
                series_list.append(SeriesRequest(series_uid, docs))
            if not series_list:
                raise _malformed(f"StudyRequest {study_uid} without SeriesRequest")
            studies.append(StudyRequest(study_uid, tuple(series_list)))
        elif kind == "TransferSyntaxUIDList":
            syntaxes.extend(t for t in ((ts.text or "").strip() for ts in child if ns.local(ts) == "TransferSyntaxUID")
                            if t)
    if not studies:
        raise _malformed("no StudyRequest")
    if not syntaxes:
        raise _malformed("no TransferSyntaxUID")
    return ImagingRetrieveRequest(tuple(studies), tuple(dict.fromkeys(syntaxes)))


def build_request(req: ImagingRetrieveRequest) -> etree._Element:
    """``iherad:RetrieveImagingDocumentSetRequest`` with XDS.b DocumentRequests (send as MTOM)."""
    if not req.studies or not req.transfer_syntaxes:
        raise ValueError("a RAD-75 request needs at least one study and one transfer syntax")
    root = etree.Element(ns.q(ns.XDSI, "RetrieveImagingDocumentSetRequest"),
                         nsmap={"iherad": ns.XDSI, "xds": ns.XDSB})
    for study in req.studies:
        st = etree.SubElement(root, ns.q(ns.XDSI, "StudyRequest"), studyInstanceUID=study.study_instance_uid)
        for series in study.series:
            se = etree.SubElement(st, ns.q(ns.XDSI, "SeriesRequest"), seriesInstanceUID=series.series_instance_uid)
            for doc in series.documents:
                append_document_request(se, doc)
    tl = etree.SubElement(root, ns.q(ns.XDSI, "TransferSyntaxUIDList"))
    for ts in req.transfer_syntaxes:
        etree.SubElement(tl, ns.q(ns.XDSI, "TransferSyntaxUID")).text = ts
    return root


def imaging_request(items: Iterable[tuple[str, str, DocumentRequest]], transfer_syntaxes: Sequence[str],
                    ) -> ImagingRetrieveRequest:
    """Group ``(study, series, DocumentRequest)`` triples (e.g. from a KOS) into a request, order kept."""
    studies: dict[str, dict[str, list[DocumentRequest]]] = {}
    for study_uid, series_uid, doc in items:
        studies.setdefault(study_uid, {}).setdefault(series_uid, []).append(doc)
    return ImagingRetrieveRequest(
        tuple(StudyRequest(st, tuple(SeriesRequest(se, tuple(docs)) for se, docs in series.items()))
              for st, series in studies.items()),
        tuple(transfer_syntaxes),
    )


# --------------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------------

def transfer_syntax_failure(request: DocumentRequest, accepted: Sequence[str],
                            available: Sequence[str] = ()) -> DocumentFailure:
    """The instance cannot be given in any requested transfer syntax (RAD69-005; NIST rig_5424a)."""
    detail = ("Imaging Document Source cannot encode the pixel data using any of the requested transfer syntaxes "
              f"({', '.join(accepted)})")
    if available:
        detail += f"; available: {', '.join(available)}"
    return DocumentFailure(request, RegistryErrorCode.XDSRepositoryError, detail)


def build_response_skeleton(results_in_order: Sequence[Outcome], *, home_community_id: str,
                            ) -> tuple[etree._Element, list[mtom.Part]]:
    """The RAD-75 ``RetrieveDocumentSetResponse`` root for outcomes known *before* streaming starts.

    Each :class:`~gateway.ihe.iti39.DocumentResult` usually carries a Content-ID (``str``) chosen in
    advance, its bytes streamed later by the caller as a part with that Content-ID; bytes or async
    iterators are turned into parts here. A result without ``mime_type`` gets ``application/dicom``.
    See the module docstring for why the outcomes must be known before the root is built.
    """
    fixed: list[Outcome] = []
    for r in results_in_order:
        if isinstance(r, DocumentResult) and not r.mime_type:
            r = replace(r, mime_type=MIME_DICOM)
        fixed.append(r)
    return _build_retrieve_response(fixed, home_community_id=home_community_id)


def parse_response(el: etree._Element, attachments: Mapping[str, Any] | None = None) -> RetrieveResult:
    """A RAD-75 response is an ITI ``RetrieveDocumentSetResponse``: see :func:`gateway.ihe.iti39.parse_response`."""
    return _parse_retrieve_response(el, attachments)


__all__ = [
    "ACTION", "EXPLICIT_VR_LITTLE_ENDIAN", "IMPLICIT_VR_LITTLE_ENDIAN", "JPIP_REFERENCED", "JPIP_REFERENCED_DEFLATE",
    "RESPONSE_ACTION", "DocumentFailure", "DocumentRequest", "DocumentResult", "ImagingRetrieveRequest",
    "RetrieveResult", "RetrievedDocument", "SeriesRequest", "StudyRequest", "build_request",
    "build_response_skeleton", "imaging_request", "iter_document_requests", "parse_request", "parse_response",
    "requests_by_repository", "transfer_syntax_failure",
]
