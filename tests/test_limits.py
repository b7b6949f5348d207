"""Concurrency limits over real TLS: a flood gets busy answers at once, the admitted requests complete.

The flood runs against the real RAD-75 pipeline (embedded PACS behind a gate, spool, ledger); the
per-transaction busy answers are checked against handlers held by the same gate.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from gateway.config import Config, LimitsSection, load_config
from gateway.errors import XIG_BUSY
from gateway.ihe import iti38, iti39, iti55, rad75
from gateway.ihe.iti39 import DocumentRequest
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.security.certs import CertSet, make_leaf, write_pem
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import ns
from gateway.soap.fault import parse_fault
from gateway.web.app import RequestContext, SoapResponse
from gateway.web.client import SoapClient, SoapReply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCPD
from gateway.web.limits import ConcurrencyLimiter, Rejection, Ticket
from gateway.web.server import BackgroundServer
from tests.conftest import write_config
from tests.test_shutdown import (
    BUSY,
    HCID,
    Gate,
    Recorder,
    authorize,
    imaging_gateway,
    partner_client,
    rad75_call,
    spooled,
)

RS_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


def second_partner(pki: CertSet, directory: Path) -> tuple[Path, Path]:
    """Another partner gateway certificate under the same (trusted) CA."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    cert, key = make_leaf(ca_cert, ca_key, "Second Partner (test)", "XIG Community C (test)")  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    write_pem(directory / "c.crt", cert, key, directory / "c.key")
    return directory / "c.crt", directory / "c.key"


async def until_done(tasks: list[asyncio.Task[Any]], n: int) -> list[asyncio.Task[Any]]:
    """Wait until ``n`` of ``tasks`` finished; return the finished ones."""
    while sum(t.done() for t in tasks) < n:
        await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)
    return [t for t in tasks if t.done()]


def busy_or_success(reply: SoapReply) -> str:
    """``Success``, or ``busy`` for either busy form (XDSRepositoryBusy; a xig:Busy fault during a flood)."""
    if reply.fault is not None:
        assert reply.fault.subcode == XIG_BUSY and reply.http_status == 500
        return "busy"
    res = rad75.parse_response(reply.body, reply.attachments)
    if res.status.endswith(":Success"):
        return "Success"
    assert [e.code for e in res.errors] == [BUSY]
    return "busy"


def busy_errors(reply: SoapReply) -> list[Any]:
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":Failure") and res.documents == []
    return res.errors


async def test_rad75_flood_gets_busy_answers_admitted_ones_complete(tmp_path: Path, pki: CertSet) -> None:
    recorder = Recorder()
    cfg, server, gate, study = imaging_gateway(
        tmp_path, pki, limits="max_concurrent_retrievals = 3\nmax_concurrent_retrievals_per_partner = 3",
        observers=[recorder])
    rss_before = psutil.Process().memory_info().rss
    try:
        async with partner_client(pki) as client:
            items = await authorize(client, cfg, server.url)
            flood = [asyncio.create_task(rad75_call(client, cfg, server.url, items)) for _ in range(9)]  # 3x the limit
            await gate.arrivals(3)
            refused = await until_done(flood, 6)
            assert len(refused) == 6 and gate.arrived == 3  # answered at once, never reached the PACS
            for task in refused:
                errors = busy_errors(task.result())
                assert [e.code for e in errors] == [BUSY]
                assert "3 concurrent retrievals in total" in errors[0].context and "retry in 5 s" in errors[0].context
                assert HCID in (errors[0].location or "")
            gate.open()
            for task in flood:
                if task not in refused:
                    reply = await task
                    res = rad75.parse_response(reply.body, reply.attachments)
                    assert res.status.endswith(":Success") and len(res.documents) == len(study.instances)
            # a bigger flood: each refusal costs a few KiB, the process does not grow with it
            more = [asyncio.create_task(rad75_call(client, cfg, server.url, items)) for _ in range(120)]
            replies = await asyncio.gather(*more)
            outcomes = [busy_or_success(r) for r in replies]
            assert set(outcomes) <= {"Success", "busy"} and "Success" in outcomes and "busy" in outcomes
            # still serving normally afterwards
            res = rad75.parse_response((await rad75_call(client, cfg, server.url, items)).body)
            assert res.status.endswith(":Success")
    finally:
        gate.open()
        server.stop()
    growth = psutil.Process().memory_info().rss - rss_before
    assert growth < 150 * 1024 * 1024, f"RSS grew by {growth / 1e6:.0f} MB during the flood"
    busy = [e for e in recorder.items if e.outcome == "busy"]
    assert len(busy) >= 6 and {e.rejected for e in busy} == {"retrievals"}
    assert server.gateway.limiter.total == 0 and server.gateway.limiter.retrievals == 0  # every ticket returned
    assert spooled(cfg) == []


