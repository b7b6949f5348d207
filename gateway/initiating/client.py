"""One partner, four transactions: the initiating gateway's client for ITI-55, ITI-38, ITI-39 and RAD-75.

:class:`PartnerClient` wraps a shared :class:`~gateway.web.client.SoapClient` (mutual TLS, connection
pooling) for one :class:`~gateway.initiating.partners.Partner`. Every request carries a freshly signed
XUA assertion (:func:`gateway.security.outbound.security_header`: the configured user, role,
organisation and purpose — the partner's ``purpose_of_use`` and ``signature_algorithm`` when set — or an
override :class:`~gateway.security.saml.UserIdentity`).

What each method returns
    * :meth:`PartnerClient.discover` (ITI-55) → :class:`DiscoveryOutcome`: OK with matches (patient id
      to use with that community, custodian homeCommunityId, health-data-locator flag), NF, more
      attributes requested (Case 3), or AE with the partner's issue codes and text (Case 5).
    * :meth:`PartnerClient.find_manifests` (ITI-38 FindDocuments, KOS formatCode, Stable + On-Demand) →
      :class:`FoundManifests`, a list of DocumentEntries plus the partner's RegistryErrors; entries
      without ``home`` are dropped and reported as XDSMissingHomeCommunityId naming the partner
      (ITI TF-2 3.38.4.1.3).
    * :meth:`PartnerClient.retrieve_manifests` (ITI-39, MTOM per ``mtom_requests``, batches of
      ``max_documents_per_request``) → one :class:`RetrievedManifest` per entry: the parsed KOS and its
      NewDocumentUniqueId, or the partner's RegistryError / what was wrong with the answer.
    * :meth:`PartnerClient.retrieve_images` (RAD-75, batches per repository, study/series grouping) →
      :class:`ImagesOutcome`: per SOP Instance UID what the sink produced (a path for a
      :class:`~gateway.soap.mtom.FileSink`) or the error code and context. Instances stream part by
      part into sinks; a study is never held in memory.

Failures
    Application answers (AE, NF, RegistryErrors, PartialSuccess) are results, never exceptions. Anything
    that breaks the exchange itself raises :class:`PartnerError` (``kind`` says which: no endpoint,
    unreachable, TLS, timeout, connection lost, SOAP fault, HTTP error, protocol violation such as a
    wrong ``wsa:Action`` or ``wsa:RelatesTo``) with a message an operator can act on. RAD-75 is the
    exception: a batch that fails marks its instances (code ``XDSUnavailableCommunity``, the
    PartnerError attached) so instances already delivered by other batches are not lost.

Timeouts
    ``partner.timeout`` is the deadline of a whole ITI-55, ITI-38 or ITI-39 exchange. A RAD-75 batch may
    legitimately take longer than that (a large study), so there it bounds inactivity only: connecting,
    and each wait for the next bytes.
"""

from __future__ import annotations

import datetime as dt
import errno
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import anyio
import httpx
from lxml import etree

from gateway.config import Config
from gateway.dicom.kos import KosError, KosManifest, RetrieveGroup, parse_kos
from gateway.errors import SoapFault, XigError
from gateway.ihe import ebrim, iti38, iti39, iti55, rad75
from gateway.ihe.ebrim import CX, DocumentEntry
from gateway.ihe.iti39 import DocumentRequest, RetrievedDocument
from gateway.ihe.iti55 import PatientDemographics
from gateway.ihe.registry import RegistryError, RegistryErrorCode, split_location
from gateway.initiating.partners import ITI38, ITI39, ITI55, RAD75, URL_FIELDS, Partner
from gateway.logs import bind_correlation
from gateway.security.outbound import default_identity, security_header
from gateway.security.saml import UserIdentity
from gateway.security.tls import client_context, describe_tls_error
from gateway.soap import mtom, ns
from gateway.web.client import SoapClient, SoapReply, TransportError
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD, Endpoint

if TYPE_CHECKING:
    from gateway.audit.auditor import Auditor

FailureKind = Literal["no-endpoint", "unreachable", "tls", "timeout", "connection", "fault", "http", "protocol",
                      "internal"]

ENDPOINTS: Final[dict[str, Endpoint]] = {ITI55: XCPD, ITI38: XCA_QUERY, ITI39: XCA_RETRIEVE, RAD75: XCAI_RETRIEVE}

