"""Ask every partner at once: concurrent XCPD (ITI-55) and concurrent ITI-38 across the matched communities.

:func:`discover_all` sends one ITI-55 to each selected partner concurrently (an anyio task group, at most
``max_concurrency`` in flight). Each partner gets its own deadline (``partner.timeout``) and its own
result slot: a partner that fails, hangs or misbehaves yields a :class:`PartnerError` in its slot and
never cancels or delays the others, so the wall time is that of the slowest partner (bounded by the
largest timeout), not the sum.

Matches are grouped by their custodian homeCommunityId. A partner may report patients held by another
community (ITI TF-2 3.55.4.2.2.4, Case 1): that community's endpoints are looked up in the
:class:`~gateway.initiating.partners.PartnerDirectory`; a community the directory does not know is
reported as unreachable (:attr:`CommunityMatches.problem`) instead of being queried at the wrong place.

:func:`find_all` then sends ITI-38 FindDocuments (imaging manifests) for every (community, patient id)
pair concurrently, with the same isolation.

**Slowest first.** A fan-out ends when its slowest partner answers, and on a busy initiating side the
partner whose request leaves last pays for everyone's signing and TLS handshakes before it (~3 ms of CPU
per partner here). Given a :class:`ResponseTimes` (the CLI passes the database's,
:class:`gateway.store.response_times.SqlResponseTimes`), both fan-outs start the partners by their recorded
response time, slowest first, one per event-loop turn so each one's request is under way before the next
one's CPU work begins (longest-processing-time-first scheduling); partners without a record yet start
first, all together, as every partner does without a :class:`ResponseTimes`. Afterwards the time of every
partner that answered or timed out is recorded. The results keep the selection's order either way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

import anyio

from gateway.config import Config
from gateway.ihe import ebrim
from gateway.ihe.ebrim import CX, DocumentEntry
from gateway.ihe.iti55 import PatientDemographics
from gateway.initiating.client import (
    DiscoveryOutcome,
    FoundManifests,
    PartnerClient,
    PartnerError,
    PatientMatch,
    open_soap_client,
)
from gateway.initiating.partners import ITI38, ITI55, Partner, PartnerDirectory
from gateway.web.client import SoapClient

ClientFactory = Callable[[Config, Partner, SoapClient], PartnerClient]
log = logging.getLogger("xig.initiating")

#: extra seconds the fan-out waits beyond ``partner.timeout`` (the client enforces the timeout itself;
#: this only catches time spent outside the exchange, e.g. signing under load)
GRACE_SECONDS: Final = 0.5
_R = TypeVar("_R")
DEFAULT_MAX_CONCURRENCY: Final = 100  # a fan-out is one request per partner: queueing only adds latency
#: failures that still tell how long the partner takes (it was reached, or kept us waiting until the timeout);
#: refused connections, TLS failures and missing endpoints say nothing about it
_TIMED_FAILURES: Final = frozenset({"timeout", "fault", "http", "protocol"})


class ResponseTimes(Protocol):
    """Recorded response times per partner community (adapter: :class:`gateway.store.response_times.SqlResponseTimes`).

    Keys are normalised homeCommunityIds (:func:`gateway.ihe.ebrim.normalize_hcid`).
    """

    def expected(self, transaction: str, home_community_ids: Iterable[str]) -> Mapping[str, float]:
        """Seconds each listed community usually takes (those with a record only)."""
        ...

    def record(self, transaction: str, seconds: Mapping[str, float]) -> None:
        """Add one observation per community."""
        ...


@dataclass
class PartnerDiscovery:
    """One partner's part of a fan-out: its answer or the error, and how long it took."""

    partner: Partner
    outcome: DiscoveryOutcome | None = None
    error: PartnerError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is not None

    def summary(self) -> str:
        if self.outcome is not None:
            return self.outcome.summary()
        return str(self.error)


@dataclass
class CommunityMatches:
    """The matches held by one community (custodian homeCommunityId) and where to query it.

    ``partner`` is the directory entry to send ITI-38/39/RAD-75 to; None when the community is unknown,
    with ``problem`` saying so.
    """

    home_community_id: str
    partner: Partner | None
    matches: list[PatientMatch] = field(default_factory=list)
    reported_by: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def reachable(self) -> bool:
        return self.partner is not None

    @property
    def patient_ids(self) -> list[CX]:
        """Distinct patient ids of the matches (alternative matches in one community), in order."""
        return list(dict.fromkeys(m.patient_id for m in self.matches))


