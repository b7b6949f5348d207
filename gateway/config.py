"""Typed TOML configuration, validated once at start-up.

One file configures a gateway: who we are (``[gateway]``), how we listen (``[server]``), how we
sign and what we trust (``[saml]``), the PACS behind us (``[pacs]`` or ``[[pacs]]``), the database
and our partners (``[[partners]]``). Relative paths are resolved against the file's directory.
Any problem is reported as :class:`ConfigError` listing every offending key — the gateway never
starts half-configured.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import XigError

OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class ConfigError(XigError):
    """The configuration file cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def normalize_oid(value: str) -> str:
    """``urn:oid:1.2.3`` or ``1.2.3`` → ``1.2.3`` (raises ValueError when not an OID)."""
    v = value.strip()
    if v.lower().startswith("urn:oid:"):
        v = v[8:]
    if not OID_RE.match(v) or len(v) > 64:
        raise ValueError(f"{value!r} is not an OID (dotted numbers such as 2.999.1, at most 64 characters)")
    return v


def normalize_hcid(value: str) -> str:
    """A homeCommunityId in the strict XCA form ``urn:oid:<oid>`` (ITI TF-2 3.38.4.1.2.1)."""
    return "urn:oid:" + normalize_oid(value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Paths(_Section):
    """A section whose ``Path`` fields are resolved against the config file's directory."""

    @field_validator("*", mode="after")
    @classmethod
    def _resolve(cls, v: Any, info: ValidationInfo) -> Any:
        base = (info.context or {}).get("base_dir")
        if isinstance(v, Path) and base is not None and not v.is_absolute():
            return (Path(base) / v).resolve()
        return v


class GatewaySection(_Section):
    home_community_id: str = Field(description="this community, urn:oid:...")
    assigning_authority: str = Field(description="OID of the local patient-ID domain")
    repository_unique_id: str = Field(description="repository of the on-demand KOS documents")
    imaging_source_id: str = Field(description="RAD-75 RepositoryUniqueId = KOS Retrieve Location UID")
    name: str = "XIG"

    @field_validator("home_community_id")
    @classmethod
    def _hcid(cls, v: str) -> str:
        return normalize_hcid(v)

    @field_validator("assigning_authority", "repository_unique_id", "imaging_source_id")
    @classmethod
    def _oids(cls, v: str) -> str:
        return normalize_oid(v)


class ServerSection(_Paths):
    listen: str = "127.0.0.1:8443"
    certificate: Path
    private_key: Path
    client_ca: Path
    #: Largest request body accepted; larger requests get a Sender fault (HTTP 413).
    max_request_bytes: int = Field(default=10 * 1024 * 1024, gt=1024)
    #: Base URL partners use to reach us (for ?wsdl addresses); default: derived from the request.
    public_url: str | None = None
    #: Seconds a graceful shutdown waits for in-flight requests.
    shutdown_timeout: float = 30.0
    #: The event loop of the servers and of the command line's steps: "uvloop" (default; less CPU per byte
    #: streamed, and the outbound client's TLS compiled) or "asyncio".
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{v!r} is not host:port (e.g. 127.0.0.1:8443)")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class ClientSection(_Paths):
    """Optional: a separate client certificate and trust store for outgoing calls."""

    certificate: Path | None = None
    private_key: Path | None = None
    ca: Path | None = None


class SamlSection(_Paths):
    trusted_issuers: Path
    signing_certificate: Path
    signing_key: Path
    #: Accept RSA-SHA1 / SHA-1 signatures from partners (legacy peers); SHA-256 is always accepted.
    allow_sha1: bool = False
    clock_skew_seconds: int = Field(default=120, ge=0, le=3600)
    permitted_purposes: list[str] = Field(default_factory=lambda: ["TREATMENT"])
    assertion_lifetime_seconds: int = Field(default=300, gt=0, le=86400)
    signature_algorithm: Literal["rsa-sha256", "rsa-sha1"] = "rsa-sha256"
    subject_confirmation: Literal["holder-of-key", "bearer"] = "holder-of-key"
    #: Issuer of the assertions we sign (default: an e-mail style name derived from the gateway name).
    issuer: str | None = None
    # Default identity of the user on whose behalf we initiate (overridable per command).
    subject_id: str = "XIG import station"
    organization: str = "XIG Community"
    organization_id: str | None = None
    role_code: str = "224608005"
    role_display: str = "Administrative healthcare staff"
    purpose_of_use: str = "TREATMENT"
    npi: str | None = None


class DimsePacs(_Section):
    kind: Literal["dimse"]
    host: str = "127.0.0.1"
    port: int = Field(default=4242, gt=0, lt=65536)
    called_ae: str = "ORTHANC"
    calling_ae: str = "XIG"
    retrieve: Literal["c-get", "c-move"] = "c-get"
    #: C-MOVE: our Storage SCP (the PACS must know ``calling_ae`` at this address)
    move_port: int = Field(default=0, ge=0, lt=65536)
    move_host: str = "127.0.0.1"
    imaging_source_id: str | None = None
    name: str | None = None


class DicomwebPacs(_Section):
    kind: Literal["dicomweb"]
    url: str
    imaging_source_id: str | None = None
    name: str | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r}: the DICOMweb base URL must start with http:// or https://")
        return v.rstrip("/")