async def test_partner_limit_leaves_other_partners_served(tmp_path: Path, pki: CertSet) -> None:
    cfg, server, gate, study = imaging_gateway(
        tmp_path, pki, limits="max_concurrent_retrievals = 10\nmax_concurrent_retrievals_per_partner = 2")
    other_cert, other_key = second_partner(pki, tmp_path / "c")
    try:
        async with partner_client(pki) as a, partner_client(pki, other_cert, other_key) as c:
            items = await authorize(a, cfg, server.url)
            flood = [asyncio.create_task(rad75_call(a, cfg, server.url, items)) for _ in range(4)]
            await gate.arrivals(2)
            refused = await until_done(flood, 2)
            for task in refused:
                errors = busy_errors(task.result())
                assert [e.code for e in errors] == [BUSY] and "from your gateway" in errors[0].context
            other = asyncio.create_task(rad75_call(c, cfg, server.url, items))  # partner C has its own budget
            await gate.arrivals(3)
            gate.open()
            for task in [*[t for t in flood if t not in refused], other]:
                reply = await task
                res = rad75.parse_response(reply.body, reply.attachments)
                assert res.status.endswith(":Success") and len(res.documents) == len(study.instances)
    finally:
        gate.open()
        server.stop()


# -- busy answers per transaction ------------------------------------------------------------------
def held_handlers(gate: Gate) -> dict[str, Any]:
    async def query(ctx: RequestContext) -> SoapResponse:
        await gate.pass_()
        return SoapResponse(iti38.build_response([], return_type="LeafClass", home_community_id=HCID))

    return {XCA_QUERY.transaction: query}


def xcpd_request() -> etree._Element:
    body, _ = iti55.build_request(
        PatientDemographics(names=(PersonName(family=("Busy",), given=("Bea",)),), gender="F", birth_time="19800101"),
        sender_device_id="2.999.2", home_community_id="urn:oid:2.999.2", receiver_device_id="2.999.1",
        assigning_authority="2.999.2.1", local_patient_id="REMOTE-1")
    return body