#: RAD-75 default: what every DICOM application decodes (RAD69-005: pixel data in one of these or an error)
DEFAULT_TRANSFER_SYNTAXES: Final = (rad75.EXPLICIT_VR_LITTLE_ENDIAN, rad75.IMPLICIT_VR_LITTLE_ENDIAN)
#: a manifest larger than this is refused (a KOS is kilobytes)
MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024

#: ImageResult.error_code when the exchange of the instance's batch failed (the PartnerError is attached)
UNAVAILABLE: Final = str(RegistryErrorCode.XDSUnavailableCommunity)
#: ImageResult.error_code when the partner answered but said nothing about the instance
NOT_RETURNED: Final = "NotReturned"


class PartnerError(XigError):
    """An exchange with a partner failed; ``str()`` is a sentence an operator can act on.

    ``partner`` is the partner's name, ``transaction`` e.g. ``ITI-55``, ``reason`` the cause, ``kind`` its
    class (:data:`FailureKind`), ``fault`` the partner's SOAP fault when ``kind == "fault"``.
    """

    def __init__(self, partner: str, transaction: str, reason: str, *, kind: FailureKind = "protocol",
                 url: str | None = None, fault: SoapFault | None = None) -> None:
        self.partner = partner
        self.transaction = transaction
        self.reason = reason
        self.kind: FailureKind = kind
        self.url = url
        self.fault = fault
        super().__init__(f"partner {partner}, {transaction}: {reason}")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientMatch:
    """One registrationEvent of an XCPD answer, as the initiating side uses it."""

    #: the id to use in ITI-38 with ``home_community_id`` (Patient.id, ITI TF-2 Tbl 3.55.4.2.2.2-1)
    patient_id: CX
    #: custodian homeCommunityId (``urn:oid:``); the answering partner's own when it gave none
    home_community_id: str
    #: name of the partner whose XCPD answer reported the match
    reported_by: str
    #: custodian/assignedEntity/code: True = SupportsHealthDataLocator, False = NotHealthDataLocator
    health_data_locator: bool | None = None
    score: int | None = None
    demographics: PatientDemographics = field(default_factory=PatientDemographics)
    #: False when the partner omitted custodian/assignedEntity/id and its own HCID was assumed
    custodian_given: bool = True


DiscoveryStatus = Literal["match", "no-match", "more-attributes", "error"]


@dataclass(frozen=True)
class DiscoveryOutcome:
    """A partner's ITI-55 answer (ITI TF-2 3.55.4.2.3): ``status`` match (OK, Cases 1-2), more-attributes
    (OK without match, Case 3), no-match (NF, Case 4) or error (AE, Case 5)."""

    partner: str
    home_community_id: str
    status: DiscoveryStatus
    ack_code: str | None
    query_response_code: str | None
    matches: tuple[PatientMatch, ...] = ()
    #: Case 3: ActOrderRequired codes (e.g. ``PatientAddressRequested``)
    more_attributes_requested: tuple[str, ...] = ()
    #: Case 5: DetectedIssueManagement codes (``ResponderBusy``, ``AnswerNotAvailable``, ``InternalError``)
    issue_codes: tuple[str, ...] = ()
    #: acknowledgementDetail texts
    details: tuple[str, ...] = ()
    #: things in the answer that were odd but not fatal
    warnings: tuple[str, ...] = ()

    @property
    def communities(self) -> tuple[str, ...]:
        """Custodian homeCommunityIds of the matches, in order."""
        return tuple(dict.fromkeys(m.home_community_id for m in self.matches))

    def summary(self) -> str:
        """One line for logs and CLIs, e.g. ``AE (AnswerNotAvailable): the imaging archive is not reachable``."""
        if self.status == "match":
            return f"OK: {len(self.matches)} match(es) in {', '.join(self.communities)}"
        if self.status == "more-attributes":
            return "OK without match; more attributes requested: " + ", ".join(self.more_attributes_requested)
        if self.status == "no-match":
            return "NF: no matching patient"
        codes = f" ({', '.join(self.issue_codes)})" if self.issue_codes else ""
        text = f": {'; '.join(self.details)}" if self.details else ""
        return f"{self.query_response_code or self.ack_code or 'AE'}{codes}{text}"


class FoundManifests(list[DocumentEntry]):
    """ITI-38 result: the usable DocumentEntries (a list) plus what else the partner said.

    ``errors`` are the partner's RegistryErrors and our XDSMissingHomeCommunityId for dropped entries;
    ``problems`` are entries that could not be read; ``status`` is the response status URN.
    """

    def __init__(self, entries: Iterable[DocumentEntry] = (), *, status: str = "",
                 errors: Iterable[RegistryError] = (), problems: Iterable[str] = ()) -> None:
        super().__init__(entries)
        self.status = status
        self.errors: list[RegistryError] = list(errors)
        self.problems: list[str] = list(problems)