@dataclass
class FanoutResult:
    """Per-partner results (by partner name, in request order) and the matches grouped by community."""

    partners: dict[str, PartnerDiscovery] = field(default_factory=dict)
    communities: dict[str, CommunityMatches] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def matches(self) -> list[PatientMatch]:
        return [m for c in self.communities.values() for m in c.matches]

    @property
    def errors(self) -> dict[str, PartnerError]:
        return {name: r.error for name, r in self.partners.items() if r.error is not None}

    @property
    def outcomes(self) -> dict[str, DiscoveryOutcome]:
        return {name: r.outcome for name, r in self.partners.items() if r.outcome is not None}

    @property
    def unreachable_communities(self) -> list[CommunityMatches]:
        return [c for c in self.communities.values() if not c.reachable]


@dataclass
class CommunityDocuments:
    """ITI-38 for one patient id in one community: the entries found, or the error."""

    home_community_id: str
    patient_id: CX
    partner: Partner | None
    entries: FoundManifests | None = None
    error: PartnerError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.entries is not None


@dataclass
class QueryFanoutResult:
    """Every (community, patient id) query of :func:`find_all`, in order."""

    results: list[CommunityDocuments] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[PartnerError]:
        return [r.error for r in self.results if r.error is not None]

    def entries(self) -> list[tuple[CommunityDocuments, DocumentEntry]]:
        """Every entry found with the query that found it; an entry found twice in a community (two
        alternative patient ids) is listed once."""
        seen: set[tuple[str, str]] = set()
        out: list[tuple[CommunityDocuments, DocumentEntry]] = []
        for r in self.results:
            for e in r.entries or ():
                key = (ebrim.normalize_hcid(e.home_community_id or r.home_community_id), e.unique_id)
                if key not in seen:
                    seen.add(key)
                    out.append((r, e))
        return out

    def by_community(self) -> dict[str, list[CommunityDocuments]]:
        out: dict[str, list[CommunityDocuments]] = {}
        for r in self.results:
            out.setdefault(r.home_community_id, []).append(r)
        return out


# --------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _soap_client(config: Config, given: SoapClient | None) -> AsyncIterator[SoapClient]:
    if given is not None:
        yield given
        return
    client = open_soap_client(config)
    try:
        yield client
    finally:
        await client.aclose()


def select_partners(directory: PartnerDirectory, partners: Iterable[str | Partner] | None,
                    transaction: str = ITI55) -> list[Partner]:
    """``partners`` (names, homeCommunityIds or Partner objects) or, when None, every directory partner with
    a ``transaction`` endpoint. Unknown names raise ``KeyError``; duplicates are dropped."""
    if partners is None:
        chosen = directory.partners(transaction)
    else:
        chosen = []
        for p in partners:
            if isinstance(p, Partner):
                chosen.append(p)
                continue
            found = directory.lookup(p)
            if found is None:
                raise KeyError(f"no partner named or with homeCommunityId {p!r} in the partner directory")
            chosen.append(found)
    unique: dict[str, Partner] = {}
    for p in chosen:
        unique.setdefault(p.name, p)
    return list(unique.values())


def _internal(partner: Partner, transaction: str, exc: Exception) -> PartnerError:
    return PartnerError(partner.name, transaction, f"internal error while talking to the partner: "
                        f"{type(exc).__name__}: {exc}", kind="internal")


async def _guarded(partner: Partner, transaction: str, url: str | None,
                   call: Callable[[], Awaitable[_R]]) -> tuple[_R | None, PartnerError | None, float]:
    """Run one partner's exchange under its own deadline: ``(result, error, seconds)``, never raising.

    One partner's failure, timeout or bug must never cancel or spoil the others of a fan-out.
    """
    t0 = time.monotonic()
    try:
        with anyio.fail_after(partner.timeout + GRACE_SECONDS):
            return await call(), None, time.monotonic() - t0
    except PartnerError as exc:
        return None, exc, time.monotonic() - t0
    except TimeoutError:
        return None, PartnerError(partner.name, transaction, f"no answer within {partner.timeout:g} s (the "
                                  "partner's timeout_seconds)", kind="timeout", url=url), time.monotonic() - t0
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return None, _internal(partner, transaction, exc), time.monotonic() - t0


