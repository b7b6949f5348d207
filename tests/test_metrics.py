"""Observability hooks over real mutual TLS: exchange observers, TLS failure reports and ``/metrics``."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from lxml import etree
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Config, load_config
from gateway.errors import WSSE_INVALID_SECURITY
from gateway.ihe import ebrim, iti38
from gateway.pacs.dimse import DimseBackend
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom, ns
from gateway.web.app import RequestContext, SoapResponse
from gateway.web.client import SoapClient, TransportError
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE
from gateway.web.exchange import Exchange, TlsFailure
from gateway.web.metrics import Metrics
from gateway.web.server import BackgroundServer
from tests.conftest import write_config
from tests.orthanc import OrthancServer
from tests.test_gateway_e2e import retrieve_request
from tests.test_shutdown import Recorder

RS_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
PART = 256 * 1024


# -- handlers ---------------------------------------------------------------------------------------
async def query(ctx: RequestContext) -> SoapResponse:
    partner = ctx.exchange.partner if ctx.exchange is not None else None
    resp = etree.Element(ns.q(ns.QUERY, "AdhocQueryResponse"), nsmap={"query": ns.QUERY, "rim": ns.RIM},
                         status=RS_SUCCESS, requestId=str(partner))
    etree.SubElement(resp, ns.q(ns.RIM, "RegistryObjectList"))
    return SoapResponse(resp)


def retrieve_response(n: int) -> etree._Element:
    resp = etree.Element(ns.q(ns.XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": ns.XDSB, "rs": ns.RS})
    etree.SubElement(resp, ns.q(ns.RS, "RegistryResponse"), status=RS_SUCCESS)
    for i in range(n):
        dr = etree.SubElement(resp, ns.q(ns.XDSB, "DocumentResponse"))
        for tag, text in (("HomeCommunityId", "urn:oid:2.999.1"), ("RepositoryUniqueId", "2.999.1.2"),
                          ("DocumentUniqueId", f"1.2.3.{i}"), ("mimeType", "application/octet-stream")):
            etree.SubElement(dr, ns.q(ns.XDSB, tag)).text = text
        etree.SubElement(etree.SubElement(dr, ns.q(ns.XDSB, "Document")), ns.q(ns.XOP, "Include"),
                         href=f"cid:p{i}@xig", nsmap={"xop": ns.XOP})
    return resp


class Streamer:
    """ITI-39 stand-in streaming ``parts`` parts of 256 KiB with the root part last; knows when it was closed."""

    def __init__(self, parts: int) -> None:
        self.parts = parts
        self.closed = threading.Event()

    async def __call__(self, ctx: RequestContext) -> SoapResponse:
        async def gen() -> AsyncIterator[mtom.Part]:
            try:
                for i in range(self.parts):
                    yield mtom.Part(f"p{i}@xig", "application/octet-stream", bytes([i % 251]) * PART)
            finally:
                self.closed.set()

        return SoapResponse(None, gen(), body_after=lambda: retrieve_response(self.parts))


def client(pki: CertSet) -> SoapClient:
    return SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert))


def find_documents() -> etree._Element:
    return iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("PAT-1", "2.999.1.1")))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and wanted <= ls)


async def scrape(pki: CertSet, url: str) -> tuple[httpx.Response, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    async with httpx.AsyncClient(verify=client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as http:
        r = await http.get(url + "/metrics")
    return r, samples(r.text) if r.status_code == 200 else {}


@pytest.fixture
def observed(config: Config) -> Any:
    recorder = Recorder()

    def broken(exchange: Exchange) -> None:
        raise RuntimeError("an observer bug")

    streamer = Streamer(8)
    server = BackgroundServer(config, {XCA_QUERY.transaction: query, XCA_RETRIEVE.transaction: streamer},
                              observers=[broken, recorder]).start()
    yield server, recorder, streamer
    server.stop()


# -- exchange observers ----------------------------------------------------------------------------
async def test_each_exchange_observed_once_with_its_details(observed: Any, config: Config, pki: CertSet) -> None:
    server, recorder, _ = observed
    url = server.url + XCA_QUERY.path
    async with client(pki) as c:
        data, ctype, mid = SoapClient.encode_request(url, find_documents(), XCA_QUERY.request_action,
                                                     security=security_header(config, url))
        ok = await c.post(url, data, ctype, mid)
        unsigned = await c.call(url, find_documents(), XCA_QUERY.request_action)  # no wsse:Security
        garbage = await c.post(url, b"not xml", "application/soap+xml", "urn:uuid:raw")
        rurl = server.url + XCA_RETRIEVE.path
        streamed = await c.call(rurl, retrieve_request("1.2.3"), XCA_RETRIEVE.request_action,
                                security=security_header(config, rurl), use_mtom=True)
    assert ok.fault is None and unsigned.fault is not None and garbage.fault is not None and streamed.fault is None
    exchanges = await recorder.wait(4)
    assert len(exchanges) == 4  # exactly once each, although the first observer always raises

    good = exchanges[0]
    assert good.transaction == "ITI-38" and good.message_id == mid and good.outcome == "ok"
    assert good.envelope is not None and good.envelope.addressing.message_id == mid
    assert good.identity is not None and good.identity.home_community_id == config.gateway.home_community_id
    assert good.fault is None and etree.QName(good.response_body).localname == "AdhocQueryResponse"
    assert good.response_body.get("requestId") == good.partner  # the handler saw the same exchange
    assert good.bytes_in == len(data) and good.bytes_out > 0 and good.completed and good.http_status == 200
    assert good.peer_host == "127.0.0.1" and isinstance(good.peer_port, int)
    assert good.client_certificate is not None and good.partner.startswith("XIG Partner (test) (")
    assert good.started_at.tzinfo is dt.UTC and good.finished is not None and good.duration >= 0

    sec = exchanges[1]
    assert sec.outcome == "fault" and sec.fault is not None and sec.fault.subcode == WSSE_INVALID_SECURITY
    assert sec.envelope is not None and sec.message_id == unsigned.message_id and sec.identity is None
    assert unsigned.relates_to == unsigned.message_id  # the fault relates to the readable MessageID

    bad = exchanges[2]
    assert bad.outcome == "fault" and bad.envelope is None and bad.message_id is None and bad.completed
    assert exchanges[3].transaction == "ITI-39" and exchanges[3].outcome == "ok" and exchanges[3].bytes_out > 8 * PART


async def test_streamed_response_observed_after_last_byte(observed: Any, config: Config, pki: CertSet,
                                                          tmp_path: Path) -> None:
    """A root-last MTOM response: the exchange has the body built after streaming and every byte counted."""
    server, recorder, _ = observed
    url = server.url + XCA_RETRIEVE.path
    async with client(pki) as c:
        reply = await c.call(url, retrieve_request("1.2.3"), XCA_RETRIEVE.request_action,
                             security=security_header(config, url), use_mtom=True,
                             sink_factory=lambda _: mtom.FileSink(tmp_path))
    assert reply.fault is None and len(reply.attachments) == 8
    ex = (await recorder.wait(1))[0]
    assert ex.completed and ex.outcome == "ok" and ex.bytes_out > 8 * PART
    assert etree.QName(ex.response_body).localname == "RetrieveDocumentSetResponse"


async def test_client_gone_mid_stream_is_aborted_and_stream_closed(config: Config, pki: CertSet) -> None:
    recorder = Recorder()
    streamer = Streamer(400)  # 100 MiB: far more than the socket buffers hold
    server = BackgroundServer(config, {XCA_RETRIEVE.transaction: streamer}, observers=[recorder]).start()
    url = server.url + XCA_RETRIEVE.path
    data, ctype, _ = SoapClient.encode_request(url, retrieve_request("1.2.3"), XCA_RETRIEVE.request_action,
                                               security=security_header(config, url), use_mtom=True)
    ctx = client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)

    def read_a_little_and_vanish() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(f"POST {XCA_RETRIEVE.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            head = tls.recv(65536)
            tls.close()  # no close_notify, unread data: the client is simply gone
            return head

    try:
        head = await anyio.to_thread.run_sync(read_a_little_and_vanish)
        ex = (await recorder.wait(1))[0]
        assert await anyio.to_thread.run_sync(streamer.closed.wait, 30)  # the parts generator was closed
    finally:
        server.stop()
    assert head.startswith(b"HTTP/1.1 200")
    assert not ex.completed and ex.outcome == "aborted" and 0 < ex.bytes_out < 400 * PART
    assert ex.response_body is None  # the root part (sent last) never went out


# -- TLS failures -----------------------------------------------------------------------------------
class TlsRecorder:
    def __init__(self) -> None:
        self.items: list[TlsFailure] = []
        self._cond = threading.Condition()

    def __call__(self, failure: TlsFailure) -> None:
        with self._cond:
            self.items.append(failure)
            self._cond.notify_all()

    async def wait(self, n: int) -> list[TlsFailure]:
        def until() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.items) >= n, 30)

        assert await anyio.to_thread.run_sync(until), self.items
        return list(self.items)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_tls_handshake_failures_are_reported(config: Config, pki: CertSet, rogue_pki: CertSet,
                                                   loop_kind: str) -> None:
    """On both event loops XIG serves on: TLS takes over each connection before a byte is read."""
    config = config.model_copy(update={"server": config.server.model_copy(update={"event_loop": loop_kind})})
    failures = TlsRecorder()
    server = BackgroundServer(config, {XCA_QUERY.transaction: query}, tls_failure_observers=[failures]).start()
    url = server.url + XCA_QUERY.path
    try:
        # 0. a bare TCP probe (load balancer health check): connects and closes, sends nothing — not a failure
        socket.create_connection(("127.0.0.1", server.port)).close()
        # 1. a client certificate from a CA we do not trust
        async with SoapClient(client_context(rogue_pki.partner_cert, rogue_pki.partner_key, pki.ca_cert)) as c:
            with pytest.raises(TransportError):
                await c.call(url, find_documents(), XCA_QUERY.request_action, security=security_header(config, url))
        first = (await failures.wait(1))[0]
        # 2. no client certificate at all
        async with SoapClient(client_context(None, None, pki.ca_cert)) as c:
            with pytest.raises(TransportError):
                await c.call(url, find_documents(), XCA_QUERY.request_action, security=security_header(config, url))
        second = (await failures.wait(2))[1]
        # 3. not TLS at all (plain HTTP to the TLS port)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)
        third = (await failures.wait(3))[2]
        async with client(pki) as c:  # the server keeps serving
            reply = await c.call(url, find_documents(), XCA_QUERY.request_action, security=security_header(config, url))
            assert reply.fault is None
        _, metrics = await scrape(pki, server.url)
    finally:
        server.stop()
    for f in (first, second, third):
        assert f.peer_host == "127.0.0.1" and isinstance(f.peer_port, int) and f.when.tzinfo is dt.UTC
    assert "CERTIFICATE_VERIFY_FAILED" in first.reason and "unable to get local issuer" in first.reason
    assert "CERTIFICATE" in second.reason  # PEER_DID_NOT_RETURN_A_CERTIFICATE
    assert third.reason in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER")
    assert value(metrics, "xig_tls_handshake_failures_total") == 3
    assert len(failures.items) == 3  # the bare probe was not reported


# -- /metrics ----------------------------------------------------------------------------------------
async def test_metrics_endpoint(observed: Any, config: Config, pki: CertSet) -> None:
    server, recorder, _ = observed
    url = server.url + XCA_QUERY.path
    async with client(pki) as c:
        data, ctype, mid = SoapClient.encode_request(url, find_documents(), XCA_QUERY.request_action,
                                                     security=security_header(config, url))
        await c.post(url, data, ctype, mid)
        await c.call(url, find_documents(), XCA_QUERY.request_action)  # unsigned: fault
    exchanges = await recorder.wait(2)
    partner = exchanges[0].partner
    metrics: Metrics = server.metrics
    metrics.set_gauge_callback("xig_audit_spool_depth", "audit messages waiting", lambda: 7)
    metrics.set_gauge_callback("xig_test_per_sink", "per sink", lambda: {"a": 1, "b": 2}, labels=("sink",))
    metrics.observe_outbound("ITI-55", "Community B", "ok", 0.25)
    r, m = await scrape(pki, server.url)
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert value(m, "xig_requests_total", transaction="ITI-38", partner=partner, outcome="ok") == 1
    assert value(m, "xig_requests_total", transaction="ITI-38", outcome="fault") == 1
    assert value(m, "xig_request_duration_seconds_count", transaction="ITI-38", outcome="ok") == 1
    assert value(m, "xig_request_bytes_total", transaction="ITI-38", direction="in") >= len(data)
    assert value(m, "xig_request_bytes_total", transaction="ITI-38", direction="out") > 0
    assert value(m, "xig_soap_faults_total", transaction="ITI-38", subcode="wsse:InvalidSecurity") == 1
    assert value(m, "xig_requests_in_flight", transaction="ITI-38") == 0
    assert value(m, "xig_audit_spool_depth") == 7
    assert value(m, "xig_test_per_sink", sink="b") == 2
    assert value(m, "xig_outbound_requests_total", transaction="ITI-55", partner="Community B", outcome="ok") == 1
    assert value(m, "xig_build_info") == 1
    metrics.set_gauge_callback("xig_audit_spool_depth", "audit messages waiting", lambda: 3)  # replaced, not doubled
    assert value(samples(metrics.render().decode()), "xig_audit_spool_depth") == 3


async def test_pacs_metrics_on_the_responding_gateway(tmp_path: Path, pki: CertSet) -> None:
    """The assembled gateway meters its PACS: a query's find_studies and /health's ping show up."""
    cfg = load_config(write_config(tmp_path / "gw", pki, extra='[database]\nurl = "sqlite:///xig.db"'))
    server = BackgroundServer(cfg).start()
    url = server.url + XCA_QUERY.path
    try:
        async with client(pki) as c:
            reply = await c.call(url, find_documents(), XCA_QUERY.request_action, security=security_header(cfg, url))
            assert reply.fault is None
        async with httpx.AsyncClient(verify=client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as http:
            assert (await http.get(server.url + "/health")).status_code == 200
        _, m = await scrape(pki, server.url)
    finally:
        server.stop()
    assert value(m, "xig_pacs_request_duration_seconds_count", operation="find_studies", outcome="ok") >= 1
    assert value(m, "xig_pacs_request_duration_seconds_count", operation="ping", outcome="ok") == 1
    assert value(m, "xig_pacs_requests_in_flight") == 0
    assert any(n == "xig_pacs_open_associations" for n, _ in m)


async def test_metrics_can_be_switched_off(tmp_path: Path, pki: CertSet) -> None:
    cfg = load_config(write_config(tmp_path / "gw", pki, extra="[observability]\nmetrics = false\n"))
    recorder = Recorder()
    server = BackgroundServer(cfg, {XCA_QUERY.transaction: query}, observers=[recorder]).start()
    try:
        r, _ = await scrape(pki, server.url)
        async with client(pki) as c:
            url = server.url + XCA_QUERY.path
            await c.call(url, find_documents(), XCA_QUERY.request_action, security=security_header(cfg, url))
        assert (await recorder.wait(1))[0].outcome == "ok"  # observers work without metrics
    finally:
        server.stop()
    assert r.status_code == 404 and server.metrics is None


def test_registries_are_independent_and_pacs_calls_timed() -> None:
    one, two = Metrics(), Metrics()
    with one.pacs_call("pacs-a", "find_studies"):
        pass
    with pytest.raises(ConnectionError), two.pacs_call("pacs-a", "retrieve"):
        raise ConnectionError("PACS went away")
    a, b = samples(one.render().decode()), samples(two.render().decode())
    assert value(a, "xig_pacs_request_duration_seconds_count", outcome="ok") == 1
    assert value(a, "xig_pacs_request_duration_seconds_count", outcome="error") == 0
    assert value(b, "xig_pacs_request_duration_seconds_count", operation="retrieve", outcome="error") == 1
    assert value(b, "xig_pacs_request_duration_seconds_count", outcome="ok") == 0
    assert value(b, "xig_pacs_requests_in_flight", backend="pacs-a") == 0


async def test_dimse_open_associations_gauge(orthanc: OrthancServer) -> None:
    backend = DimseBackend(host="127.0.0.1", port=orthanc.dicom_port, source_id="2.999.9", called_ae=orthanc.aet)
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        from pynetdicom.sop_class import Verification

        with backend._association([(Verification, ["1.2.840.10008.1.2"])]):
            inside.set()
            release.wait(30)

    task = asyncio.create_task(anyio.to_thread.run_sync(hold))
    assert await anyio.to_thread.run_sync(inside.wait, 30)
    assert backend.open_associations == 1
    release.set()
    await task
    assert backend.open_associations == 0
    await backend.ping()
    assert backend.open_associations == 0


def test_tls_failure_metric_label_is_the_openssl_reason() -> None:
    """TlsFailure.reason starts with OpenSSL's reason name: the metric label is that token."""
    m = Metrics()
    m.observe_tls_failure(TlsFailure("127.0.0.1", 1, "CERTIFICATE_VERIFY_FAILED: unable to get local issuer",
                                     dt.datetime.now(dt.UTC)))
    assert value(samples(m.render().decode()), "xig_tls_handshake_failures_total",
                 reason="CERTIFICATE_VERIFY_FAILED") == 1