@dataclass(frozen=True)
class ImageRequest:
    """One instance to fetch with RAD-75 (from a KOS: Retrieve Location UID = RepositoryUniqueId)."""

    home_community_id: str
    repository_unique_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""

    @property
    def document_request(self) -> DocumentRequest:
        return DocumentRequest(self.home_community_id, self.repository_unique_id, self.sop_instance_uid)


def image_requests(plan: Iterable[RetrieveGroup], home_community_id: str) -> list[ImageRequest]:
    """Flatten :meth:`KosManifest.plan` groups into :class:`ImageRequest` items of community ``home_community_id``."""
    hcid = ebrim.normalize_hcid(home_community_id)
    return [ImageRequest(hcid, g.retrieve_location_uid, g.study_uid, g.series_uid, r.sop_instance_uid,
                         r.sop_class_uid) for g in plan for r in g.references]


@dataclass
class RetrievedManifest:
    """One requested KOS: ``kos`` when it came back and parsed; else ``error`` (the partner's) or ``problem``."""

    entry: DocumentEntry
    request: DocumentRequest
    kos: KosManifest | None = None
    data: bytes | None = None
    new_document_unique_id: str | None = None
    new_repository_unique_id: str | None = None
    error: RegistryError | None = None
    problem: str | None = None
    warnings: tuple[RegistryError, ...] = ()

    @property
    def ok(self) -> bool:
        return self.kos is not None

    @property
    def home_community_id(self) -> str:
        return self.request.home_community_id or ""

    def image_requests(self) -> list[ImageRequest]:
        """The manifest's instances as RAD-75 items (study/series/repository order of the KOS)."""
        if self.kos is None:
            return []
        return image_requests(self.kos.plan(), self.home_community_id)


@dataclass
class ImageResult:
    """What happened to one instance: ``delivered`` (the sink's ``close()`` result) or an error."""

    request: ImageRequest
    delivered: Any = None
    error_code: str | None = None
    error_context: str | None = None
    partner_error: PartnerError | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None and self.delivered is not None


@dataclass
class ImagesOutcome:
    """RAD-75 results per SOP Instance UID (plan order), the number of requests sent and oddities seen."""

    results: dict[str, ImageResult] = field(default_factory=dict)
    batches: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def delivered(self) -> list[ImageResult]:
        return [r for r in self.results.values() if r.ok]

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.results.values() if not r.ok]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())


SinkFactory = Callable[[mtom.PartInfo], mtom.PartSink]
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------
# Transport-level checks
# --------------------------------------------------------------------------------------------------


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 12:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def classify_transport_error(exc: TransportError, url: str, timeout: float | None = None) -> tuple[FailureKind, str]:
    """``(kind, reason)`` for a :class:`TransportError` of :class:`SoapClient` (its cause chain names the failure)."""
    chain = _chain(exc.__context__)
    within = f" within {timeout:g} s" if timeout else ""
    tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    if tls is not None:
        return "tls", f"TLS handshake with {url} failed: {describe_tls_error(tls)}"
    if any(isinstance(e, httpx.ConnectTimeout) for e in chain):
        return "timeout", f"no connection to {url}{within} (host down or filtered by a firewall?)"
    if any(isinstance(e, httpx.TimeoutException) for e in chain):
        return "timeout", f"no answer from {url}{within} (the partner's timeout_seconds)"
    if any(isinstance(e, httpx.ConnectError) for e in chain):
        if any(isinstance(e, socket.gaierror) for e in chain):
            host = httpx.URL(url).host
            return "unreachable", f"cannot resolve the host name {host!r} of {url} (check the URL and DNS)"
        codes = {getattr(e, "errno", None) for e in chain}
        if errno.ECONNREFUSED in codes:
            return "unreachable", (f"connection refused by {url}: nothing listens on that port "
                                   "(check the URL and that the partner's gateway is running)")
        if codes & {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}:
            return "unreachable", f"{url} is not reachable from here (no route to the host; network or firewall)"
        detail = next((str(e) for e in reversed(chain) if str(e)), type(chain[0]).__name__ if chain else "")
        return "unreachable", f"cannot connect to {url} ({detail})"
    if any(isinstance(e, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError) for e in chain):
        return "connection", (f"{url} closed the connection before answering; with mutual TLS this usually means "
                              "it did not accept our client certificate (check that it trusts our CA)")
    if not chain:  # raised by SoapClient itself: an HTTP answer that is not SOAP, or one too large
        return "http", str(exc)
    return "connection", str(exc)


