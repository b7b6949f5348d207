"""The benchmarks' own machinery: the lean receiving client of ``bench.rad75`` and the thin partners of
``bench.initiating`` (no timing is asserted: the figures are the benchmarks' job).

The receiving client must deliver exactly the bytes a server sent and refuse a truncated answer, or the
RAD-75 figures would count bytes that never arrived. The thin XCPD partners must do the real mutual TLS
handshake and check the first request each of them gets with XIG's complete inbound pipeline, or the
fan-out figure would be measured against partners that accept anything.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
from pathlib import Path

import anyio
import pytest

from bench.initiating import DEMOGRAPHICS, STATION_HCID, PartnerFarm, gateway_toml, partner_hcid, partner_toml
from bench.rad75 import Forwarder, http_request, read_answer, receive
from gateway.config import Config, load_config
from gateway.errors import WSSE_INVALID_SECURITY
from gateway.ihe import iti55
from gateway.initiating.client import PartnerClient, open_soap_client
from gateway.initiating.partners import PartnerDirectory
from gateway.security.certs import CertSet
from gateway.security.tls import client_context
from gateway.web.client import SoapClient, TransportError
from gateway.web.endpoints import XCPD
from gateway.web.server import BackgroundServer


def test_read_answer_dechunks_and_refuses_a_truncated_answer(tmp_path: Path) -> None:
    answer = tmp_path / "answer"
    answer.write_bytes(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=b\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, headers, chunks = read_answer(answer)
    assert status == 200 and headers["content-type"] == "multipart/related; boundary=b"
    assert b"".join(chunks) == b"hello world"

    answer.write_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part")  # the server went away
    _, _, chunks = read_answer(answer)
    with pytest.raises(RuntimeError, match="ended early"):
        b"".join(chunks)


def test_receive_writes_the_whole_answer_over_mutual_tls(config: Config, pki: CertSet, tmp_path: Path) -> None:
    ctx = client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)
    with BackgroundServer(config, {}) as server:
        url = server.url + "/health"
        request = http_request("GET", url, {"Accept": "application/json"})
        got = receive(url, request, tmp_path / "answer", ctx)
        dropped = receive(url, request, None, ctx)  # the same answer, counted and dropped
    status, headers, chunks = read_answer(tmp_path / "answer")
    body = json.loads(b"".join(chunks))
    assert got.seconds > 0 and status == 200 and headers["content-type"] == "application/json"
    assert body["home_community_id"] == config.gateway.home_community_id
    assert got.size == (tmp_path / "answer").stat().st_size
    assert abs(dropped.size - got.size) < 64 and dropped.seconds > 0  # only the Date header's digits may differ


def test_thin_partners_do_mutual_tls_and_check_each_first_request(pki: CertSet, tmp_path: Path) -> None:
    (tmp_path / "farm").mkdir()
    with PartnerFarm(tmp_path / "farm", pki.directory, "light") as farm:
        (tmp_path / "ig").mkdir()
        (tmp_path / "ig" / "xig.toml").write_text(gateway_toml(STATION_HCID, pki, extra="".join(
            partner_toml(f"partner-{i:02d}", partner_hcid(i), farm.urls[i], timeout=10) for i in (3, 5))))
        cfg = load_config(tmp_path / "ig" / "xig.toml")
        directory = PartnerDirectory.from_config(cfg)
        three, five = (directory.lookup(f"partner-{i:02d}") for i in (3, 5))
        assert three is not None and five is not None and three.xcpd_url and five.xcpd_url

        async def exchanges() -> None:
            body, _ = iti55.build_request(DEMOGRAPHICS, sender_device_id=STATION_HCID,
                                          home_community_id=STATION_HCID, receiver_device_id=three.hcid_oid,
                                          receiver_home_community_id=three.home_community_id)
            # partner 3's first request carries no assertion: XIG's inbound checks refuse it
            async with open_soap_client(cfg) as soap:
                reply = await soap.call(three.xcpd_url, body, XCPD.request_action)
                assert reply.fault is not None and reply.fault.subcode == WSSE_INVALID_SECURITY
                # partner 5's first request is XIG's own, signed: checked in full and answered NF
                outcome = await PartnerClient(cfg, five, soap).discover(DEMOGRAPHICS, local_patient_id="T-1")
                assert outcome.status == "no-match" and outcome.home_community_id == partner_hcid(5)
                assert outcome.warnings == ()  # acknowledgement/targetMessage is our message id
            # no client certificate: the handshake is refused
            async with SoapClient(client_context(None, None, pki.ca_cert)) as bare:
                with pytest.raises(TransportError):
                    await bare.call(three.xcpd_url, body, XCPD.request_action)

        anyio.run(exchanges)


class _Upstream(socketserver.ThreadingTCPServer):
    """A plain-HTTP server answering every GET with ``head`` + ``body``, then closing (Orthanc's WADO-RS framing)."""

    daemon_threads = True

    def __init__(self, head: bytes, body: bytes) -> None:
        self.answer = head + body
        self.requests: list[bytes] = []
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)


class _UpstreamHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: _Upstream = self.server  # type: ignore[assignment]
        request = b""
        while not request.endswith(b"\r\n\r\n") and (line := self.rfile.readline()):
            request += line
        server.requests.append(request)
        self.wfile.write(server.answer)


@pytest.mark.parametrize("framing", ["close", "content-length"])
def test_the_bare_forwarder_passes_the_upstream_body_on_unchanged(pki: CertSet, tmp_path: Path, framing: str) -> None:
    """The forwarder's figure counts only bytes it really carried: exactly the upstream's body, over mutual TLS;
    an upstream answer it cannot frame (here: with a Content-Length) ends the client's answer early instead."""
    body = os.urandom(3 * 1024 * 1024 + 17)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=x\r\n"
            + (b"Content-Length: %d\r\n" % len(body) if framing == "content-length" else b"") + b"\r\n")
    upstream = _Upstream(head, body)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{upstream.server_address[1]}/dicom-web/studies/1.2.3"
        ctx = client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)
        with Forwarder(pki, url, accept="multipart/related") as fwd:
            for _ in range(2):  # and again: one upstream request per request
                receive(fwd.url, http_request("POST", fwd.url, {}, b"x"), tmp_path / "answer", ctx)
                status, _, chunks = read_answer(tmp_path / "answer")
                if framing == "close":
                    assert status == 200 and b"".join(chunks) == body
                else:
                    with pytest.raises(RuntimeError, match="ended early"):
                        b"".join(chunks)
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert len(upstream.requests) == 2
    assert upstream.requests[0].startswith(b"GET /dicom-web/studies/1.2.3 HTTP/1.1\r\n")
    assert b"\r\nAccept: multipart/related\r\n" in upstream.requests[0]
