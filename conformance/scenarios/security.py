"""XUA scenarios: requests with a missing, unsigned, expired, tampered or untrusted assertion must be refused
with a WS-Security SOAP fault (ITI TF-2 3.40.4.1.3) — and never answered."""

from __future__ import annotations

import datetime as dt
import functools

import anyio.to_thread
from lxml import etree

from conformance import spec
from conformance.checks.soap import fault_checks
from conformance.context import Scenario, ScenarioContext
from conformance.prerequisites import discovery_request
from gateway.initiating.partners import ITI55
from gateway.security.certs import make_ca, make_leaf
from gateway.security.outbound import default_identity
from gateway.security.saml import SigningCredentials, build_assertion
from gateway.security.wssecurity import build_security_header
from gateway.soap import ns

TAMPERED_SUBJECT = "XIG conformance (altered after signing)"
SUBJECT_ID = "urn:oasis:names:tc:xspa:1.0:subject:subject-id"


async def _refused(ctx: ScenarioContext, header: etree._Element | None, what: str, *, label: str = "") -> None:
    """Send the test patient's XCPD query with ``header`` as its security header; it must be refused."""
    body = discovery_request(ctx, ctx.session.patient.demographics())
    sent = await ctx.send(ITI55, body, security=header)
    ctx.add(fault_checks(sent, family="security", clause=spec.XUA, what=what, subcode_namespace=ns.WSSE),
            label=label)


def _url(ctx: ScenarioContext) -> str:
    url = ctx.session.url(ITI55)
    if url is None:
        ctx.abort("the partner setup has no ITI-55 endpoint")
    return url


async def _valid(ctx: ScenarioContext, **kwargs: object) -> etree._Element:
    return await anyio.to_thread.run_sync(functools.partial(ctx.session.security, _url(ctx), **kwargs))


def _assertion(header: etree._Element) -> etree._Element:
    found = header.find(ns.q(ns.SAML2, "Assertion"))
    assert found is not None, "security_header always carries the assertion"
    return found


async def missing(ctx: ScenarioContext) -> None:
    what = "a request without a usable assertion"
    await _refused(ctx, None, what, label="no wsse:Security header")
    header = await _valid(ctx)
    header.remove(_assertion(header))
    await _refused(ctx, header, what, label="wsse:Security header without assertion")


async def unsigned(ctx: ScenarioContext) -> None:
    header = await _valid(ctx)
    assertion = _assertion(header)
    for sig in assertion.findall(ns.q(ns.DS, "Signature")):
        assertion.remove(sig)
    await _refused(ctx, header, "an unsigned assertion")


async def expired(ctx: ScenarioContext) -> None:
    lifetime = ctx.session.config.saml.assertion_lifetime_seconds
    then = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=lifetime + 3600)
    await _refused(ctx, await _valid(ctx, now=then), "an assertion (and Timestamp) that expired an hour ago")


async def tampered(ctx: ScenarioContext) -> None:
    header = await _valid(ctx)
    values = [a for a in _assertion(header).iter(ns.q(ns.SAML2, "Attribute")) if a.get("Name") == SUBJECT_ID]
    value = values[0].find(ns.q(ns.SAML2, "AttributeValue")) if values else None
    assert value is not None, "build_assertion always writes subject-id"
    value.text = TAMPERED_SUBJECT
    await _refused(ctx, header, "an assertion altered after it was signed")


@functools.lru_cache(maxsize=1)
def _untrusted_credentials() -> SigningCredentials:
    ca, ca_key = make_ca("XIG conformance untrusted CA (never trust)")
    cert, key = make_leaf(ca, ca_key, "XIG conformance untrusted signer", "Nobody (test)")
    return SigningCredentials([cert, ca], key)


async def untrusted(ctx: ScenarioContext) -> None:
    cfg = ctx.session.config
    url = _url(ctx)
    creds = await anyio.to_thread.run_sync(_untrusted_credentials)
    lifetime = dt.timedelta(seconds=cfg.saml.assertion_lifetime_seconds)
    assertion = build_assertion(default_identity(cfg, ctx.session.target.section), creds, issuer=cfg.saml_issuer,
                                audience=url, lifetime=lifetime, confirmation=cfg.saml.subject_confirmation)
    await _refused(ctx, build_security_header(assertion, ttl=lifetime),
                   "an assertion signed by a certificate the partner does not trust")


_GROUP = "Security"
SCENARIOS = (
    Scenario("security-missing-assertion", "XUA: a request without assertion is refused", spec.XUA, (ITI55,),
             "No wsse:Security header, then a header without saml2:Assertion: a Sender fault with a wsse: subcode.",
             missing, _GROUP),
    Scenario("security-unsigned-assertion", "XUA: an unsigned assertion is refused", spec.XUA, (ITI55,),
             "A valid assertion with its ds:Signature removed.", unsigned, _GROUP),
    Scenario("security-expired-assertion", "XUA: an expired assertion is refused", spec.XUA, (ITI55,),
             "An assertion and Timestamp that expired an hour ago.", expired, _GROUP),
    Scenario("security-tampered-assertion", "XUA: an assertion altered after signing is refused", spec.XUA,
             (ITI55,), "The subject-id changed after the signature was made.", tampered, _GROUP),
    Scenario("security-untrusted-signer", "XUA: an assertion from an untrusted signer is refused", spec.XUA,
             (ITI55,), "A correctly signed assertion whose certificate chains to a CA made up for the test.",
             untrusted, _GROUP),
)
