"""ebRS RegistryResponse status and RegistryError, shared by ITI-38, ITI-39 and RAD-75.

Status values [ITI TF-3 §4.2.4.2]: Success; PartialSuccess (results *and* errors); Failure (errors,
no results). Error codes are those of ITI TF-3 Table 4.2.4.1-2 that apply to the cross-community
transactions (:class:`RegistryErrorCode`); codes a partner sends that are not listed
(``XDSIUnknownIdsUid`` from the NIST RAD-75 simulator, ``MyBigError`` in NIST fixtures) are kept
as plain strings.

``location`` in XCA
    A Responding Gateway must put its homeCommunityId in the ``location`` of *every* RegistryError
    (ITI TF-2 3.38.4.1.3 for queries; ITI TF-2 3.39.4.1.3: "all the requirements stated in
    Section 3.43 plus the homeCommunityId"). For a per-document error of ITI-39/RAD-75, ITI-43
    requires the DocumentUniqueId in ``location`` (ITI TF-2 3.43.5). XIG therefore writes

    * ``location="<homeCommunityId>"`` for errors about the whole request, and
    * ``location="<DocumentUniqueId> (<homeCommunityId>)"`` for per-document errors,

    e.g. ``1.3.6.1.4.1.21367.201599.3.201606021454003.1 (urn:oid:1.3.6.1.4.1.21367.13.70.201)``.
    Both identifiers are whitespace-free, so the DocumentUniqueId is the first token: consumers
    that correlate by "location contains / starts with the DocumentUniqueId" (the NIST RAD-75
    expected response uses the bare SOP Instance UID) keep working, and :func:`split_location`
    reads both parts back. What peers send is never rewritten when parsed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from lxml import etree

from gateway.ihe.ebrim import normalize_hcid
from gateway.soap import ns

SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
STATUSES = frozenset({SUCCESS, PARTIAL_SUCCESS, FAILURE})

SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"


class RegistryErrorCode(StrEnum):
    """Error codes of ITI TF-3 Table 4.2.4.1-2 used by XGQ (ITI-38) and XGR (ITI-39 / RAD-75)."""

    XDSRegistryError = "XDSRegistryError"
    XDSRepositoryError = "XDSRepositoryError"
    XDSRegistryBusy = "XDSRegistryBusy"
    XDSRepositoryBusy = "XDSRepositoryBusy"
    XDSRegistryOutOfResources = "XDSRegistryOutOfResources"
    XDSRepositoryOutOfResources = "XDSRepositoryOutOfResources"
    XDSUnknownPatientId = "XDSUnknownPatientId"
    XDSUnknownCommunity = "XDSUnknownCommunity"
    XDSMissingHomeCommunityId = "XDSMissingHomeCommunityId"
    XDSUnavailableCommunity = "XDSUnavailableCommunity"
    XDSStoredQueryMissingParam = "XDSStoredQueryMissingParam"
    XDSStoredQueryParamNumber = "XDSStoredQueryParamNumber"
    XDSUnknownStoredQuery = "XDSUnknownStoredQuery"
    XDSTooManyResults = "XDSTooManyResults"
    XDSResultNotSinglePatient = "XDSResultNotSinglePatient"
    XDSDocumentUniqueIdError = "XDSDocumentUniqueIdError"
    XDSUnknownRepositoryId = "XDSUnknownRepositoryId"


@dataclass(frozen=True)
class RegistryError:
    """One ``rs:RegistryError``: ``code`` = errorCode, ``context`` = codeContext (the human-readable text)."""

    code: str
    context: str
    location: str | None = None
    severity: str = SEVERITY_ERROR

    @property
    def is_error(self) -> bool:
        return self.severity != SEVERITY_WARNING

    @property
    def is_warning(self) -> bool:
        return self.severity == SEVERITY_WARNING

    @property
    def document_unique_id(self) -> str | None:
        """The DocumentUniqueId named in ``location`` (see :func:`split_location`)."""
        return split_location(self.location)[0]


# --------------------------------------------------------------------------------------------------
# location
# --------------------------------------------------------------------------------------------------

def document_location(document_unique_id: str, home_community_id: str) -> str:
    """``<DocumentUniqueId> (<homeCommunityId>)``: the per-document RegistryError location in XCA."""
    return f"{document_unique_id} ({normalize_hcid(home_community_id)})"


_LOCATION = re.compile(r"^\s*(\S+)\s*\(\s*(\S+?)\s*\)\s*$")


def split_location(location: str | None) -> tuple[str | None, str | None]:
    """``(document unique id, homeCommunityId)`` read from a RegistryError location; either may be None.

    Understands ``uid (urn:oid:..)`` (XIG), a bare ``urn:oid:..`` (request-level error), and a bare
    token (the NIST/ITI-43 style DocumentUniqueId). Anything with spaces (``IdsActorSimulator EL-2``)
    gives ``(None, None)``.
    """
    if not location or not location.strip():
        return None, None
    m = _LOCATION.match(location)
    if m:
        return m.group(1), normalize_hcid(m.group(2))
    v = location.strip()
    if any(c.isspace() for c in v):
        return None, None
    if v.lower().startswith("urn:oid:"):
        return None, normalize_hcid(v)
    return v, None


def xca_location(location: str | None, home_community_id: str) -> str:
    """``location`` completed with our homeCommunityId as ITI TF-2 3.38.4.1.3 / 3.39.4.1.3 require."""
    hcid = normalize_hcid(home_community_id)
    if not location or not location.strip():
        return hcid
    loc = location.strip()
    if hcid in loc:
        return loc
    return f"{loc} ({hcid})"


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------

def status_for(n_ok: int, n_err: int) -> str:
    """Response status from the number of successful results and of Error-severity errors.

    No errors → Success (also for zero results); errors only → Failure; both → PartialSuccess.
    Warnings do not count as errors [ITI TF-3 §4.2.4.2].
    """
    if n_err <= 0:
        return SUCCESS
    return PARTIAL_SUCCESS if n_ok > 0 else FAILURE


def status_from_errors(n_ok: int, errors: Iterable[RegistryError]) -> str:
    return status_for(n_ok, sum(1 for e in errors if e.is_error))


# --------------------------------------------------------------------------------------------------
# XML
# --------------------------------------------------------------------------------------------------

def _highest_severity(errors: Iterable[RegistryError]) -> str:
    return SEVERITY_ERROR if any(e.is_error for e in errors) else SEVERITY_WARNING


def registry_error_list(errors: Iterable[RegistryError], home_community_id: str) -> etree._Element:
    """``rs:RegistryErrorList`` with ``highestSeverity``; every location carries ``home_community_id``.

    A location that already contains the homeCommunityId is kept; a DocumentUniqueId becomes
    ``uid (hcid)``; an empty one becomes the homeCommunityId (see the module docstring).
    """
    errs = list(errors)
    lst = etree.Element(ns.q(ns.RS, "RegistryErrorList"), nsmap={"rs": ns.RS})
    lst.set("highestSeverity", _highest_severity(errs))
    for e in errs:
        el = etree.SubElement(lst, ns.q(ns.RS, "RegistryError"))
        el.set("codeContext", e.context)
        el.set("errorCode", str(e.code))
        el.set("location", xca_location(e.location, home_community_id))
        el.set("severity", e.severity)
    return lst


def build_registry_response(errors: Iterable[RegistryError], *, home_community_id: str,
                            status: str | None = None, n_ok: int = 0) -> etree._Element:
    """``rs:RegistryResponse`` (the ITI-39/RAD-75 response header); status from ``n_ok``/errors unless given."""
    errs = list(errors)
    rr = etree.Element(ns.q(ns.RS, "RegistryResponse"), nsmap={"rs": ns.RS})
    rr.set("status", status or status_from_errors(n_ok, errs))
    if errs:
        rr.append(registry_error_list(errs, home_community_id))
    return rr


def parse_registry_errors(el: etree._Element) -> list[RegistryError]:
    """Every RegistryError under ``el`` (a RegistryErrorList, RegistryResponse or a response holding one).

    Matched by local name: a Metriport sample puts ``RegistryErrorList`` in the rim namespace.
    ``severity`` defaults to Error (the rs.xsd default); ``codeContext`` to "".
    """
    found: list[RegistryError] = []
    for e in el.iter():
        if ns.local(e) != "RegistryError":
            continue
        location = e.get("location")
        found.append(RegistryError(
            code=(e.get("errorCode") or "").strip(),
            context=e.get("codeContext") or (e.text or "").strip(),
            location=location.strip() if location is not None else None,
            severity=(e.get("severity") or SEVERITY_ERROR).strip(),
        ))
    return found


def parse_status(el: etree._Element) -> str:
    """The ``status`` attribute of a (Adhoc)RegistryResponse, trimmed; "" if absent."""
    return (el.get("status") or "").strip()


__all__ = [
    "FAILURE", "PARTIAL_SUCCESS", "SEVERITY_ERROR", "SEVERITY_WARNING", "STATUSES", "SUCCESS", "RegistryError",
    "RegistryErrorCode", "build_registry_response", "document_location", "parse_registry_errors", "parse_status",
    "registry_error_list", "split_location", "status_for", "status_from_errors", "xca_location",
]
