"""Foundation benchmarks.

* MTOM streaming: 200 MB as 4 attachment parts from a RAD-75-shaped handler, through the whole
  gateway pipeline (mTLS, signed XUA request, MTOM encode, streaming MTOM decode to files) versus
  the same bytes streamed as plain ``application/octet-stream`` over the same TLS stack — httpx on
  :func:`gateway.web.netbackend.loop_tls_transport`, as the SOAP client — (reference).
* XUA verification: verify one signed assertion (xmlsec + wrapping checks + attributes) versus a
  bare RSA-2048/SHA-256 signature verification (reference).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench.common import Result, rate, workspace
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.security.wssecurity import verify_security_header
from gateway.soap import mtom, ns
from gateway.web.app import RequestContext, SoapResponse, verification_policy
from gateway.web.client import SoapClient
from gateway.web.endpoints import XCAI_RETRIEVE
from gateway.web.netbackend import loop_tls_transport
from gateway.web.server import BackgroundServer, _Server, bind, uvicorn_config

PARTS = 4
PART = 50 * 1024 * 1024
CHUNK = 1024 * 1024
BLOCK = bytes(range(256)) * (CHUNK // 256)


async def _chunks() -> AsyncIterator[bytes]:
    for _ in range(PART // CHUNK):
        yield BLOCK


async def _imaging(ctx: RequestContext) -> SoapResponse:
    resp = etree.Element(ns.q(ns.XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": ns.XDSB, "rs": ns.RS})
    etree.SubElement(resp, ns.q(ns.RS, "RegistryResponse"),
                     status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success")

    async def parts() -> AsyncIterator[mtom.Part]:
        for i in range(PARTS):
            yield mtom.Part(f"p{i}@bench", "application/dicom", _chunks())

    for i in range(PARTS):
        dr = etree.SubElement(resp, ns.q(ns.XDSB, "DocumentResponse"))
        for tag, text in (("HomeCommunityId", "urn:oid:2.999.1"), ("RepositoryUniqueId", "2.999.1.3"),
                          ("DocumentUniqueId", f"1.2.3.{i}"), ("mimeType", "application/dicom")):
            etree.SubElement(dr, ns.q(ns.XDSB, tag)).text = text
        doc = etree.SubElement(dr, ns.q(ns.XDSB, "Document"))
        etree.SubElement(doc, ns.q(ns.XOP, "Include"), href=f"cid:p{i}@bench", nsmap={"xop": ns.XOP})
    return SoapResponse(resp, parts())


async def _reference_route(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(PARTS):
            async for c in _chunks():
                yield c
    return StreamingResponse(body(), media_type="application/octet-stream")


def _rad75_request() -> etree._Element:
    body = etree.Element(ns.q(ns.XDSI, "RetrieveImagingDocumentSetRequest"), nsmap={"xdsi": ns.XDSI, "xdsb": ns.XDSB})
    series = etree.SubElement(etree.SubElement(body, ns.q(ns.XDSI, "StudyRequest"), studyInstanceUID="1.2"),
                              ns.q(ns.XDSI, "SeriesRequest"), seriesInstanceUID="1.2.1")
    dr = etree.SubElement(series, ns.q(ns.XDSB, "DocumentRequest"))
    for tag, text in (("HomeCommunityId", "urn:oid:2.999.1"), ("RepositoryUniqueId", "2.999.1.3"),
                      ("DocumentUniqueId", "1.2.3.0")):
        etree.SubElement(dr, ns.q(ns.XDSB, tag)).text = text
    etree.SubElement(etree.SubElement(body, ns.q(ns.XDSI, "TransferSyntaxUIDList")),
                     ns.q(ns.XDSI, "TransferSyntaxUID")).text = "1.2.840.10008.1.2.1"
    return body


def mtom_streaming() -> Result:
    d, certs, cfg = workspace()
    ctx = client_context(certs.partner_cert, certs.partner_key, certs.ca_cert)
    total = PARTS * PART
    gw = BackgroundServer(cfg, {XCAI_RETRIEVE.transaction: _imaging}).start()
    sock = bind("127.0.0.1", 0)
    ref_server = _Server(uvicorn_config(cfg, Starlette(routes=[Route("/blob", _reference_route)])))
    t = threading.Thread(target=lambda: asyncio.run(ref_server.serve(sockets=[sock])), daemon=True)
    t.start()
    ref_server.ready.wait(30)
    ref_url = f"https://127.0.0.1:{sock.getsockname()[1]}/blob"

    async def reference() -> float:
        out = Path(tempfile.mkdtemp(dir=d)) / "blob"
        async with httpx.AsyncClient(transport=loop_tls_transport(ctx)) as http:  # the SOAP client's TLS stack
            t0 = time.perf_counter()
            async with http.stream("GET", ref_url) as r:
                with out.open("wb") as f:
                    async for c in r.aiter_raw():
                        f.write(c)
            return total / (time.perf_counter() - t0)

    async def through_gateway() -> float:
        url = gw.url + XCAI_RETRIEVE.path
        out = Path(tempfile.mkdtemp(dir=d))
        async with SoapClient(ctx) as c:
            t0 = time.perf_counter()
            reply = await c.call(url, _rad75_request(), XCAI_RETRIEVE.request_action, use_mtom=True,
                                 security=security_header(cfg, url), sink_factory=lambda _: mtom.FileSink(out))
            assert reply.fault is None and len(reply.attachments) == PARTS
            return total / (time.perf_counter() - t0)

    try:
        ref = max(asyncio.run(reference()) for _ in range(3))
        xig = max(asyncio.run(through_gateway()) for _ in range(3))
    finally:
        gw.stop()
        ref_server.should_exit = True
        t.join(30)
        shutil.rmtree(d, ignore_errors=True)
    mb = 1024 * 1024
    return Result("MTOM 200 MB over mTLS (gateway / plain TLS stream)", xig / mb, ref / mb, "MB/s")


def xua_verify() -> Result:
    _, _, cfg = workspace()
    policy = verification_policy(cfg)
    header = security_header(cfg, "https://x/ihe/xca/query")
    n = 300
    xig = rate(n, lambda: [verify_security_header(header, policy, now=dt.datetime.now(dt.UTC)) for _ in range(n)])
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = etree.tostring(header)
    sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    pub = key.public_key()
    ref = rate(n, lambda: [pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256()) for _ in range(n)])
    return Result("XUA assertion verification (full checks / bare RSA verify)", xig, ref, "ops/s")


def run() -> list[Result]:
    return [mtom_streaming(), xua_verify()]


if __name__ == "__main__":
    for r in run():
        print(f"{r.name}: {r.value:.1f} {r.unit} vs {r.reference:.1f} {r.unit} → ratio {r.ratio:.2f}")
