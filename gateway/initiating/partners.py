"""Who we can talk to: partners from ``[[partners]]`` and from a Carequality-style FHIR directory.

:class:`Partner` is the initiating side's typed view of one responding community: its homeCommunityId,
one endpoint URL per transaction (ITI-55, ITI-38, ITI-39, RAD-75) and the per-partner settings of
``[[partners]]`` (timeout, signature algorithm, batch size, purpose of use, MTOM requests).

:class:`PartnerDirectory` maps homeCommunityIds to partners. XCPD may answer with matches whose
custodian is a community other than the one asked (ITI TF-2 3.55.4.2.2.4, Case 1); the initiating
gateway must then look up that community's own endpoints (:meth:`PartnerDirectory.resolve`). When the
configuration and the directory both know a community, the configuration wins field by field: a
``[[partners]]`` entry may carry only ``xcai_retrieve_url`` (the directory has no agreed RAD-75 code,
spec digest §9) and still get its XCPD/XCA endpoints from the directory.

:func:`parse_fhir_directory` reads Sequoia/Carequality directory JSON (a Bundle of Organizations, one
Organization, or a list of them): the HCID from the identifier typed ``HCID`` (else ``Organization.id``),
endpoints from the contained (or bundled) Endpoints referenced by ``Organization.endpoint``, each
classified by its ``Transaction`` extension (``ITI-55``, ``ITI-38``, ``ITI-39``, ``RAD-75``). Entries it
cannot use are skipped with a warning saying why; one bad Organization never hides the others.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from gateway.config import Config, PartnerSection, normalize_hcid
from gateway.ihe import ebrim

ITI55: Final = "ITI-55"
ITI38: Final = "ITI-38"
ITI39: Final = "ITI-39"
RAD75: Final = "RAD-75"
TRANSACTIONS: Final = (ITI55, ITI38, ITI39, RAD75)

#: transaction → the Partner / ``[[partners]]`` field holding its URL
URL_FIELDS: Final = {ITI55: "xcpd_url", ITI38: "xca_query_url", ITI39: "xca_retrieve_url", RAD75: "xcai_retrieve_url"}

SignatureAlgorithm = Literal["rsa-sha256", "rsa-sha1"]
Source = Literal["config", "directory", "extra"]

# Sequoia Project Healthcare Directory (spec digest §9)
TRANSACTION_EXTENSION: Final = "https://sequoiaproject.org/fhir/sphd/StructureDefinition/Transaction"
PURPOSES_OF_USE_EXTENSION: Final = "https://sequoiaproject.org/fhir/sphd/StructureDefinition/PurposesOfUse"
HCID_IDENTIFIER_CODE: Final = "HCID"

_TRANSACTION_CODE = re.compile(r"\b(ITI|RAD)[-_ ]?(\d{2,3})\b", re.IGNORECASE)
_MAX_PARENT_DEPTH = 8


@dataclass(frozen=True)
class Partner:
    """One responding community as the initiating side uses it.

    ``home_community_id`` is kept in ``urn:oid:`` form. A URL of ``None`` means the partner offers (or we
    know) no endpoint for that transaction. ``timeout`` bounds one exchange, in seconds.
    """

    name: str
    home_community_id: str
    xcpd_url: str | None = None
    xca_query_url: str | None = None
    xca_retrieve_url: str | None = None
    xcai_retrieve_url: str | None = None
    timeout: float = 60.0
    signature_algorithm: SignatureAlgorithm | None = None
    max_documents_per_request: int = 100
    purpose_of_use: str | None = None
    mtom_requests: bool = True
    #: where the entry comes from: ``[[partners]]``, a FHIR directory, or added by code
    source: Source = "extra"
    #: purposes of use the directory says the endpoints accept (empty: not advertised)
    accepted_purposes: tuple[str, ...] = ()
    #: FHIR directory only: homeCommunityId of the organisation whose endpoints were inherited (``partOf``)
    endpoints_from: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "home_community_id", normalize_hcid(self.home_community_id))
        if self.timeout <= 0:
            raise ValueError(f"partner {self.name!r}: timeout must be positive, got {self.timeout}")
        if self.max_documents_per_request < 1:
            raise ValueError(f"partner {self.name!r}: max_documents_per_request must be at least 1")
        for transaction, key in URL_FIELDS.items():
            url = getattr(self, key)
            if url is not None and not url.startswith("https://"):
                raise ValueError(f"partner {self.name!r}: {transaction} endpoint {url!r} is not https:// "
                                 "(partners are reached over mutual TLS)")

    @classmethod
    def from_section(cls, section: PartnerSection) -> Partner:
        """The typed view of one ``[[partners]]`` entry."""
        return cls(name=section.name, home_community_id=section.home_community_id, xcpd_url=section.xcpd_url,
                   xca_query_url=section.xca_query_url, xca_retrieve_url=section.xca_retrieve_url,
                   xcai_retrieve_url=section.xcai_retrieve_url, timeout=section.timeout_seconds,
                   signature_algorithm=section.signature_algorithm,
                   max_documents_per_request=section.max_documents_per_request,
                   purpose_of_use=section.purpose_of_use, mtom_requests=section.mtom_requests, source="config")

    @property
    def hcid_oid(self) -> str:
        """The bare OID of the homeCommunityId (the HL7 ``@root`` form)."""
        return self.home_community_id.removeprefix("urn:oid:")

    def url(self, transaction: str) -> str | None:
        """The endpoint for ``transaction`` (``ITI-55``, ``ITI-38``, ``ITI-39``, ``RAD-75``), or None."""
        key = URL_FIELDS.get(transaction)
        if key is None:
            raise ValueError(f"unknown transaction {transaction!r}; expected one of {', '.join(TRANSACTIONS)}")
        value: str | None = getattr(self, key)
        return value

    @property
    def endpoints(self) -> dict[str, str]:
        """``{transaction: url}`` for every endpoint the partner has."""
        return {t: u for t in TRANSACTIONS if (u := self.url(t)) is not None}

    def security_section(self) -> PartnerSection:
        """The partner as :func:`gateway.security.outbound.security_header` wants it (purpose, algorithm)."""
        return PartnerSection(name=self.name, home_community_id=self.home_community_id,
                              signature_algorithm=self.signature_algorithm, purpose_of_use=self.purpose_of_use,
                              timeout_seconds=self.timeout, max_documents_per_request=self.max_documents_per_request,
                              mtom_requests=self.mtom_requests)

    def describe(self) -> str:
        """``name (urn:oid:...)`` for messages."""
        return self.name if self.name == self.home_community_id else f"{self.name} ({self.home_community_id})"


def _overlay(entries: list[Partner]) -> Partner:
    """One effective partner from several entries for the same HCID, earlier entries winning.

    URLs: the first entry that has one. Settings and name: the first entry (configuration entries sort
    first, so a ``[[partners]]`` entry governs timeout, algorithm, batch size, purpose and MTOM).
    """
    first = entries[0]
    if len(entries) == 1:
        return first

    def url(transaction: str) -> str | None:
        return next((u for e in entries if (u := e.url(transaction))), None)

    purposes = tuple(dict.fromkeys(p for e in entries for p in e.accepted_purposes))
    inherited = next((e.endpoints_from for e in entries if e.endpoints_from), None)
    return replace(first, xcpd_url=url(ITI55), xca_query_url=url(ITI38), xca_retrieve_url=url(ITI39),
                   xcai_retrieve_url=url(RAD75), accepted_purposes=purposes, endpoints_from=inherited)


_SOURCE_RANK = {"config": 0, "extra": 1, "directory": 2}


class PartnerDirectory:
    """homeCommunityId → partner, from ``[[partners]]`` plus optional extra entries (e.g. a FHIR directory).

    Several entries may name the same community; lookups return their overlay (see :func:`_overlay`):
    configuration entries first, then entries added by code, then directory entries, each group in the
    order added.
    """

    def __init__(self, partners: Iterable[Partner] = ()) -> None:
        self._by_hcid: dict[str, list[Partner]] = {}
        self._names: dict[str, str] = {}
        for p in partners:
            self.add(p)

    @classmethod
    def from_config(cls, config: Config, extra: Iterable[Partner] = ()) -> PartnerDirectory:
        """The configured partners, then ``extra`` (directory entries, partners added at run time)."""
        return cls([*(Partner.from_section(s) for s in config.partners), *extra])

    def add(self, partner: Partner) -> None:
        entries = self._by_hcid.setdefault(partner.home_community_id, [])
        entries.append(partner)
        entries.sort(key=lambda e: _SOURCE_RANK[e.source])  # stable: insertion order within a source
        self._names.setdefault(partner.name, partner.home_community_id)

    def entries(self, hcid: str) -> list[Partner]:
        """Every raw entry for ``hcid`` (``urn:oid:`` or bare), highest priority first."""
        return list(self._by_hcid.get(ebrim.normalize_hcid(hcid), ()))

    def resolve(self, hcid: str | None) -> Partner | None:
        """The effective partner for a homeCommunityId (``urn:oid:`` or bare OID), or None when unknown.

        Used after XCPD to find the endpoints of a community a partner reported (ITI TF-2 3.55.4.2.2.4).
        """
        if not hcid:
            return None
        entries = self._by_hcid.get(ebrim.normalize_hcid(hcid))
        return _overlay(entries) if entries else None

    def by_hcid(self, hcid: str) -> Partner:
        """Like :meth:`resolve` but raises ``KeyError`` for an unknown community."""
        found = self.resolve(hcid)
        if found is None:
            raise KeyError(f"no partner with homeCommunityId {ebrim.normalize_hcid(hcid)} in the directory")
        return found

    def by_name(self, name: str) -> Partner:
        """The effective partner of the entry called ``name`` (``KeyError`` when there is none)."""
        hcid = self._names.get(name)
        if hcid is None:
            raise KeyError(f"no partner named {name!r} in the directory")
        return self.by_hcid(hcid)

    def lookup(self, key: str) -> Partner | None:
        """A partner by name, else by homeCommunityId; None when neither matches."""
        if key in self._names:
            return self.by_name(key)
        return self.resolve(key)

    def partners(self, transaction: str | None = None) -> list[Partner]:
        """One effective partner per community (in order added), only those with a ``transaction`` endpoint
        when given."""
        out = [_overlay(entries) for entries in self._by_hcid.values()]
        return [p for p in out if transaction is None or p.url(transaction)]

    def __iter__(self) -> Iterator[Partner]:
        return iter(self.partners())

    def __len__(self) -> int:
        return len(self._by_hcid)

    def __contains__(self, hcid: object) -> bool:
        return isinstance(hcid, str) and ebrim.normalize_hcid(hcid) in self._by_hcid


# --------------------------------------------------------------------------------------------------
# Carequality / Sequoia FHIR directory
# --------------------------------------------------------------------------------------------------


class ParsedDirectory(list[Partner]):
    """The partners read from a directory document; :attr:`warnings` says what was skipped and why."""

    def __init__(self, partners: Iterable[Partner] = (), warnings: Iterable[str] = ()) -> None:
        super().__init__(partners)
        self.warnings: list[str] = list(warnings)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _codings(concept: Any) -> list[dict[str, Any]]:
    return [c for c in _list(_dict(concept).get("coding")) if isinstance(c, dict)]


def _extension_codes(resource: Mapping[str, Any], url: str) -> list[str]:
    """Codes (or text) of every extension ``url`` on ``resource`` (CodeableConcept, Coding or string)."""
    out: list[str] = []
    for ext in _list(resource.get("extension")):
        if not isinstance(ext, dict) or ext.get("url") != url:
            continue
        concept = ext.get("valueCodeableConcept")
        if concept is not None:
            out.extend(str(c["code"]) for c in _codings(concept) if c.get("code"))
            if not _codings(concept) and _dict(concept).get("text"):
                out.append(str(concept["text"]))
        coding = _dict(ext.get("valueCoding"))
        if coding.get("code"):
            out.append(str(coding["code"]))
        for key in ("valueString", "valueCode"):
            if isinstance(ext.get(key), str):
                out.append(ext[key])
    return out


def transaction_of(code: str) -> str | None:
    """``ITI-55`` / ``ITI-38`` / ``ITI-39`` / ``RAD-75`` named in a Transaction code (``"ITI-55"``,
    ``"urn:ihe:iti:xcpd:2009 ITI-55"``, ``"RAD75"`` …); None for other transactions (XDR, Direct …)."""
    for m in _TRANSACTION_CODE.finditer(code):
        name = f"{m.group(1).upper()}-{m.group(2)}"
        if name in URL_FIELDS:
            return name
    return None


def _organization_hcid(org: Mapping[str, Any], label: str, warnings: list[str]) -> str | None:
    from_identifier: str | None = None
    for ident in _list(org.get("identifier")):
        ident = _dict(ident)
        if any(c.get("code") == HCID_IDENTIFIER_CODE for c in _codings(ident.get("type"))) and ident.get("value"):
            from_identifier = str(ident["value"])
            break
    raw = from_identifier or (str(org["id"]) if org.get("id") else None)
    if raw is None:
        warnings.append(f"{label}: skipped: no HCID identifier and no Organization.id")
        return None
    try:
        hcid = normalize_hcid(raw)
    except ValueError:
        where = "HCID identifier" if from_identifier else "Organization.id"
        warnings.append(f"{label}: skipped: its {where} {raw!r} is not an OID")
        return None
    if from_identifier and org.get("id"):
        try:
            by_id = normalize_hcid(str(org["id"]))
        except ValueError:
            by_id = None
        if by_id is not None and by_id != hcid:
            warnings.append(f"{label}: Organization.id {org['id']!r} differs from its HCID identifier "
                            f"{from_identifier!r}; using the identifier")
    return hcid


def _endpoint_refs(org: Mapping[str, Any]) -> list[str]:
    return [str(r["reference"]) for r in _list(org.get("endpoint")) if isinstance(r, dict) and r.get("reference")]


@dataclass
class _OrgEndpoints:
    urls: dict[str, str] = field(default_factory=dict)
    purposes: list[str] = field(default_factory=list)


def _read_endpoints(org: Mapping[str, Any], label: str, bundled: Mapping[str, dict[str, Any]],
                    warnings: list[str]) -> _OrgEndpoints:
    contained = {f"#{r['id']}": r for r in _list(org.get("contained"))
                 if isinstance(r, dict) and r.get("resourceType") == "Endpoint" and r.get("id")}
    refs = _endpoint_refs(org)
    endpoints: list[tuple[str, dict[str, Any]]] = []
    if refs:
        for ref in refs:
            resource = contained.get(ref) or bundled.get(ref) or bundled.get(ref.rsplit("/", 1)[-1])
            if resource is None:
                warnings.append(f"{label}: endpoint reference {ref!r} does not resolve to a contained or bundled "
                                "Endpoint; ignored")
                continue
            endpoints.append((ref, resource))
    else:  # no Organization.endpoint: every contained Endpoint
        endpoints = [(f"#{r.get('id')}", r) for r in _list(org.get("contained"))
                     if isinstance(r, dict) and r.get("resourceType") == "Endpoint"]
    out = _OrgEndpoints()
    for ref, ep in endpoints:
        what = f"{label}: endpoint {ep.get('id') or ref}" + (f" ({ep['name']})" if ep.get("name") else "")
        status = ep.get("status")
        if status is not None and status != "active":
            warnings.append(f"{what}: status {status!r}, not active; ignored")
            continue
        codes = _extension_codes(ep, TRANSACTION_EXTENSION)
        if not codes:
            warnings.append(f"{what}: no Transaction extension ({TRANSACTION_EXTENSION}); ignored")
            continue
        transaction = next((t for t in map(transaction_of, codes) if t), None)
        if transaction is None:
            continue  # XDR, Direct messaging …: not something the initiating gateway queries
        address = ep.get("address")
        if not isinstance(address, str) or not address.strip():
            warnings.append(f"{what}: {transaction} endpoint without an address; ignored")
            continue
        address = address.strip()
        if not address.startswith("https://"):
            warnings.append(f"{what}: {transaction} address {address!r} is not https://; ignored")
            continue
        if transaction in out.urls:
            if out.urls[transaction] != address:
                warnings.append(f"{what}: a second {transaction} endpoint ({address}); keeping "
                                f"{out.urls[transaction]}")
            continue
        out.urls[transaction] = address
        out.purposes.extend(p.upper() for p in _extension_codes(ep, PURPOSES_OF_USE_EXTENSION))
    return out


def _resources(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, list):
        for item in data:
            yield from _resources(item)
    elif isinstance(data, dict):
        if data.get("resourceType") == "Bundle":
            for entry in _list(data.get("entry")):
                resource = _dict(entry).get("resource")
                if isinstance(resource, dict):
                    yield from _resources(resource)
        else:
            yield data


def parse_fhir_directory(data: Mapping[str, Any] | list[Any]) -> ParsedDirectory:
    """Partners from a Carequality/Sequoia directory document (Bundle, Organization or list of them).

    Per Organization: HCID from the identifier whose type is ``HCID`` (else ``Organization.id``); inactive
    organisations are skipped; endpoints are the Endpoints referenced by ``Organization.endpoint``
    (contained ``#id`` or bundled ``Endpoint/id``; all contained Endpoints when there is no reference),
    classified by the ``Transaction`` extension; only active ``https://`` endpoints count. An organisation
    without endpoints of its own inherits those of its ``partOf`` parent when the parent is in the same
    document (Carequality sub-organisations are reached through their implementer's gateway).
    Organisations left without any ITI-55/ITI-38/ITI-39/RAD-75 endpoint are skipped. Every skip is
    explained in :attr:`ParsedDirectory.warnings`.
    """
    warnings: list[str] = []
    resources = list(_resources(data))
    bundled: dict[str, dict[str, Any]] = {}
    for r in resources:
        if r.get("resourceType") == "Endpoint" and r.get("id"):
            bundled[f"Endpoint/{r['id']}"] = r
            bundled[str(r["id"])] = r
    orgs: list[tuple[str, str, dict[str, Any], _OrgEndpoints, str | None]] = []
    seen: set[str] = set()
    for index, org in enumerate(r for r in resources if r.get("resourceType") == "Organization"):
        label = f"Organization {org.get('name') or org.get('id') or f'#{index + 1}'}"
        hcid = _organization_hcid(org, label, warnings)
        if hcid is None:
            continue
        label = f"Organization {org.get('name') or hcid} ({hcid})"
        if org.get("active") is False:
            warnings.append(f"{label}: skipped: marked inactive")
            continue
        if hcid in seen:
            warnings.append(f"{label}: skipped: a second Organization with the same HCID")
            continue
        seen.add(hcid)
        parent_ref = _dict(org.get("partOf")).get("reference") or _dict(_dict(org.get("partOf")).get("identifier")
                                                                        ).get("value")
        parent: str | None = None
        if isinstance(parent_ref, str) and parent_ref:
            try:
                parent = normalize_hcid(parent_ref.rsplit("/", 1)[-1])
            except ValueError:
                parent = None
        orgs.append((hcid, label, org, _read_endpoints(org, label, bundled, warnings), parent))

    by_hcid = {hcid: (eps, parent) for hcid, _, _, eps, parent in orgs}
    partners: list[Partner] = []
    for hcid, label, org, eps, parent in orgs:
        urls, purposes, inherited = dict(eps.urls), list(eps.purposes), None
        ancestor, depth = parent, 0
        while not urls and ancestor and ancestor in by_hcid and ancestor != hcid and depth < _MAX_PARENT_DEPTH:
            anc_eps, next_parent = by_hcid[ancestor]
            if anc_eps.urls:
                urls, purposes, inherited = dict(anc_eps.urls), list(anc_eps.purposes), ancestor
            ancestor, depth = next_parent, depth + 1
        if not urls:
            warnings.append(f"{label}: skipped: no usable ITI-55, ITI-38, ITI-39 or RAD-75 endpoint")
            continue
        name = str(org.get("name") or hcid)
        partners.append(Partner(name=name, home_community_id=hcid, xcpd_url=urls.get(ITI55),
                                xca_query_url=urls.get(ITI38), xca_retrieve_url=urls.get(ITI39),
                                xcai_retrieve_url=urls.get(RAD75), source="directory",
                                accepted_purposes=tuple(dict.fromkeys(purposes)), endpoints_from=inherited))
    return ParsedDirectory(partners, warnings)


__all__ = [
    "ITI38", "ITI39", "ITI55", "PURPOSES_OF_USE_EXTENSION", "RAD75", "TRANSACTIONS", "TRANSACTION_EXTENSION",
    "URL_FIELDS", "ParsedDirectory", "Partner", "PartnerDirectory", "parse_fhir_directory", "transaction_of",
]
