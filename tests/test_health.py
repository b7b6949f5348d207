"""``/health`` over real TLS: database, PACS reachability, certificate expiry and added checks."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import create_engine

from gateway.config import load_config
from gateway.security.certs import CertSet, make_leaf, write_pem
from gateway.security.tls import client_context
from gateway.web.exchange import HealthResult
from gateway.web.health import CertificateCheck, DatabaseCheck, run_checks
from gateway.web.server import BackgroundServer
from tests.conftest import write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leaf(pki: CertSet, directory: Path, name: str, *, days: int, not_before: dt.datetime | None = None) -> Path:
    """A certificate from the test CA with the given validity window (key beside it)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    cert, key = make_leaf(ca_cert, ca_key, f"{name} (test)", "XIG Community A (test)",  # type: ignore[arg-type]
                          days=days, not_before=not_before)
    directory.mkdir(parents=True, exist_ok=True)
    write_pem(directory / f"{name}.crt", cert, key, directory / f"{name}.key")
    return directory / f"{name}.crt"


async def health(pki: CertSet, url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(verify=client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as http:
        r = await http.get(url + "/health")
    return r.status_code, r.json()


async def test_assembled_gateway_reports_database_pacs_and_certificates(tmp_path: Path, pki: CertSet) -> None:
    cfg = load_config(write_config(tmp_path / "gw", pki, extra='[database]\nurl = "sqlite:///xig.db"'))
    server = BackgroundServer(cfg).start()
    try:
        status, body = await health(pki, server.url)
    finally:
        server.stop()
    assert status == 200 and body["status"] == "ok"
    assert body["home_community_id"] == "urn:oid:2.999.1" and body["endpoints"]["RAD-75"] == "/ihe/xcai/retrieve"
    checks = body["checks"]
    assert set(checks) == {"database", "pacs:2.999.1.3", "certificate:server", "certificate:saml-signing", "audit"}
    assert checks["audit"]["status"] == "ok"
    assert all(c["status"] == "ok" for c in checks.values())
    assert checks["database"]["data"]["dialect"] == "sqlite"
    assert checks["pacs:2.999.1.3"]["data"]["backend"].startswith("filesystem:")
    assert checks["certificate:server"]["data"]["days_left"] > 700


async def test_unreachable_pacs_fails_health(tmp_path: Path, pki: CertSet) -> None:
    """A DIMSE PACS nobody listens for: C-ECHO cannot connect, /health answers 503 and says why."""
    pacs = f'[pacs]\nkind = "dimse"\nhost = "127.0.0.1"\nport = {free_port()}\ncalled_ae = "NOBODY"\n'
    path = write_config(tmp_path / "gw", pki, extra='[database]\nurl = "sqlite:///xig.db"')
    path.write_text(path.read_text().replace('[pacs]\nkind = "filesystem"\npath = "pacs"\n', pacs))
    server = BackgroundServer(load_config(path)).start()
    try:
        status, body = await health(pki, server.url)
    finally:
        server.stop()
    assert status == 503 and body["status"] == "fail"
    pacs_check = body["checks"]["pacs:2.999.1.3"]
    assert pacs_check["status"] == "fail" and "NOBODY@127.0.0.1" in pacs_check["detail"]
    assert "unreachable" in pacs_check["detail"]
    assert body["checks"]["database"]["status"] == "ok"


async def test_certificate_expiry_warns_then_fails(tmp_path: Path, pki: CertSet) -> None:
    """Server certificate 10 days from expiry → warn (still 200); an expired SAML signer → fail (503)."""
    soon = leaf(pki, tmp_path / "certs", "soon", days=10)
    now = dt.datetime.now(dt.UTC)
    expired = leaf(pki, tmp_path / "certs", "expired", days=30, not_before=now - dt.timedelta(days=40))
    text = write_config(tmp_path / "gw", pki).read_text()
    text = text.replace(f'certificate = "{pki.gateway_cert}"', f'certificate = "{soon}"')
    text = text.replace(f'private_key = "{pki.gateway_key}"', f'private_key = "{soon.with_suffix(".key")}"')
    (tmp_path / "gw" / "xig.toml").write_text(text)
    server = BackgroundServer(load_config(tmp_path / "gw" / "xig.toml"), {}).start()
    try:
        status, body = await health(pki, server.url)
    finally:
        server.stop()
    assert status == 200 and body["status"] == "warn"
    cert = body["checks"]["certificate:server"]
    assert cert["status"] == "warn" and "renew" in cert["detail"] and cert["data"]["days_left"] in (9, 10)

    text = text.replace(f'signing_certificate = "{pki.partner_cert}"', f'signing_certificate = "{expired}"')
    text = text.replace(f'signing_key = "{pki.partner_key}"', f'signing_key = "{expired.with_suffix(".key")}"')
    (tmp_path / "gw" / "xig.toml").write_text(text)
    server = BackgroundServer(load_config(tmp_path / "gw" / "xig.toml"), {}).start()
    try:
        status, body = await health(pki, server.url)
    finally:
        server.stop()
    assert status == 503 and body["status"] == "fail"
    saml = body["checks"]["certificate:saml-signing"]
    assert saml["status"] == "fail" and saml["detail"].startswith("expired on")


async def test_warn_window_follows_the_configuration(tmp_path: Path, pki: CertSet) -> None:
    cert = leaf(pki, tmp_path / "certs", "sixty", days=60)
    assert (await CertificateCheck("c", cert, 30).check()).status == "ok"
    assert (await CertificateCheck("c", cert, 90).check()).status == "warn"
    future = leaf(pki, tmp_path / "certs", "future", days=60, not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    result = await CertificateCheck("c", future, 30).check()
    assert result.status == "fail" and "not valid before" in result.detail
    missing = await CertificateCheck("c", tmp_path / "nope.crt", 30).check()
    assert missing.status == "fail" and "cannot read" in missing.detail


class Added:
    """A check the lead adds (e.g. the audit sink)."""

    def __init__(self, name: str, result: HealthResult | None = None, error: Exception | None = None) -> None:
        self.name, self.result, self.error = name, result, error
        self.hold = asyncio.Event()

    async def check(self) -> HealthResult:
        if self.error is not None:
            raise self.error
        if self.result is None:
            await self.hold.wait()  # never answers
        assert self.result is not None
        return self.result


async def test_added_checks_are_reported(tmp_path: Path, pki: CertSet) -> None:
    cfg = load_config(write_config(tmp_path / "gw", pki))
    added = [Added("audit", HealthResult("ok", "2 messages spooled", {"spool": 2}))]
    server = BackgroundServer(cfg, {}, health_checks=added).start()
    try:
        status, body = await health(pki, server.url)
    finally:
        server.stop()
    assert status == 200 and body["checks"]["audit"] == {"status": "ok", "detail": "2 messages spooled",
                                                         "data": {"spool": 2}}


async def test_broken_and_hanging_checks_fail_without_breaking_health() -> None:
    overall, checks = await run_checks([Added("boom", error=RuntimeError("sink gone")), Added("hangs"),
                                        Added("fine", HealthResult("warn", "almost full"))], timeout=0.5)
    assert overall == "fail"
    assert checks["boom"]["status"] == "fail" and "sink gone" in checks["boom"]["detail"]
    assert checks["hangs"]["status"] == "fail" and "no answer within 0.5 s" in checks["hangs"]["detail"]
    assert checks["fine"]["status"] == "warn"
    assert await run_checks([]) == ("ok", {})


@pytest.mark.parametrize("url", ["postgresql+psycopg://xig@127.0.0.1:{port}/xig?connect_timeout=5"])
async def test_database_check_reports_an_unreachable_database(url: str) -> None:
    engine = create_engine(url.format(port=free_port()))
    try:
        result = await DatabaseCheck(engine).check()
    finally:
        engine.dispose()
    assert result.status == "fail" and "database unavailable" in result.detail
    assert "127.0.0.1" in result.data["url"]