def check_reply(reply: SoapReply, *, partner: str, transaction: str, url: str, expected_action: str) -> None:
    """Raise :class:`PartnerError` unless ``reply`` is a non-fault answer with the expected ``wsa:Action``
    that relates to our request (``wsa:RelatesTo`` = our ``wsa:MessageID``)."""
    if reply.fault is not None:
        f = reply.fault
        code = f"{f.code}/{f.subcode}" if f.subcode is not None else f.code
        detail = f" [{f.detail}]" if f.detail else ""
        raise PartnerError(partner, transaction,
                           f"SOAP fault {code} (HTTP {reply.http_status}): {f.reason or '(no reason given)'}{detail}",
                           kind="fault", url=url, fault=f)
    if not 200 <= reply.http_status < 300:
        raise PartnerError(partner, transaction, f"{url} answered HTTP {reply.http_status} with a SOAP body that is "
                           "not a Fault", kind="http", url=url)
    if reply.action is None:
        raise PartnerError(partner, transaction, f"the reply has no wsa:Action header (expected {expected_action})",
                           url=url)
    if reply.action != expected_action:
        raise PartnerError(partner, transaction, f"the reply's wsa:Action is {reply.action!r}, expected "
                           f"{expected_action!r} (is {url} really the partner's {transaction} endpoint?)", url=url)
    if reply.relates_to is None:
        raise PartnerError(partner, transaction, "the reply has no wsa:RelatesTo header; it cannot be matched to "
                           f"our request {reply.message_id}", url=url)
    if reply.relates_to.strip().lower() != reply.message_id.strip().lower():
        raise PartnerError(partner, transaction, f"the reply relates to {reply.relates_to!r}, not to our request "
                           f"{reply.message_id!r} (a reply to another message?)", url=url)


def open_soap_client(config: Config, *, timeout: float = 60.0) -> SoapClient:
    """A :class:`SoapClient` presenting our client certificate and trusting ``config.client_trust``."""
    return SoapClient(client_context(config.client_certificate, config.client_private_key, config.client_trust),
                      timeout=timeout)


class _SinkTracker:
    """Wraps a sink factory to remember every sink of one exchange (to discard orphans and failures)."""

    def __init__(self, factory: SinkFactory) -> None:
        self.factory = factory
        self.sinks: dict[str, mtom.PartSink] = {}

    def __call__(self, info: mtom.PartInfo) -> mtom.PartSink:
        sink = self.factory(info)
        self.sinks[mtom.normalize_content_id(info.content_id)] = sink
        return sink

    def abort(self, keep: Iterable[str] = ()) -> None:
        kept = {mtom.normalize_content_id(c) for c in keep}
        for cid, sink in self.sinks.items():
            if cid not in kept:
                sink.abort()


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