async def test_busy_answers_per_transaction(tmp_path: Path, pki: CertSet) -> None:
    cfg = load_config(write_config(tmp_path / "gw", pki, extra="[limits]\nmax_concurrent_requests = 1\n"))
    gate = Gate()
    server = BackgroundServer(cfg, held_handlers(gate)).start()
    url = server.url
    try:
        async with partner_client(pki) as client:
            async def call(path: str, body: etree._Element, action: str, **kw: Any) -> SoapReply:
                return await client.call(url + path, body, action, security=security_header(cfg, url + path), **kw)

            first = asyncio.create_task(call(XCA_QUERY.path, iti38.build_query(
                iti38.find_documents_for_kos("P^^^&2.999.1.1&ISO")), XCA_QUERY.request_action))
            await gate.arrivals(1)

            # ITI-38: AdhocQueryResponse Failure + XDSRegistryBusy
            reply = await call(XCA_QUERY.path, iti38.build_query(iti38.find_documents_for_kos("P^^^&2.999.1.1&ISO")),
                               XCA_QUERY.request_action)
            assert reply.fault is None and reply.http_status == 200 and reply.relates_to == reply.message_id
            res = iti38.parse_response(reply.body)
            assert res.status.endswith(":Failure") and [e.code for e in res.errors] == ["XDSRegistryBusy"]

            # ITI-55: Case 5 — AE / AE with DetectedIssueManagement ResponderBusy, echoing our query
            reply = await call(XCPD.path, xcpd_request(), XCPD.request_action)
            assert reply.fault is None and reply.action == XCPD.response_action
            result = iti55.parse_response(reply.body)
            assert result.ack_code == "AE" and result.query_response_code == "AE"
            assert result.issue_codes == ("ResponderBusy",) and result.status == "error"

            # ITI-39 (raw, to see the headers): RetrieveDocumentSetResponse Failure + XDSRepositoryBusy, Retry-After
            path = url + XCA_RETRIEVE.path
            data, ctype, mid = SoapClient.encode_request(
                path, iti39.build_request([DocumentRequest(HCID, "2.999.1.2", "1.2.3")]), XCA_RETRIEVE.request_action,
                security=security_header(cfg, path), use_mtom=True)
            ctx = client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)
            async with httpx.AsyncClient(verify=ctx) as http:
                r = await http.post(path, content=data, headers={"content-type": ctype})
                assert r.status_code == 200 and r.headers["retry-after"] == "5"
                assert r.headers["content-type"].startswith("multipart/related")
                reply = await client.post(path, data, ctype, mid)
                res39 = iti39.parse_response(reply.body, reply.attachments)
                assert [e.code for e in res39.errors] == ["XDSRepositoryBusy"] and reply.relates_to == mid
                # not even SOAP: a Receiver fault xig:Busy, HTTP 500 (SOAP 1.2 Part 2 Table 20), Retry-After
                r = await http.post(url + XCA_QUERY.path, content=b"not xml at all",
                                    headers={"content-type": "application/soap+xml"})
                assert r.status_code == 500 and r.headers["retry-after"] == "5"
                fault = parse_fault(etree.fromstring(r.content).find(f"{{{ns.SOAP12}}}Body")[0])
                assert fault is not None and fault.code == "Receiver" and fault.subcode == XIG_BUSY
                assert "retry in 5 s" in fault.reason

            gate.open()
            reply = await first
            assert reply.fault is None and iti38.parse_response(reply.body).status == RS_SUCCESS
            # the slot is free again
            reply = await call(XCA_QUERY.path, iti38.build_query(iti38.find_documents_for_kos("P^^^&2.999.1.1&ISO")),
                               XCA_QUERY.request_action)
            assert iti38.parse_response(reply.body).status == RS_SUCCESS
    finally:
        gate.open()
        server.stop()


def test_limiter_counts_and_releases() -> None:
    lim = ConcurrencyLimiter(LimitsSection(max_concurrent_requests=3, max_concurrent_per_partner=2,
                                           max_concurrent_retrievals=2, max_concurrent_retrievals_per_partner=1))
    a1 = lim.admit("a", retrieval=True)
    assert isinstance(a1, Ticket)
    assert lim.admit("a", retrieval=True) == Rejection("partner-retrievals", 1, 5)
    a2 = lim.admit("a", retrieval=False)
    assert isinstance(a2, Ticket)
    assert lim.admit("a", retrieval=False) == Rejection("partner", 2, 5)
    b1 = lim.admit("b", retrieval=True)
    assert isinstance(b1, Ticket)
    assert lim.admit("c", retrieval=False) == Rejection("global", 3, 5)
    a1.release()
    a1.release()  # idempotent
    assert (lim.total, lim.retrievals, dict(lim.per_partner)) == (2, 1, {"a": 1, "b": 1})
    c1 = lim.admit("c", retrieval=True)
    assert isinstance(c1, Ticket)
    assert lim.admit("d", retrieval=True) in (Rejection("global", 3, 5), Rejection("retrievals", 2, 5))
    for t in (a2, b1, c1):
        t.release()
    assert (lim.total, lim.retrievals, dict(lim.per_partner), dict(lim.retrievals_per_partner)) == (0, 0, {}, {})


@pytest.mark.parametrize("scope,text", [("global", "requests in total"), ("partner-retrievals", "from your gateway"),
                                        ("shutdown", "shutting down")])
def test_rejection_reasons(scope: Any, text: str) -> None:
    reason = Rejection(scope, 4, 7).reason
    assert reason.startswith("responder busy") and text in reason and "retry in 7 s" in reason


def test_config_retry_after(tmp_path: Path, pki: CertSet) -> None:
    cfg: Config = load_config(write_config(tmp_path, pki, extra="[limits]\nretry_after_seconds = 30\n"))
    assert cfg.limits.retry_after_seconds == 30