def start_order(keys: Sequence[str], expected: Mapping[str, float]) -> tuple[list[int], list[int]]:
    """Indexes of ``keys`` to start ``(together, one per loop turn)``: keys without an expected time first
    (in their order), then the others, the longest expected time first (ties in their order)."""
    unknown = [i for i, k in enumerate(keys) if k not in expected]
    known = sorted((i for i, k in enumerate(keys) if k in expected), key=lambda i: -expected[keys[i]])
    return unknown, known


def _expected(times: ResponseTimes | None, transaction: str, keys: Iterable[str]) -> Mapping[str, float]:
    if times is None:
        return {}
    try:
        return times.expected(transaction, keys)
    except Exception as exc:  # noqa: BLE001 - only the order depends on it
        log.warning("partner response times not available (%s: %s); starting the partners in their order",
                    type(exc).__name__, exc)
        return {}


def _record(times: ResponseTimes | None, transaction: str,
            observed: Iterable[tuple[str, float, PartnerError | None]]) -> None:
    """Record the longest time per community among the exchanges that tell how long it takes."""
    if times is None:
        return
    longest: dict[str, float] = {}
    for key, seconds, error in observed:
        if error is None or error.kind in _TIMED_FAILURES:
            longest[key] = max(seconds, longest.get(key, 0.0))
    try:
        times.record(transaction, longest)
    except Exception as exc:  # noqa: BLE001 - the fan-out's results do not depend on it
        log.warning("could not record the partners' response times (%s: %s)", type(exc).__name__, exc)


async def _start_all(tg: anyio.abc.TaskGroup, keys: Sequence[str], expected: Mapping[str, float],
                     start: Callable[[int], object]) -> None:
    """``start(i)`` for every index of ``keys`` in :func:`start_order`; a loop turn after each known one."""
    together, one_by_one = start_order(keys, expected)
    for i in together:
        start(i)
    for i in one_by_one:
        start(i)
        await anyio.sleep(0)  # its connect and handshake proceed before the next partner's signing


async def discover_all(config: Config, directory: PartnerDirectory, demographics: PatientDemographics, *,
                       partners: Iterable[str | Partner] | None = None, local_patient_id: str | None = None,
                       soap_client: SoapClient | None = None, client_factory: ClientFactory = PartnerClient,
                       max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                       response_times: ResponseTimes | None = None) -> FanoutResult:
    """ITI-55 to every selected partner concurrently (see the module docstring); never raises for a partner.

    ``partners``: names or homeCommunityIds (default: every partner with an XCPD endpoint).
    ``soap_client``: a shared client (default: one made from the configuration, closed afterwards).
    ``client_factory`` builds each :class:`PartnerClient` (e.g. to assert another user identity).
    ``response_times``: start the usually slowest partners first, and record this fan-out's times.
    """
    started = time.monotonic()
    chosen = select_partners(directory, partners, ITI55)
    result = FanoutResult(partners={p.name: PartnerDiscovery(p) for p in chosen})
    limiter = anyio.CapacityLimiter(max(1, max_concurrency))

    async def one(slot: PartnerDiscovery, soap: SoapClient) -> None:
        async with limiter:
            p = slot.partner
            slot.outcome, slot.error, slot.seconds = await _guarded(
                p, ITI55, p.xcpd_url,
                lambda: client_factory(config, p, soap).discover(demographics, local_patient_id=local_patient_id))

    slots = list(result.partners.values())
    keys = [ebrim.normalize_hcid(s.partner.home_community_id) for s in slots]
    expected = _expected(response_times, ITI55, keys)
    async with _soap_client(config, soap_client) as soap, anyio.create_task_group() as tg:
        await _start_all(tg, keys, expected, lambda i: tg.start_soon(one, slots[i], soap))
    _record(response_times, ITI55, ((k, s.seconds, s.error) for k, s in zip(keys, slots, strict=True)))
    result.communities = group_by_community(slots, directory)
    result.seconds = time.monotonic() - started
    return result


