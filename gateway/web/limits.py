"""Concurrency limits per partner and globally, and the "busy" answers for requests over a limit.

Admission (:class:`ConcurrencyLimiter`) happens when a SOAP POST arrives, before its body is read:
a global limit and a per-partner limit for every SOAP request (``[limits] max_concurrent_requests``
and ``max_concurrent_per_partner``) and tighter ones for retrievals, which hold PACS associations,
spool space and bandwidth for a long time (RAD-75, ITI-39: ``max_concurrent_retrievals`` and
``max_concurrent_retrievals_per_partner``). A request over a limit is answered at once — never
queued — so a flood costs a few KiB per refused request instead of a PACS retrieval each.

The partner is the TLS client certificate (its subject CN plus the start of its SHA-256 fingerprint,
so a renewed certificate is a new label but two partners never share one), else the peer host.

What a refused request gets (chosen for what initiators understand, per transaction):

* **ITI-39 and RAD-75**: a normal ``RetrieveDocumentSetResponse`` with status Failure and one
  ``RegistryError`` ``XDSRepositoryBusy`` (ITI TF-3 Table 4.2.4.1-2: "too much activity", listed for
  Cross Gateway Retrieve), ``location`` = our homeCommunityId (ITI TF-2 3.39.4.1.3). XCA initiating
  gateways are built to read RegistryErrors and pass them on to their consumers, while a SOAP fault is
  a "transmission error" that most of them report as the whole community being unavailable.
* **ITI-38**: an ``AdhocQueryResponse`` with status Failure and ``XDSRegistryBusy`` (same table, for
  Cross Gateway Query), for the same reason.
* **ITI-55**: Case 5 of ITI TF-2 3.55.4.2.3 — acknowledgement AE, queryResponseCode AE and a
  DetectedIssueEvent whose DetectedIssueManagement code is ``ResponderBusy`` (code system
  1.3.6.1.4.1.19376.1.2.27.3), the code IHE defines for exactly this. It echoes the query, so the
  request is parsed (not verified: the answer reveals nothing).
* A request that cannot be read well enough for those (not a SOAP envelope, too large to parse while
  busy, or an XCPD body that is not a query) gets a SOAP ``Receiver`` fault with subcode ``xig:Busy``.
  Its HTTP status is 500 as SOAP 1.2 Part 2 §7.5.1.2 (Table 20) maps every non-Sender fault; 503
  is not part of that binding and WCF/CXF clients turn it into a transport exception without
  reading the fault.

Every busy answer also carries ``Retry-After: [limits] retry_after_seconds`` (RFC 9110 §10.2.3;
informative outside 503/3xx) and the same hint in its text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from lxml import etree

from gateway.config import Config, LimitsSection
from gateway.errors import XIG_BUSY, SoapFault, receiver_fault
from gateway.ihe import iti38, iti55
from gateway.ihe.registry import RegistryError, RegistryErrorCode, build_registry_response
from gateway.soap import ns
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD, Endpoint

__all__ = ["ConcurrencyLimiter", "LimitScope", "Rejection", "Ticket", "busy_answer", "is_retrieval",
           "partner_label"]

LimitScope = Literal["global", "partner", "retrievals", "partner-retrievals", "shutdown"]
RETRIEVALS = frozenset({XCA_RETRIEVE.transaction, XCAI_RETRIEVE.transaction})


def is_retrieval(endpoint: Endpoint) -> bool:
    return endpoint.transaction in RETRIEVALS


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def partner_label(cert: x509.Certificate | None, peer_host: str | None) -> str:
    """``<subject CN> (<first 12 hex of the SHA-256 fingerprint>)``, or the peer host without a certificate."""
    if cert is None:
        return peer_host or "unknown"
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else cert.subject.rfc4514_string()
    return f"{cn} ({certificate_fingerprint(cert)[:12]})"


@dataclass(frozen=True)
class Rejection:
    """Why a request was not admitted."""

    scope: LimitScope
    limit: int
    retry_after: int

    @property
    def reason(self) -> str:
        what = {"global": f"{self.limit} concurrent requests in total",
                "partner": f"{self.limit} concurrent requests from your gateway",
                "retrievals": f"{self.limit} concurrent retrievals in total",
                "partner-retrievals": f"{self.limit} concurrent retrievals from your gateway",
                "shutdown": "the gateway is shutting down"}[self.scope]
        if self.scope == "shutdown":
            return f"responder busy: {what}; retry in {self.retry_after} s"
        return f"responder busy: the limit of {what} is reached; retry in {self.retry_after} s"


class Ticket:
    """An admitted request's share of the limits; :meth:`release` (idempotent) gives it back."""

    def __init__(self, limiter: ConcurrencyLimiter | None, partner: str, retrieval: bool) -> None:
        self._limiter = limiter
        self.partner = partner
        self.retrieval = retrieval

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self)


