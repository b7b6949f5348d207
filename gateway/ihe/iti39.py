"""ITI-39 Cross Gateway Retrieve: RetrieveDocumentSetRequest / Response (ITI TF-2 3.39, 3.43).

Request
    1..n ``xds:DocumentRequest`` {HomeCommunityId, RepositoryUniqueId, DocumentUniqueId}.
    HomeCommunityId is optional in ITI-43 but required in ITI-39 (ITI TF-2 3.39.5): a request
    without it is still parsed (``home_community_id=None``) so the Responding Gateway can answer that
    document with ``XDSMissingHomeCommunityId`` and serve the others (:func:`screen_requests`).

Response
    :func:`build_response` turns per-document outcomes, in request order, into
    ``rs:RegistryResponse`` + ``xds:DocumentResponse`` elements plus the MTOM parts:

    * a :class:`DocumentResult` becomes a DocumentResponse with the request identifiers echoed
      (HomeCommunityId only if it was in the request, ITI TF-2 3.43.5), optional
      NewRepositoryUniqueId / NewDocumentUniqueId (On-Demand, ITI TF-2 3.43.4.2.2) in schema order,
      ``mimeType`` and ``Document`` holding ``<xop:Include href="cid:..."/>`` and nothing else
      (no whitespace, ITI TF-2 V.8.3);
    * a :class:`DocumentFailure` becomes a RegistryError with ``location`` = ``<DocumentUniqueId>
      (<our homeCommunityId>)`` (see :mod:`gateway.ihe.registry`) and no DocumentResponse;
    * status: Success / PartialSuccess / Failure from the counts (ITI TF-2 3.39.4.1.3 allows
      PartialSuccess for a multi-source Responding Gateway).

    ``DocumentResult.data_or_cid`` is ``bytes`` or an async byte stream (the builder creates the MTOM
    part and its Content-ID) or a ``str`` Content-ID for a part the caller sends itself.
    ``inline=True`` writes base64 text instead of XOP (the logical infoset; used for XSD validation
    and for peers without MTOM).

Parsing a response (initiating side)
    :func:`parse_response` reads DocumentResponses (XOP Include or inline base64, either is legal,
    ITI TF-2 V.8.2), RegistryErrors and the status. Element names of DocumentResponse children are
    matched case-insensitively (a Metriport sample sends ``homeCommunityId``). Undecodable content is
    reported in :attr:`RetrieveResult.problems`, not raised.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from gateway.errors import XIG_MALFORMED, sender_fault
from gateway.ihe.ebrim import normalize_hcid, same_hcid
from gateway.ihe.registry import (
    SEVERITY_ERROR,
    RegistryError,
    RegistryErrorCode,
    build_registry_response,
    document_location,
    parse_registry_errors,
    parse_status,
    status_for,
)
from gateway.soap import mtom, ns

XDSB_NSMAP = {"xds": ns.XDSB, "rs": ns.RS}


@dataclass(frozen=True)
class DocumentRequest:
    """One ``DocumentRequest`` (ITI-43 / ITI-39; also the leaf of a RAD-75 request)."""

    home_community_id: str | None
    repository_unique_id: str
    document_unique_id: str


DocumentData = bytes | AsyncIterable[bytes] | str


@dataclass
class DocumentResult:
    """A document to return. ``data_or_cid``: bytes / async chunks (part built here) or a Content-ID (caller's part)."""

    request: DocumentRequest
    mime_type: str
    data_or_cid: DocumentData
    new_repository_unique_id: str | None = None
    new_document_unique_id: str | None = None
    #: Warning-severity RegistryErrors reported alongside the document (ITI TF-2 3.43.5)
    warnings: tuple[RegistryError, ...] = ()


@dataclass(frozen=True)
class DocumentFailure:
    """A requested document not returned: becomes one Error-severity RegistryError."""

    request: DocumentRequest
    code: str
    context: str

    def registry_error(self, home_community_id: str) -> RegistryError:
        return RegistryError(self.code, self.context,
                             document_location(self.request.document_unique_id, home_community_id), SEVERITY_ERROR)


Outcome = DocumentResult | DocumentFailure


# --------------------------------------------------------------------------------------------------
# Failure helpers (the codes XGR uses, ITI TF-3 Table 4.2.4.1-2)
# --------------------------------------------------------------------------------------------------

def missing_home(request: DocumentRequest) -> DocumentFailure:
    return DocumentFailure(request, RegistryErrorCode.XDSMissingHomeCommunityId,
                           "DocumentRequest without HomeCommunityId (required in Cross Gateway Retrieve, "
                           "ITI TF-2 3.39.5)")


def unknown_community(request: DocumentRequest) -> DocumentFailure:
    return DocumentFailure(request, RegistryErrorCode.XDSUnknownCommunity,
                           f"HomeCommunityId {request.home_community_id} is not served by this gateway")


def unknown_repository(request: DocumentRequest) -> DocumentFailure:
    return DocumentFailure(request, RegistryErrorCode.XDSUnknownRepositoryId,
                           f"RepositoryUniqueId {request.repository_unique_id} is not known to this gateway")


def unknown_document(request: DocumentRequest, detail: str | None = None) -> DocumentFailure:
    return DocumentFailure(request, RegistryErrorCode.XDSDocumentUniqueIdError,
                           detail or f"document {request.document_unique_id} is not available in repository "
                                     f"{request.repository_unique_id}")


def repository_error(request: DocumentRequest, detail: str) -> DocumentFailure:
    return DocumentFailure(request, RegistryErrorCode.XDSRepositoryError, detail)


def screen_requests(requests: Iterable[DocumentRequest], home_community_id: str,
                    ) -> tuple[list[DocumentRequest], list[DocumentFailure]]:
    """Split requests into those addressed to us and failures (missing / foreign HomeCommunityId)."""
    ok: list[DocumentRequest] = []
    failed: list[DocumentFailure] = []
    for r in requests:
        if not r.home_community_id:
            failed.append(missing_home(r))
        elif not same_hcid(r.home_community_id, home_community_id):
            failed.append(unknown_community(r))
        else:
            ok.append(r)
    return ok, failed


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------

def _texts(el: etree._Element) -> dict[str, str]:
    """Child element texts by lower-cased local name (first occurrence), trimmed."""
    out: dict[str, str] = {}
    for c in el:
        name = ns.local(c).lower()
        if name and name not in out:
            out[name] = (c.text or "").strip()
    return out


def parse_document_request(el: etree._Element) -> DocumentRequest:
    """One DocumentRequest (any namespace: xds-b, or xdsi-b inside IPF-style RAD-75 requests)."""
    t = _texts(el)
    repo, doc = t.get("repositoryuniqueid", ""), t.get("documentuniqueid", "")
    if not repo or not doc:
        raise sender_fault(XIG_MALFORMED, "DocumentRequest without RepositoryUniqueId or DocumentUniqueId")
    home = t.get("homecommunityid") or None
    return DocumentRequest(home, repo, doc)


def parse_request(el: etree._Element) -> list[DocumentRequest]:
    """``RetrieveDocumentSetRequest`` → its DocumentRequests, in order (HomeCommunityId may be None)."""
    requests = [parse_document_request(c) for c in el if ns.local(c) == "DocumentRequest"]
    if not requests:
        raise sender_fault(XIG_MALFORMED, "RetrieveDocumentSetRequest without DocumentRequest")
    return requests


def append_document_request(parent: etree._Element, request: DocumentRequest) -> etree._Element:
    dr = etree.SubElement(parent, ns.q(ns.XDSB, "DocumentRequest"))
    if request.home_community_id:
        etree.SubElement(dr, ns.q(ns.XDSB, "HomeCommunityId")).text = normalize_hcid(request.home_community_id)
    etree.SubElement(dr, ns.q(ns.XDSB, "RepositoryUniqueId")).text = request.repository_unique_id
    etree.SubElement(dr, ns.q(ns.XDSB, "DocumentUniqueId")).text = request.document_unique_id
    return dr


def build_request(requests: Sequence[DocumentRequest]) -> etree._Element:
    """``xds:RetrieveDocumentSetRequest`` (send it as MTOM, ITI TF-2 3.43.5)."""
    if not requests:
        raise ValueError("a RetrieveDocumentSetRequest needs at least one DocumentRequest")
    root = etree.Element(ns.q(ns.XDSB, "RetrieveDocumentSetRequest"), nsmap={"xds": ns.XDSB})
    for r in requests:
        append_document_request(root, r)
    return root


# --------------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------------

def _document_response(parent: etree._Element, result: DocumentResult, cid: str | None, inline: bytes | None,
                       ) -> etree._Element:
    dr = etree.SubElement(parent, ns.q(ns.XDSB, "DocumentResponse"))
    req = result.request
    if req.home_community_id:  # echo only what was sent [ITI TF-2 3.43.5]
        etree.SubElement(dr, ns.q(ns.XDSB, "HomeCommunityId")).text = req.home_community_id
    etree.SubElement(dr, ns.q(ns.XDSB, "RepositoryUniqueId")).text = req.repository_unique_id
    etree.SubElement(dr, ns.q(ns.XDSB, "DocumentUniqueId")).text = req.document_unique_id
    if result.new_repository_unique_id:
        etree.SubElement(dr, ns.q(ns.XDSB, "NewRepositoryUniqueId")).text = result.new_repository_unique_id
    if result.new_document_unique_id:
        etree.SubElement(dr, ns.q(ns.XDSB, "NewDocumentUniqueId")).text = result.new_document_unique_id
    etree.SubElement(dr, ns.q(ns.XDSB, "mimeType")).text = result.mime_type
    doc = etree.SubElement(dr, ns.q(ns.XDSB, "Document"))
    if inline is not None:
        doc.text = base64.b64encode(inline).decode("ascii")
    else:
        assert cid is not None
        inc = etree.SubElement(doc, ns.q(ns.XOP, "Include"), nsmap={"xop": ns.XOP})
        inc.set("href", "cid:" + mtom.normalize_content_id(cid))
        inc.tail = None
    return dr


def build_response(results: Sequence[Outcome], *, home_community_id: str, inline: bool = False,
                   status: str | None = None) -> tuple[etree._Element, list[mtom.Part]]:
    """``xds:RetrieveDocumentSetResponse`` and the MTOM parts for the documents it references.

    ``results`` in request order. Parts are returned in document order for the ``bytes`` and
    async-stream data; a ``str`` data is an existing Content-ID and yields no part. With
    ``inline=True`` bytes are written as base64 text (async streams and Content-IDs are refused).
    ``status`` overrides the computed one (e.g. a responder that suppresses failures).
    """
    root = etree.Element(ns.q(ns.XDSB, "RetrieveDocumentSetResponse"), nsmap=XDSB_NSMAP)
    errors: list[RegistryError] = []
    n_ok = 0
    for r in results:
        if isinstance(r, DocumentFailure):
            errors.append(r.registry_error(home_community_id))
        else:
            n_ok += 1
            errors.extend(
                RegistryError(w.code, w.context, w.location or document_location(r.request.document_unique_id,
                                                                                 home_community_id), w.severity)
                for w in r.warnings
            )
    n_err = sum(1 for e in errors if e.is_error)
    root.append(build_registry_response(errors, home_community_id=home_community_id,
                                        status=status or status_for(n_ok, n_err)))
    parts: list[mtom.Part] = []
    for r in results:
        if isinstance(r, DocumentFailure):
            continue
        if inline:
            if not isinstance(r.data_or_cid, bytes | bytearray | memoryview):
                raise ValueError("inline responses need bytes document data")
            _document_response(root, r, None, bytes(r.data_or_cid))
            continue
        if isinstance(r.data_or_cid, str):
            _document_response(root, r, r.data_or_cid, None)
            continue
        cid = mtom.new_content_id("doc")
        _document_response(root, r, cid, None)
        parts.append(mtom.Part(content_id=cid, content_type=r.mime_type or "application/octet-stream",
                               body=r.data_or_cid))
    return root, parts


# --------------------------------------------------------------------------------------------------
# Parsing the response
# --------------------------------------------------------------------------------------------------

@dataclass
class RetrievedDocument:
    """A DocumentResponse. Content: ``content_id`` (XOP) and/or ``data`` (inline, or resolved bytes);
    ``attachment`` is whatever the MTOM sink produced for that part (bytes, a Path, ...)."""

    home_community_id: str | None
    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    new_repository_unique_id: str | None = None
    new_document_unique_id: str | None = None
    content_id: str | None = None
    data: bytes | None = None
    attachment: Any = None


@dataclass
class RetrieveResult:
    status: str
    documents: list[RetrievedDocument] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)
    #: DocumentResponses XIG could not read (no ids, bad base64): reported, not raised
    problems: list[str] = field(default_factory=list)