def group_by_community(results: Iterable[PartnerDiscovery], directory: PartnerDirectory,
                       ) -> dict[str, CommunityMatches]:
    """Matches grouped by custodian homeCommunityId, each group with the partner to query it through.

    A community equal to the answering partner's is queried through that partner; any other is
    re-resolved in ``directory`` (ITI TF-2 3.55.4.2.2.4 Case 1) and, when unknown, reported unreachable.
    The same patient id reported twice (by two partners) is kept once.
    """
    groups: dict[str, CommunityMatches] = {}
    for r in results:
        if r.outcome is None:
            continue
        for m in r.outcome.matches:
            hcid = ebrim.normalize_hcid(m.home_community_id)
            group = groups.get(hcid)
            if group is None:
                own = ebrim.same_hcid(hcid, r.partner.home_community_id)
                target = r.partner if own else directory.resolve(hcid)
                problem = None
                if target is None:
                    problem = (f"community {hcid} (reported by {r.partner.name}) is not in the partner directory: "
                               "no endpoint is known to query it (XDSUnavailableCommunity)")
                group = groups[hcid] = CommunityMatches(hcid, target, problem=problem)
            if all(x.patient_id != m.patient_id for x in group.matches):
                group.matches.append(m)
            if r.partner.name not in group.reported_by:
                group.reported_by.append(r.partner.name)
    return groups


async def find_all(config: Config, communities: FanoutResult | Iterable[CommunityMatches], *,
                   soap_client: SoapClient | None = None, client_factory: ClientFactory = PartnerClient,
                   max_concurrency: int = DEFAULT_MAX_CONCURRENCY, response_times: ResponseTimes | None = None,
                   **query_changes: Any) -> QueryFanoutResult:
    """ITI-38 FindDocuments (imaging manifests) for every patient id of every matched community, concurrently.

    Unreachable communities get a ``no-endpoint`` :class:`PartnerError` without any request.
    ``response_times`` as for :func:`discover_all` (keyed by the queried partner's homeCommunityId).
    ``query_changes`` refine the query (see :meth:`PartnerClient.find_manifests`).
    """
    started = time.monotonic()
    groups: Sequence[CommunityMatches] = list(communities.communities.values()
                                              if isinstance(communities, FanoutResult) else communities)
    out = QueryFanoutResult()
    todo: list[tuple[CommunityDocuments, Partner]] = []
    for g in groups:
        for pid in g.patient_ids:
            slot = CommunityDocuments(g.home_community_id, pid, g.partner)
            out.results.append(slot)
            if g.partner is None:
                slot.error = PartnerError(g.home_community_id, ITI38, g.problem or "unknown community",
                                          kind="no-endpoint")
            else:
                todo.append((slot, g.partner))
    limiter = anyio.CapacityLimiter(max(1, max_concurrency))

    async def one(slot: CommunityDocuments, partner: Partner, soap: SoapClient) -> None:
        async with limiter:
            slot.entries, slot.error, slot.seconds = await _guarded(
                partner, ITI38, partner.xca_query_url,
                lambda: client_factory(config, partner, soap).find_manifests(slot.patient_id, slot.home_community_id,
                                                                             **query_changes))

    if todo:
        keys = [ebrim.normalize_hcid(partner.home_community_id) for _, partner in todo]
        expected = _expected(response_times, ITI38, keys)
        async with _soap_client(config, soap_client) as soap, anyio.create_task_group() as tg:
            await _start_all(tg, keys, expected, lambda i: tg.start_soon(one, *todo[i], soap))
        _record(response_times, ITI38, ((k, slot.seconds, slot.error) for k, (slot, _) in zip(keys, todo, strict=True)))
    out.seconds = time.monotonic() - started
    return out


__all__ = [
    "ClientFactory", "CommunityDocuments", "CommunityMatches", "FanoutResult", "PartnerDiscovery",
    "QueryFanoutResult", "ResponseTimes", "discover_all", "find_all", "group_by_community", "select_partners",
    "start_order",
]
