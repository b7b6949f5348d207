"""Structured logs: every line of a request carries its wsa:MessageID, also from deep in the handler."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import pytest
from lxml import etree

from gateway.config import Config
from gateway.ihe import ebrim, iti38
from gateway.logs import bind_correlation, correlation_id
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import ns
from gateway.web.app import RequestContext, SoapResponse
from gateway.web.client import SoapClient
from gateway.web.endpoints import XCA_QUERY
from gateway.web.server import BackgroundServer
from tests.conftest import logging_to
from tests.test_shutdown import Recorder

deep = logging.getLogger("xig.test.deep")


async def handler(ctx: RequestContext) -> SoapResponse:
    deep.info("deep in the handler for %s", ctx.envelope.addressing.message_id)
    await anyio.to_thread.run_sync(lambda: deep.info("in a worker thread for %s", ctx.envelope.addressing.message_id))
    if "BOOM" in etree.tostring(ctx.body).decode():
        raise RuntimeError("handler bug")
    resp = etree.Element(ns.q(ns.QUERY, "AdhocQueryResponse"), nsmap={"query": ns.QUERY, "rim": ns.RIM},
                         status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success")
    etree.SubElement(resp, ns.q(ns.RIM, "RegistryObjectList"))
    return SoapResponse(resp)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    with logging_to(stream, json=True, level=logging.DEBUG):
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def query(patient: str = "PAT-1") -> etree._Element:
    return iti38.build_query(iti38.find_documents_for_kos(ebrim.CX(patient, "2.999.1.1")))


async def post(config: Config, pki: CertSet, url: str, body: etree._Element, mid: str, *, signed: bool = True) -> Any:
    async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
        data, ctype, _ = SoapClient.encode_request(url, body, XCA_QUERY.request_action, message_id=mid,
                                                   security=security_header(config, url) if signed else None)
        return await c.post(url, data, ctype, mid)


async def test_request_lines_carry_the_message_id(config: Config, pki: CertSet, captured: io.StringIO) -> None:
    recorder = Recorder()
    server = BackgroundServer(config, {XCA_QUERY.transaction: handler}, observers=[recorder]).start()
    url = server.url + XCA_QUERY.path
    mid, unsigned, boom = "urn:uuid:11111111-2222-3333-4444-555555555555", "urn:uuid:unsigned-1", "urn:uuid:boom-1"
    try:
        assert (await post(config, pki, url, query(), mid)).fault is None
        assert (await post(config, pki, url, query(), unsigned, signed=False)).fault is not None
        assert (await post(config, pki, url, query("BOOM"), boom)).fault is not None
        exchanges = await recorder.wait(3)
        logging.getLogger("xig.test").info("after the requests")
    finally:
        server.stop()
    out = lines(captured)
    mine = [r for r in out if r["correlation_id"] == mid]
    messages = [r["message"] for r in mine]
    assert f"deep in the handler for {mid}" in messages
    assert f"in a worker thread for {mid}" in messages
    assert any(m.startswith("ITI-38 request") for m in messages)  # the pipeline's own line
    for r in mine:
        assert r["transaction"] == "ITI-38" and r["partner"] == exchanges[0].partner
        assert r["ts"].endswith("+00:00") and r["level"] in ("DEBUG", "INFO")
    fault = [r for r in out if r["correlation_id"] == unsigned]
    assert any("wsse:InvalidSecurity" in r["message"] for r in fault)
    crash = [r for r in out if r["correlation_id"] == boom and r["level"] == "ERROR"]
    assert crash and "RuntimeError: handler bug" in crash[0]["exception"]
    after = [r for r in out if r["message"] == "after the requests"]
    assert after and after[0]["correlation_id"] is None and after[0]["transaction"] is None


async def test_concurrent_requests_keep_their_own_ids(config: Config, pki: CertSet, captured: io.StringIO) -> None:
    server = BackgroundServer(config, {XCA_QUERY.transaction: handler}).start()
    url = server.url + XCA_QUERY.path
    mids = [f"urn:uuid:00000000-0000-0000-0000-{i:012d}" for i in range(6)]
    try:
        replies = await asyncio.gather(*(post(config, pki, url, query(), m) for m in mids))
        assert all(r.fault is None for r in replies)
    finally:
        server.stop()
    deep_lines = [r for r in lines(captured) if r["logger"] == "xig.test.deep"]
    assert len(deep_lines) == 2 * len(mids)
    for r in deep_lines:
        assert r["message"].endswith(r["correlation_id"])  # each line names the request it belongs to


def test_bind_correlation_for_outgoing_requests(captured: io.StringIO) -> None:
    log = logging.getLogger("xig.initiating")
    with bind_correlation("urn:uuid:out-1", transaction="ITI-55", partner="Community B"):
        log.info("sending")
        with bind_correlation("urn:uuid:out-2"):
            log.info("nested")
        log.info("back")
    log.info("outside", extra={"job": "J-1"})
    assert correlation_id.get() is None
    got = [(r["message"], r["correlation_id"], r["transaction"], r["partner"]) for r in lines(captured)]
    assert got == [("sending", "urn:uuid:out-1", "ITI-55", "Community B"),
                   ("nested", "urn:uuid:out-2", "ITI-55", "Community B"),
                   ("back", "urn:uuid:out-1", "ITI-55", "Community B"),
                   ("outside", None, None, None)]
    assert lines(captured)[-1]["job"] == "J-1"  # extra fields are kept


def test_text_format_shows_the_correlation_id() -> None:
    stream = io.StringIO()
    with logging_to(stream, json=False, level="INFO"):
        with bind_correlation("urn:uuid:text-1"):
            logging.getLogger("xig.test").info("plain line")
        logging.getLogger("xig.test").debug("not shown")
    text = stream.getvalue()
    assert "[urn:uuid:text-1]: plain line" in text and "INFO xig.test" in text and "not shown" not in text


async def test_one_message_id_correlates_both_sides_of_a_hop(config: Config, captured: io.StringIO) -> None:
    """XIG calling XIG: the initiating side's lines and the responding side's lines carry the same id."""
    from gateway.initiating.client import PartnerClient, open_soap_client
    from gateway.initiating.partners import Partner

    server = BackgroundServer(config, {XCA_QUERY.transaction: handler}).start()
    try:
        partner = Partner(name="Self", home_community_id=config.gateway.home_community_id,
                          xca_query_url=server.url + XCA_QUERY.path)
        async with open_soap_client(config) as soap:
            await PartnerClient(config, partner, soap).find_manifests(
                ebrim.format_cx("P1", config.gateway.assigning_authority))
    finally:
        server.stop()
    records = lines(captured)
    responder = [r for r in records if r.get("logger") == "xig.test.deep" and r.get("correlation_id")]
    assert responder, records
    sent = responder[0]["correlation_id"]
    initiator = [r for r in records if r.get("logger", "").startswith("httpx") and r.get("correlation_id") == sent]
    assert initiator and initiator[0].get("partner") == "Self" and initiator[0].get("transaction") == "ITI-38"