class FilesystemPacs(_Paths):
    kind: Literal["filesystem"]
    path: Path = Path("var/pacs")
    imaging_source_id: str | None = None
    name: str | None = None


PacsSection = Annotated[DimsePacs | DicomwebPacs | FilesystemPacs, Field(discriminator="kind")]


class CodeValue(_Section):
    """A coded value for XDS metadata: ``{ code = "N", scheme = "2.16.840.1.113883.5.25", display = "normal" }``."""

    code: str
    scheme: str
    display: str = ""


class ResponderSection(_Paths):
    """How the responding gateway answers (defaults follow RAD TF-3 4.68 practice and dcm4chee)."""

    #: "on-demand" (ITI TF-2 3.38.4.1.3: generated at retrieve time, default) or "stable"
    #: (uniqueId = the KOS of the study's current content; size/hash filled in at query time).
    kos_entry_type: Literal["on-demand", "stable"] = "on-demand"
    #: RAD-75 serves only instances referenced by a KOS delivered to the requesting community within
    #: this many hours (Carequality Imaging-002: no random UID guessing).
    rad75_authorization_hours: float = Field(default=24.0, gt=0)
    #: XCPD: minimum score (0-100) for a match; candidates within ``ask_more_below`` of it lead to
    #: a request for more attributes instead of "no match".
    match_threshold: int = Field(default=85, ge=1, le=100)
    ask_more_below: int = Field(default=15, ge=0, le=99)
    #: several matching patients: "list" them all (Case 2) or "ask-more" (Case 3)
    multiple_matches: Literal["list", "ask-more"] = "list"
    max_query_results: int = Field(default=1000, gt=0)
    #: RAD-75 MTOM layout. "first": the root part (with the per-instance status) comes first, as every
    #: SOAP stack expects; instances are spooled to ``spool_dir`` until all outcomes are known.
    #: "last": instances stream straight from the PACS and the root part comes last (XOP allows it,
    #: identified by ``start``; lowest latency, no spooling — use only with peers that honour ``start``).
    rad75_root_part: Literal["first", "last"] = "first"
    spool_dir: Path | None = None
    retrieve_ae_title: str = ""
    class_code: CodeValue = CodeValue(code="IMAGES", scheme="1.3.6.1.4.1.19376.1.2.6.1", display="Images")
    type_code: CodeValue = CodeValue(code="18748-4", scheme="2.16.840.1.113883.6.1",
                                     display="Diagnostic imaging study")
    confidentiality_code: CodeValue = CodeValue(code="N", scheme="2.16.840.1.113883.5.25", display="normal")
    healthcare_facility_type_code: CodeValue = CodeValue(code="22232009", scheme="2.16.840.1.113883.6.96",
                                                         display="Hospital")
    practice_setting_code: CodeValue = CodeValue(code="394914008", scheme="2.16.840.1.113883.6.96",
                                                 display="Radiology")
    language_code: str = "en-US"


