"""The XUA identity we assert when we initiate: config defaults, overridable per call."""

from __future__ import annotations

import dataclasses
import datetime as dt
from functools import lru_cache
from pathlib import Path

from lxml import etree

from gateway.config import Config, PartnerSection
from gateway.security.saml import (
    CodedValue,
    SigningCredentials,
    UserIdentity,
    build_assertion,
    load_signing_credentials,
)
from gateway.security.wssecurity import build_security_header

SNOMED_CT = "2.16.840.1.113883.6.96"
NHIN_PURPOSE = "2.16.840.1.113883.3.18.7.1"


@lru_cache(maxsize=8)
def _credentials(cert: Path, key: Path) -> SigningCredentials:
    return load_signing_credentials(cert, key)


def signer_name_id(config: Config) -> str:
    """The Subject NameID of the assertions we sign: our signing certificate's subject (RFC 4514)."""
    creds = _credentials(config.saml.signing_certificate, config.saml.signing_key)
    return creds.certificate_chain[0].subject.rfc4514_string()


def default_identity(config: Config, partner: PartnerSection | None = None) -> UserIdentity:
    s = config.saml
    purpose = (partner.purpose_of_use if partner and partner.purpose_of_use else s.purpose_of_use).upper()
    return UserIdentity(
        subject_id=s.subject_id,
        organization=s.organization,
        organization_id=s.organization_id or config.gateway.home_community_id,
        home_community_id=config.gateway.home_community_id,
        role=CodedValue(s.role_code, SNOMED_CT, "SNOMED_CT", s.role_display),
        purpose_of_use=CodedValue(purpose, NHIN_PURPOSE, "nhin-purpose", purpose.title()),
        npi=s.npi,
    )


def security_header(config: Config, audience: str, *, partner: PartnerSection | None = None,
                    identity: UserIdentity | None = None, now: dt.datetime | None = None,
                    **overrides: str) -> etree._Element:
    """A fresh ``wsse:Security`` header with a newly signed assertion for one request."""
    ident = identity or default_identity(config, partner)
    if overrides:
        ident = dataclasses.replace(ident, **overrides)  # type: ignore[arg-type]
    algorithm = (partner.signature_algorithm if partner and partner.signature_algorithm
                 else config.saml.signature_algorithm)
    lifetime = dt.timedelta(seconds=config.saml.assertion_lifetime_seconds)
    assertion = build_assertion(
        ident, _credentials(config.saml.signing_certificate, config.saml.signing_key),
        issuer=config.saml_issuer, audience=audience, lifetime=lifetime, now=now,
        confirmation=config.saml.subject_confirmation, signature_algorithm=algorithm)
    return build_security_header(assertion, now=now, ttl=lifetime)
