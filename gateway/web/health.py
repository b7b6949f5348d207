"""``/health``: built-in checks (database, each PACS, certificate expiry) and how they are combined.

Every check runs concurrently with a time limit (:data:`CHECK_TIMEOUT`); one that raises or does not
answer in time is a ``fail`` naming why. The answer is::

    {"status": "ok" | "warn" | "fail", "version": ..., "home_community_id": ..., "endpoints": {...},
     "checks": {"database": {"status": "ok", "detail": "...", "data": {...}}, ...}}

with HTTP 200 unless a check failed (503). Certificates: ``warn`` when one expires within
``[observability] certificate_warn_days`` (30), ``fail`` when it has expired, is not valid yet or
cannot be read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
from cryptography import x509
from sqlalchemy import Engine, text

from gateway.config import Config
from gateway.pacs.base import PacsBackend
from gateway.web.exchange import HealthCheck, HealthResult, HealthStatus

__all__ = ["CHECK_TIMEOUT", "AuditCheck", "CertificateCheck", "DatabaseCheck", "PacsCheck", "builtin_checks",
           "certificate_checks", "run_checks"]

#: seconds a single check may take before it counts as failed
CHECK_TIMEOUT = 10.0


class DatabaseCheck:
    """``SELECT 1`` on the gateway's database."""

    name = "database"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def check(self) -> HealthResult:
        def probe() -> None:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        start = time.monotonic()
        try:
            await anyio.to_thread.run_sync(probe)
        except Exception as exc:  # noqa: BLE001 - any database failure is the answer
            return HealthResult("fail", f"database unavailable: {exc}".splitlines()[0],
                                {"url": self.engine.url.render_as_string(hide_password=True)})
        return HealthResult("ok", "database answers", {"dialect": self.engine.dialect.name,
                                                      "seconds": round(time.monotonic() - start, 4)})


class PacsCheck:
    """The PACS answers its cheapest request (C-ECHO, a one-result QIDO, the store folder readable)."""

    def __init__(self, backend: PacsBackend, label: str | None = None) -> None:
        self.backend = backend
        self.label = label or str(getattr(backend, "name", None) or backend.source_id)
        self.name = f"pacs:{backend.source_id}"

    async def check(self) -> HealthResult:
        start = time.monotonic()
        data: dict[str, Any] = {"backend": self.label, "source_id": self.backend.source_id}
        try:
            await self.backend.ping()
        except Exception as exc:  # noqa: BLE001 - PacsError or anything else: unreachable
            return HealthResult("fail", f"PACS {self.label} unreachable: {exc}", data)
        data["seconds"] = round(time.monotonic() - start, 4)
        return HealthResult("ok", f"PACS {self.label} answers", data)


class AuditCheck:
    """The audit trail: ``warn`` while messages wait for an unreachable repository (they are spooled, none
    is lost), ``fail`` when the audit store itself is unavailable or messages had to be dropped."""

    name = "audit"

    def __init__(self, trail: Any) -> None:  # gateway.audit.trail.AuditTrail (status() only)
        self.trail = trail

    async def check(self) -> HealthResult:
        status: dict[str, Any] = await anyio.to_thread.run_sync(self.trail.status)
        if not status.get("enabled", False):
            return HealthResult("ok", "audit disabled ([audit] enabled = false)", status)
        if status.get("database_error") or status.get("dropped"):
            return HealthResult("fail", f"audit store unavailable: {status.get('database_error')} "
                                        f"({status.get('dropped', 0)} messages dropped)", status)
        waiting = [r for r in status["repositories"] if r.get("last_error") and (r.get("pending") or 0) > 0]
        if waiting:
            return HealthResult("warn", "; ".join(f"{r['name']}: {r['pending']} messages spooled, {r['last_error']}"
                                                  for r in waiting), status)
        pending = sum(r.get("pending") or 0 for r in status["repositories"])
        return HealthResult("ok", f"{len(status['repositories'])} repositories, {pending} messages in flight",
                            status)


class CertificateCheck:
    """A PEM certificate's validity window (the first certificate of the file)."""

    def __init__(self, name: str, path: Path, warn_days: int, *, now: dt.datetime | None = None) -> None:
        self.name = name
        self.path = path
        self.warn_days = warn_days
        self._now = now

    async def check(self) -> HealthResult:
        try:
            cert = x509.load_pem_x509_certificate(await anyio.Path(self.path).read_bytes())
        except (OSError, ValueError) as exc:
            return HealthResult("fail", f"{self.path}: cannot read the certificate ({exc})", {"path": str(self.path)})
        now = self._now or dt.datetime.now(dt.UTC)
        not_after, not_before = cert.not_valid_after_utc, cert.not_valid_before_utc
        days = (not_after - now).total_seconds() / 86400
        data = {"path": str(self.path), "subject": cert.subject.rfc4514_string(),
                "not_before": not_before.isoformat(), "not_after": not_after.isoformat(), "days_left": int(days)}
        status: HealthStatus
        if now >= not_after:
            status, detail = "fail", f"expired on {not_after:%Y-%m-%d}"
        elif now < not_before:
            status, detail = "fail", f"not valid before {not_before:%Y-%m-%d}"
        elif days <= self.warn_days:
            status, detail = "warn", f"expires on {not_after:%Y-%m-%d}, in {int(days)} days: renew it"
        else:
            status, detail = "ok", f"valid until {not_after:%Y-%m-%d} ({int(days)} days)"
        return HealthResult(status, detail, data)


def certificate_checks(config: Config) -> list[HealthCheck]:
    """Server certificate, client certificate (when it is another file) and the SAML signing certificate."""
    warn = config.observability.certificate_warn_days
    checks: list[HealthCheck] = [CertificateCheck("certificate:server", config.server.certificate, warn)]
    if config.client_certificate != config.server.certificate:
        checks.append(CertificateCheck("certificate:client", config.client_certificate, warn))
    checks.append(CertificateCheck("certificate:saml-signing", config.saml.signing_certificate, warn))
    return checks


def builtin_checks(config: Config, *, engine: Engine | None = None,
                   backends: Sequence[PacsBackend] = ()) -> list[HealthCheck]:
    """Certificates, and the database and each PACS when given."""
    checks = certificate_checks(config)
    if engine is not None:
        checks.append(DatabaseCheck(engine))
    checks.extend(PacsCheck(b) for b in backends)
    return checks


async def _run_one(check: HealthCheck, timeout: float) -> HealthResult:
    try:
        return await asyncio.wait_for(check.check(), timeout)
    except TimeoutError:
        return HealthResult("fail", f"no answer within {timeout:g} s")
    except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, not a broken /health
        return HealthResult("fail", f"check failed: {type(exc).__name__}: {exc}")


async def run_checks(checks: Sequence[HealthCheck], timeout: float = CHECK_TIMEOUT,
                     ) -> tuple[HealthStatus, dict[str, dict[str, Any]]]:
    """Run every check concurrently; the overall status is the worst one (``ok`` with no checks)."""
    results = await asyncio.gather(*(_run_one(c, timeout) for c in checks))
    out: dict[str, dict[str, Any]] = {}
    for check, result in zip(checks, results, strict=True):
        name = check.name
        while name in out:  # two PACS with the same source id cannot exist, but stay unique anyway
            name += "'"
        out[name] = {"status": result.status, "detail": result.detail, "data": dict(result.data)}
    rank = {"ok": 0, "warn": 1, "fail": 2}
    worst: HealthStatus = max((r.status for r in results), key=rank.__getitem__, default="ok")
    return worst, out