class ConcurrencyLimiter:
    """Counts in-flight requests; used from one event loop only (no locking needed)."""

    def __init__(self, limits: LimitsSection) -> None:
        self.limits = limits
        self.total = 0
        self.retrievals = 0
        self.per_partner: Counter[str] = Counter()
        self.retrievals_per_partner: Counter[str] = Counter()

    def admit(self, partner: str, *, retrieval: bool) -> Ticket | Rejection:
        lim = self.limits
        retry = lim.retry_after_seconds
        if self.total >= lim.max_concurrent_requests:
            return Rejection("global", lim.max_concurrent_requests, retry)
        if self.per_partner[partner] >= lim.max_concurrent_per_partner:
            return Rejection("partner", lim.max_concurrent_per_partner, retry)
        if retrieval:
            if self.retrievals >= lim.max_concurrent_retrievals:
                return Rejection("retrievals", lim.max_concurrent_retrievals, retry)
            if self.retrievals_per_partner[partner] >= lim.max_concurrent_retrievals_per_partner:
                return Rejection("partner-retrievals", lim.max_concurrent_retrievals_per_partner, retry)
            self.retrievals += 1
            self.retrievals_per_partner[partner] += 1
        self.total += 1
        self.per_partner[partner] += 1
        return Ticket(self, partner, retrieval)

    def _release(self, ticket: Ticket) -> None:
        self.total -= 1
        _decrement(self.per_partner, ticket.partner)
        if ticket.retrieval:
            self.retrievals -= 1
            _decrement(self.retrievals_per_partner, ticket.partner)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def busy_fault(reason: str, retry_after: int) -> SoapFault:
    fault = receiver_fault(XIG_BUSY, reason)
    fault.headers["retry-after"] = str(retry_after)
    return fault


def busy_answer(endpoint: Endpoint, config: Config, body: etree._Element | None, reason: str,
                retry_after: int) -> etree._Element | SoapFault:
    """The busy response body for ``endpoint`` (see the module docstring), or a ``xig:Busy`` fault.

    ``body`` is the request's SOAP Body child, None when the request could not be read as a SOAP
    envelope (then the answer is the fault: a registry response would have nothing to relate to).
    """
    if body is None:
        return busy_fault(reason, retry_after)
    hcid = config.gateway.home_community_id
    if endpoint in (XCA_RETRIEVE, XCAI_RETRIEVE):
        root = etree.Element(ns.q(ns.XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": ns.XDSB})
        root.append(build_registry_response([RegistryError(RegistryErrorCode.XDSRepositoryBusy, reason)],
                                            home_community_id=hcid))
        return root
    if endpoint == XCA_QUERY:
        return iti38.build_response([], return_type="LeafClass", home_community_id=hcid,
                                    errors=[RegistryError(RegistryErrorCode.XDSRegistryBusy, reason)])
    if endpoint == XCPD:
        from gateway.responding.discovery import iti55_device_id

        try:
            query = iti55.parse_request(iti55.normalise_hl7(body))
        except iti55.Iti55RequestError as exc:
            if exc.query is None:
                return busy_fault(reason, retry_after)
            query = exc.query
        g = config.gateway
        return iti55.build_response(query, iti55.CannotAnswer("ResponderBusy", reason, "INTERR"),
                                    responder_device_id=iti55_device_id(config),
                                    home_community_id=g.home_community_id, assigning_authority=g.assigning_authority)
    return busy_fault(reason, retry_after)