class PartnerClient:
    """ITI-55 / ITI-38 / ITI-39 / RAD-75 towards one partner over a shared :class:`SoapClient`."""

    def __init__(self, config: Config, partner: Partner, soap_client: SoapClient, *,
                 identity: UserIdentity | None = None, auditor: Auditor | None = None) -> None:
        self.config = config
        self.partner = partner
        self.soap = soap_client
        self.identity = identity
        if auditor is None:
            from gateway.audit.auditor import outbound_auditor

            auditor = outbound_auditor.get()
        self.auditor = auditor

    # -- plumbing -------------------------------------------------------------------------------

    def _error(self, transaction: str, reason: str, **kw: Any) -> PartnerError:
        return PartnerError(self.partner.name, transaction, reason, **kw)

    def _url(self, transaction: str) -> str:
        url = self.partner.url(transaction)
        if url is None:
            raise self._error(transaction, f"no {transaction} endpoint is known for {self.partner.describe()} "
                              f"(set {URL_FIELDS[transaction]} in its [[partners]] entry or list it in the directory)",
                              kind="no-endpoint")
        return url

    async def _exchange(self, transaction: str, body: etree._Element, *, use_mtom: bool = False,
                        sink_factory: SinkFactory | None = None, deadline: bool = True) -> SoapReply:
        """Sign, send, receive, check and audit one request. ``deadline``: ``partner.timeout`` bounds the
        whole exchange; otherwise it bounds connecting and each wait for data only."""
        when = dt.datetime.now(dt.UTC)
        reply: SoapReply | None = None
        try:
            reply = await self._send(transaction, body, use_mtom=use_mtom, sink_factory=sink_factory,
                                     deadline=deadline)
        except PartnerError as exc:
            self._audit(transaction, body, None, str(exc), when)
            raise
        self._audit(transaction, body, reply.body, None, when)
        return reply

    def _audit(self, transaction: str, body: etree._Element, response: etree._Element | None, error: str | None,
               when: dt.datetime) -> None:
        if self.auditor is None:
            return
        url = self.partner.url(transaction) or ""
        self.auditor.outbound(transaction=transaction, url=url, community=self.partner.home_community_id,
                              identity=self.identity or default_identity(self.config, self.partner.security_section()),
                              request=body, response=response, error=error, when=when)

    async def _send(self, transaction: str, body: etree._Element, *, use_mtom: bool,
                    sink_factory: SinkFactory | None, deadline: bool) -> SoapReply:
        endpoint = ENDPOINTS[transaction]
        url = self._url(transaction)
        timeout = self.partner.timeout
        # signed on the event loop: ~1 ms of CPU that holds the GIL anyway; a worker thread per request
        # would only add a thread start and GIL hand-offs (measured: slower fan-outs)
        security = security_header(self.config, url, partner=self.partner.security_section(), identity=self.identity)
        data, content_type, message_id = SoapClient.encode_request(url, body, endpoint.request_action,
                                                                   security=security, use_mtom=use_mtom)
        try:
            with bind_correlation(message_id, transaction=transaction, partner=self.partner.name), \
                    anyio.fail_after(timeout if deadline else None):
                reply = await self.soap.post(url, data, content_type, message_id, sink_factory=sink_factory,
                                             timeout=timeout)
        except TimeoutError:
            raise self._error(transaction, f"no complete answer from {url} within {timeout:g} s "
                              "(the partner's timeout_seconds)", kind="timeout", url=url) from None
        except TransportError as exc:
            kind, reason = classify_transport_error(exc, url, timeout)
            raise self._error(transaction, reason, kind=kind, url=url) from None
        except SoapFault as exc:  # raised locally: the reply could not be decoded (MTOM framing, XML, size)
            raise self._error(transaction, f"unusable reply from {url}: {exc.reason}", url=url) from None
        check_reply(reply, partner=self.partner.name, transaction=transaction, url=url,
                    expected_action=endpoint.response_action)
        return reply

    # -- ITI-55 ----------------------------------------------------------------------------------

    async def discover(self, demographics: PatientDemographics, *,
                       local_patient_id: str | None = None) -> DiscoveryOutcome:
        """ITI-55 Cross Gateway Patient Discovery (synchronous, ``responsePriorityCode`` I).

        With ``local_patient_id`` our id for the patient is sent as a LivingSubjectId in our assigning
        authority, and the authority as authorOrPerformer, so the partner can query us back
        (ITI TF-2 3.55.4.1.2.4). Raises ValueError when the demographics hold neither a name nor an id.
        """
        g = self.config.gateway
        p = self.partner
        body, message_id = iti55.build_request(
            demographics, sender_device_id=g.home_community_id, home_community_id=g.home_community_id,
            receiver_device_id=p.hcid_oid, receiver_home_community_id=p.home_community_id,
            assigning_authority=g.assigning_authority if local_patient_id else None,
            local_patient_id=local_patient_id)
        reply = await self._exchange(ITI55, body)
        try:
            result = iti55.parse_response(reply.body)
        except iti55.Iti55ResponseError as exc:
            raise self._error(ITI55, f"the answer is not a usable PRPA_IN201306UV02: {exc}",
                              url=p.xcpd_url) from None
        return self._outcome(result, message_id)

    def _outcome(self, result: iti55.PatientDiscoveryResult, message_id: iti55.II) -> DiscoveryOutcome:
        p = self.partner
        warnings: list[str] = []
        if result.target_message_id is not None and result.target_message_id != message_id:
            warnings.append(f"acknowledgement/targetMessage/id {result.target_message_id} is not our message id "
                            f"{message_id}")
        matches: list[PatientMatch] = []
        for patient in result.patients:
            pid = patient.patient_id
            if not pid.extension:
                warnings.append(f"a match without a patient id extension (root {pid.root}) was ignored")
                continue
            hcid = patient.home_community_id
            if hcid is None:
                warnings.append(f"match {pid} has no custodian homeCommunityId; assumed {p.home_community_id}")
            matches.append(PatientMatch(
                patient_id=CX(pid.extension, pid.root), home_community_id=ebrim.normalize_hcid(hcid or
                                                                                             p.home_community_id),
                reported_by=p.name, health_data_locator=patient.health_data_locator, score=patient.score,
                demographics=patient.demographics, custodian_given=hcid is not None))
        status: DiscoveryStatus = result.status
        if status == "match" and not matches:
            status = "no-match"
        details = tuple(d.text for d in result.ack_details if d.text)
        return DiscoveryOutcome(partner=p.name, home_community_id=p.home_community_id, status=status,
                                ack_code=result.ack_code, query_response_code=result.query_response_code,
                                matches=tuple(matches), more_attributes_requested=result.more_attributes_requested,
                                issue_codes=result.issue_codes, details=details, warnings=tuple(warnings))

    # -- ITI-38 ----------------------------------------------------------------------------------

    async def find_manifests(self, patient_id: CX | str, hcid: str | None = None, **changes: Any) -> FoundManifests:
        """ITI-38 FindDocuments for imaging manifests of ``patient_id`` (the id XCPD returned) in community
        ``hcid`` (default: the partner's own): KOS formatCode, Approved, Stable and On-Demand entries.

        ``changes`` refine the query (:func:`gateway.ihe.iti38.find_documents_for_kos`, e.g.
        ``service_start_time_from``). RegistryErrors (XDSUnknownPatientId …) are returned, not raised.
        """
        home = ebrim.normalize_hcid(hcid or self.partner.home_community_id)
        params = iti38.find_documents_for_kos(patient_id, **changes)
        reply = await self._exchange(ITI38, iti38.build_query(params, home_community_id=home))
        if ns.local(reply.body) != "AdhocQueryResponse" or etree.QName(reply.body).namespace != ns.QUERY:
            raise self._error(ITI38, f"the answer is a {reply.body.tag}, not a query:AdhocQueryResponse",
                              url=self.partner.xca_query_url)
        result = iti38.parse_response(reply.body)
        missing = result.entries_without_home
        errors = list(result.errors)
        errors.extend(RegistryError(
            RegistryErrorCode.XDSMissingHomeCommunityId,
            f"partner {self.partner.describe()} returned DocumentEntry {e.unique_id} without the home attribute "
            "(ITI TF-2 3.38.4.1.3); the entry was dropped", home) for e in missing)
        kept = [e for e in result.entries if e.home_community_id]
        return FoundManifests(kept, status=result.status, errors=errors, problems=result.problems)

    async def get_documents(self, unique_ids: Sequence[str]) -> iti38.QueryResult:
        """ITI-38 GetDocuments by uniqueId at the partner's community (e.g. to learn repositoryUniqueIds)."""
        params = iti38.GetDocumentsParams(home_community_id=self.partner.home_community_id,
                                          unique_ids=tuple(unique_ids))
        reply = await self._exchange(ITI38, iti38.build_query(params))
        return iti38.parse_response(reply.body)

    # -- ITI-39 ----------------------------------------------------------------------------------

    async def retrieve_manifests(self, entries: Sequence[DocumentEntry]) -> list[RetrievedManifest]:
        """ITI-39 for the KOS of each entry, in batches of ``max_documents_per_request``; one result per entry,
        in order. The partner's per-document RegistryErrors are reported in the results, not raised."""
        out: list[RetrievedManifest] = []
        pending: list[RetrievedManifest] = []
        for e in entries:
            request = DocumentRequest(ebrim.normalize_hcid(e.home_community_id or self.partner.home_community_id),
                                      e.repository_unique_id or "", e.unique_id)
            item = RetrievedManifest(e, request)
            out.append(item)
            if not e.repository_unique_id:
                item.problem = f"DocumentEntry {e.unique_id} has no repositoryUniqueId; it cannot be retrieved"
            else:
                pending.append(item)
        size = self.partner.max_documents_per_request
        for start in range(0, len(pending), size):
            await self._retrieve_manifest_batch(pending[start:start + size])
        return out

    async def _retrieve_manifest_batch(self, batch: list[RetrievedManifest]) -> None:
        body = iti39.build_request([m.request for m in batch])
        reply = await self._exchange(ITI39, body, use_mtom=self.partner.mtom_requests,
                                     sink_factory=lambda _info: mtom.MemorySink(MAX_MANIFEST_BYTES))
        if ns.local(reply.body) != "RetrieveDocumentSetResponse":
            raise self._error(ITI39, f"the answer is a {reply.body.tag}, not a RetrieveDocumentSetResponse",
                              url=self.partner.xca_retrieve_url)
        try:
            result = iti39.parse_response(reply.body, reply.attachments)
        except SoapFault as exc:
            raise self._error(ITI39, f"unusable answer: {exc.reason}", url=self.partner.xca_retrieve_url) from None
        by_uid = {m.request.document_unique_id: m for m in batch}
        for doc in result.documents:
            item = by_uid.get(doc.document_unique_id)
            if item is None:
                continue
            item.new_document_unique_id = doc.new_document_unique_id
            item.new_repository_unique_id = doc.new_repository_unique_id
            item.data = doc.data
            if doc.data is None:
                item.problem = f"the document {doc.document_unique_id} came back without content"
                continue
            try:
                item.kos = parse_kos(doc.data)
            except KosError as exc:
                item.problem = f"document {doc.document_unique_id} is not a usable KOS manifest: {exc}"
        _apply_errors(result.errors, batch, lambda m: m.request.document_unique_id,
                      delivered=lambda m: m.data is not None, on_error=_set_manifest_error,
                      on_warning=lambda m, w: setattr(m, "warnings", (*m.warnings, w)))
        for m in batch:
            if m.data is None and m.error is None and m.problem is None:
                m.problem = (f"the partner returned neither document {m.request.document_unique_id} nor an error "
                             f"for it (status {result.status or 'missing'})")

    # -- RAD-75 ----------------------------------------------------------------------------------

    async def retrieve_images(self, plan_items: Iterable[RetrieveGroup | ImageRequest], *,
                              sink_factory: SinkFactory,
                              transfer_syntaxes: Sequence[str] = DEFAULT_TRANSFER_SYNTAXES,
                              home_community_id: str | None = None) -> ImagesOutcome:
        """RAD-75 for every instance of ``plan_items`` (:meth:`KosManifest.plan` groups, which belong to
        ``home_community_id`` — default the partner's — or :class:`ImageRequest` items).

        Requests hold at most ``max_documents_per_request`` instances, one repository each, grouped by
        study and series. Each instance's bytes go straight from the network into a sink made by
        ``sink_factory`` (e.g. ``lambda info: FileSink(directory)``); parts the answer does not reference
        and parts of failed exchanges are aborted (a FileSink deletes its file).
        """
        hcid = ebrim.normalize_hcid(home_community_id or self.partner.home_community_id)
        outcome = ImagesOutcome()
        groups: dict[tuple[str, str], list[ImageRequest]] = {}
        for item in plan_items:
            items = image_requests([item], hcid) if isinstance(item, RetrieveGroup) else [item]
            for req in items:
                if req.sop_instance_uid in outcome.results:
                    continue
                result = outcome.results[req.sop_instance_uid] = ImageResult(req)
                if not req.repository_unique_id:
                    result.error_code = str(RegistryErrorCode.XDSUnknownRepositoryId)
                    result.error_context = (f"the manifest names no Retrieve Location UID (0040,E011) for series "
                                            f"{req.series_instance_uid}: there is no RepositoryUniqueId to request "
                                            f"instance {req.sop_instance_uid} from")
                    continue
                groups.setdefault((ebrim.normalize_hcid(req.home_community_id), req.repository_unique_id),
                                  []).append(req)
        size = self.partner.max_documents_per_request
        fatal: PartnerError | None = None
        for requests in groups.values():
            for start in range(0, len(requests), size):
                batch = [outcome.results[r.sop_instance_uid] for r in requests[start:start + size]]
                if fatal is not None:
                    _fail_images(batch, fatal)
                    continue
                try:
                    outcome.batches += 1
                    await self._retrieve_image_batch(batch, sink_factory, transfer_syntaxes, outcome)
                except PartnerError as exc:
                    _fail_images(batch, exc)
                    if exc.kind in ("unreachable", "tls", "no-endpoint"):
                        fatal = exc  # the others would fail the same way
        return outcome

    async def _retrieve_image_batch(self, batch: list[ImageResult], sink_factory: SinkFactory,
                                    transfer_syntaxes: Sequence[str], outcome: ImagesOutcome) -> None:
        request = rad75.imaging_request(
            [(r.request.study_instance_uid, r.request.series_instance_uid, r.request.document_request)
             for r in batch], transfer_syntaxes)
        tracker = _SinkTracker(sink_factory)
        url = self.partner.xcai_retrieve_url
        try:
            reply = await self._exchange(RAD75, rad75.build_request(request), use_mtom=self.partner.mtom_requests,
                                         sink_factory=tracker, deadline=False)
            if ns.local(reply.body) != "RetrieveDocumentSetResponse":
                raise self._error(RAD75, f"the answer is a {reply.body.tag}, not a RetrieveDocumentSetResponse",
                                  url=url)
            try:
                result = rad75.parse_response(reply.body, reply.attachments)
            except SoapFault as exc:
                raise self._error(RAD75, f"unusable answer: {exc.reason}", url=url) from None
        except BaseException:
            tracker.abort()
            raise
        by_uid = {r.request.sop_instance_uid: r for r in batch}
        used: list[str] = []
        for doc in result.documents:
            item = by_uid.get(doc.document_unique_id)
            if item is None or item.delivered is not None:
                outcome.problems.append(f"the answer contains instance {doc.document_unique_id}, which was not "
                                        "requested in that batch; discarded")
                continue
            item.delivered = self._deliver(doc, sink_factory)
            if doc.content_id:
                used.append(doc.content_id)
        tracker.abort(keep=used)
        _apply_errors(result.errors, batch, lambda r: r.request.sop_instance_uid,
                      delivered=lambda r: r.delivered is not None, on_error=_set_image_error)
        for item in batch:
            if item.delivered is None and item.error_code is None:
                item.error_code = NOT_RETURNED
                item.error_context = (f"the partner returned neither instance {item.request.sop_instance_uid} nor an "
                                      f"error for it (status {result.status or 'missing'})")

    @staticmethod
    def _deliver(doc: RetrievedDocument, sink_factory: SinkFactory) -> Any:
        """The sink result of a returned instance; inline base64 content is written to a sink too."""
        if doc.content_id is not None:
            return doc.attachment
        sink = sink_factory(mtom.PartInfo(f"inline-{doc.document_unique_id}", doc.mime_type, {}, -1))
        try:
            sink.write(doc.data or b"")
            return sink.close()
        except BaseException:
            sink.abort()
            raise


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _set_manifest_error(item: RetrievedManifest, error: RegistryError) -> None:
    item.error = error