class ImportSection(_Paths):
    """How the import station reconciles and stores pulled studies (``xig pull-priors``)."""

    #: Accession Number of imported studies: keep the partner's, prefix it, clear it
    accession: Literal["keep", "prefix", "clear"] = "prefix"
    accession_prefix: str = "EXT-"
    #: append an "outside study" marker to Study Description
    outside_marker: bool = True
    outside_marker_text: str = "[OUTSIDE]"
    #: RAD-75 TransferSyntaxUIDList we ask for (the local PACS must accept them)
    transfer_syntaxes: list[str] = Field(default_factory=lambda: ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    #: where instances wait between download and storage (default: var/spool beside the config)
    spool_dir: Path | None = None


class DatabaseSection(_Section):
    url: str = "sqlite:///var/xig.db"


class PartnerSection(_Section):
    name: str
    home_community_id: str
    xcpd_url: str | None = None
    xca_query_url: str | None = None
    xca_retrieve_url: str | None = None
    xcai_retrieve_url: str | None = None
    timeout_seconds: float = Field(default=60.0, gt=0)
    signature_algorithm: Literal["rsa-sha256", "rsa-sha1"] | None = None
    max_documents_per_request: int = Field(default=100, gt=0)
    purpose_of_use: str | None = None
    mtom_requests: bool = True

    @field_validator("home_community_id")
    @classmethod
    def _hcid(cls, v: str) -> str:
        return normalize_hcid(v)

    @field_validator("xcpd_url", "xca_query_url", "xca_retrieve_url", "xcai_retrieve_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("https://"):
            raise ValueError(f"{v!r}: partner endpoints must be https:// (mutual TLS)")
        return v


class AuditRepository(_Paths):
    """One audit record repository (ATNA ARR) reached over syslog."""

    #: ``tls``: RFC 5425 (octet-counted RFC 5424 frames over mutual TLS); ``udp``: RFC 5426.
    transport: Literal["tls", "udp"] = "tls"
    host: str = "127.0.0.1"
    port: int = Field(default=6514, gt=0, lt=65536)
    #: CA that signed the repository's certificate (default: the client trust store / server client_ca).
    ca: Path | None = None
    #: our client certificate for TLS (default: the client / server certificate).
    certificate: Path | None = None
    private_key: Path | None = None
    name: str | None = None


class AuditSection(_Section):
    """ATNA audit trail: every transaction is stored locally and forwarded to the repositories."""

    enabled: bool = True
    #: AuditSourceID (default: the gateway name) and AuditEnterpriseSiteID (default: home community).
    source_id: str | None = None
    enterprise_site_id: str | None = None
    #: syslog APP-NAME of the RFC 5424 header.
    app_name: str = "xig"
    repositories: list[AuditRepository] = Field(default_factory=list)
    #: seconds between delivery attempts while a repository is unreachable.
    retry_seconds: float = Field(default=5.0, gt=0)
    #: messages sent per delivery batch.
    batch_size: int = Field(default=200, gt=0)


class LimitsSection(_Section):
    """Concurrency limits: requests over a limit get a SOAP fault with busy semantics, never queue forever."""

    max_concurrent_requests: int = Field(default=256, gt=0)
    max_concurrent_per_partner: int = Field(default=64, gt=0)
    max_concurrent_retrievals: int = Field(default=32, gt=0)  #: RAD-75 / ITI-39, all partners
    max_concurrent_retrievals_per_partner: int = Field(default=8, gt=0)
    #: seconds a refused partner is told to wait (Retry-After header and the busy answer's text)
    retry_after_seconds: int = Field(default=5, gt=0, le=3600)


class ObservabilitySection(_Section):
    metrics: bool = True  #: serve /metrics (Prometheus text format)
    json_logs: bool = False  #: one JSON object per log line, with the wsa:MessageID as correlation id
    certificate_warn_days: int = Field(default=30, ge=0)


class ConformanceSection(_Section):
    """The test patient a conformance run expects the partner under test to know."""

    family: str = ""
    given: str = ""
    birth_date: str = ""  #: YYYYMMDD
    gender: Literal["M", "F", "O", "U", ""] = ""


class Config(_Section):
    gateway: GatewaySection
    server: ServerSection
    client: ClientSection = ClientSection()
    saml: SamlSection
    pacs: list[PacsSection] = Field(default_factory=list)
    database: DatabaseSection = DatabaseSection()
    responder: ResponderSection = ResponderSection()
    import_: ImportSection = Field(default=ImportSection(), alias="import")
    partners: list[PartnerSection] = Field(default_factory=list)
    audit: AuditSection = AuditSection()
    limits: LimitsSection = LimitsSection()
    observability: ObservabilitySection = ObservabilitySection()
    conformance: ConformanceSection = ConformanceSection()
    #: directory of the config file (relative paths and sqlite URLs are resolved against it)
    base_dir: Path = Path(".")

    @field_validator("pacs", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _unique_partners(self) -> Config:
        seen: set[str] = set()
        for p in self.partners:
            if p.name in seen:
                raise ValueError(f"partner name {p.name!r} is used twice")
            seen.add(p.name)
        return self

    # Derived values -------------------------------------------------------------------------
    @property
    def client_certificate(self) -> Path:
        return self.client.certificate or self.server.certificate

    @property
    def client_private_key(self) -> Path:
        return self.client.private_key or self.server.private_key

    @property
    def client_trust(self) -> Path:
        return self.client.ca or self.server.client_ca

    @property
    def saml_issuer(self) -> str:
        if self.saml.issuer:
            return self.saml.issuer
        return f"{self.gateway.name.replace(' ', '').lower()}@{normalize_oid(self.gateway.home_community_id)}"

    def partner(self, name: str) -> PartnerSection:
        for p in self.partners:
            if p.name == name:
                return p
        raise KeyError(name)


def _loc(err: Any) -> str:
    parts: list[str] = []
    for item in err["loc"]:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("dimse", "dicomweb", "filesystem") and parts and parts[-1].startswith("pacs"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def parse_config(data: dict[str, Any], *, base_dir: Path, source: str = "<config>") -> Config:
    try:
        return Config.model_validate({**data, "base_dir": base_dir}, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; `xig config example` lists every key)"
            problems.append(f"{_loc(err)}: {msg}")
        raise ConfigError(source, problems) from None


def load_config(path: Path | str, *, check_files: bool = True) -> Config:
    """Read, validate and return the configuration; raise :class:`ConfigError` on any problem."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    cfg = parse_config(data, base_dir=p.resolve().parent, source=str(p))
    if check_files:
        missing = [f"{key}: file {f} does not exist" for key, f in _files(cfg) if not f.exists()]
        if missing:
            raise ConfigError(str(p), missing)
    return cfg


def _files(cfg: Config) -> list[tuple[str, Path]]:
    files = [("server.certificate", cfg.server.certificate), ("server.private_key", cfg.server.private_key),
             ("server.client_ca", cfg.server.client_ca), ("saml.trusted_issuers", cfg.saml.trusted_issuers),
             ("saml.signing_certificate", cfg.saml.signing_certificate), ("saml.signing_key", cfg.saml.signing_key)]
    for key in ("certificate", "private_key", "ca"):
        value = getattr(cfg.client, key)
        if value is not None:
            files.append((f"client.{key}", value))
    return files