def _registry_response(el: etree._Element) -> etree._Element | None:
    for c in el:
        if ns.local(c) == "RegistryResponse":
            return c
    return None


def parse_response(el: etree._Element, attachments: Mapping[str, Any] | None = None) -> RetrieveResult:
    """Read a ``RetrieveDocumentSetResponse`` (ITI-39, ITI-43, RAD-69/75).

    ``attachments`` maps Content-IDs (any form; normalised here) to the decoded MTOM parts; when
    given, every ``xop:Include`` must resolve (else a Sender fault ``xig:MalformedMessage``) and
    ``attachment`` (and ``data`` for bytes) is filled. Without it only ``content_id`` is set.
    """
    rr = _registry_response(el)
    result = RetrieveResult(status=parse_status(rr) if rr is not None else "",
                            errors=parse_registry_errors(rr) if rr is not None else [])
    by_cid = {mtom.normalize_content_id(k): v for k, v in (attachments or {}).items()}
    for dr in el:
        if ns.local(dr) != "DocumentResponse":
            continue
        t = _texts(dr)
        repo, uid = t.get("repositoryuniqueid", ""), t.get("documentuniqueid", "")
        if not repo or not uid:
            result.problems.append("DocumentResponse without RepositoryUniqueId or DocumentUniqueId")
            continue
        doc = RetrievedDocument(
            home_community_id=t.get("homecommunityid") or None,
            repository_unique_id=repo,
            document_unique_id=uid,
            mime_type=t.get("mimetype", ""),
            new_repository_unique_id=t.get("newrepositoryuniqueid") or None,
            new_document_unique_id=t.get("newdocumentuniqueid") or None,
        )
        document = next((c for c in dr if ns.local(c) == "Document"), None)
        if document is None:
            result.problems.append(f"DocumentResponse {uid} without Document")
            continue
        includes = mtom.find_xop_includes(document)
        if includes:
            doc.content_id = includes[0][1]
            if attachments is not None:
                if doc.content_id not in by_cid:
                    raise sender_fault(XIG_MALFORMED, f"xop:Include of document {uid} references missing part "
                                                      f"<{doc.content_id}>")
                doc.attachment = by_cid[doc.content_id]
                if isinstance(doc.attachment, bytes | bytearray):
                    doc.data = bytes(doc.attachment)
        else:
            text = "".join((document.text or "").split())
            try:
                doc.data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                result.problems.append(f"Document of {uid} is neither an xop:Include nor valid base64")
                continue
        result.documents.append(doc)
    return result


__all__ = [
    "DocumentData", "DocumentFailure", "DocumentRequest", "DocumentResult", "Outcome", "RetrieveResult",
    "RetrievedDocument", "append_document_request", "build_request", "build_response", "missing_home",
    "parse_document_request", "parse_request", "parse_response", "repository_error", "screen_requests",
    "unknown_community", "unknown_document", "unknown_repository",
]