def _set_image_error(item: ImageResult, error: RegistryError) -> None:
    item.error_code = error.code
    item.error_context = error.context


def _fail_images(batch: list[ImageResult], error: PartnerError) -> None:
    for item in batch:
        if item.delivered is None:
            item.error_code = UNAVAILABLE
            item.error_context = str(error)
            item.partner_error = error


def _apply_errors(errors: Sequence[RegistryError], items: Sequence[_T], key: Callable[[_T], str], *,
                     delivered: Callable[[_T], bool], on_error: Callable[[_T, RegistryError], None],
                     on_warning: Callable[[_T, RegistryError], None] | None = None) -> None:
    """Attach RegistryErrors to the items their ``location`` names; errors naming no document (request-level)
    go to every undelivered item still without an error. Warnings go to delivered items."""
    by_key = {key(i): i for i in items}
    general: list[RegistryError] = []
    has_error: set[int] = set()
    for err in errors:
        uid = split_location(err.location)[0]
        item = by_key.get(uid) if uid else None
        if item is None and err.location:
            # some partners put the uid somewhere inside a longer location text
            item = next((i for k, i in by_key.items() if k and k in err.location), None)
        if err.is_warning:
            if item is not None and on_warning is not None:
                on_warning(item, err)
            continue
        if item is None:
            general.append(err)
        elif not delivered(item) and id(item) not in has_error:
            on_error(item, err)
            has_error.add(id(item))
    for err in general:
        for item in items:
            if not delivered(item) and id(item) not in has_error:
                on_error(item, err)
                has_error.add(id(item))


__all__ = [
    "DEFAULT_TRANSFER_SYNTAXES", "NOT_RETURNED", "UNAVAILABLE", "DiscoveryOutcome", "FailureKind", "FoundManifests",
    "ImageRequest", "ImageResult", "ImagesOutcome", "PartnerClient", "PartnerError", "PatientMatch",
    "RetrievedManifest", "check_reply", "classify_transport_error", "image_requests", "open_soap_client",
]
