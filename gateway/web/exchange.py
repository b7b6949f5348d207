"""The hooks through which audit, metrics and health see the gateway (pure types, no I/O).

Exchanges
    Every SOAP POST becomes one :class:`Exchange`. When the response was completely sent — or the
    client went away, the stream broke, or a shutdown aborted it — each :class:`ExchangeObserver`
    given to :class:`gateway.web.app.GatewayApp` (``observers=``; also accepted by ``create_app``,
    :class:`gateway.web.server.GatewayServer`, :class:`~gateway.web.server.BackgroundServer` and
    :func:`gateway.web.server.serve`) is called *exactly once* with it, in the serving event loop.
    Observers are synchronous and must be cheap (queue work elsewhere); an exception from one is
    logged and swallowed, the others still run.
    Streaming responses (RAD-75, ITI-39) are observed after their last byte, so ``bytes_out``,
    ``completed`` and, for the root-last RAD-75 layout, ``response_body`` are final.

TLS failures
    A handshake that fails (no client certificate, an untrusted or expired one, a protocol version
    or cipher we refuse, plain HTTP, a handshake timeout, a connection reset during the handshake)
    is reported as a :class:`TlsFailure` to every ``tls_failure_observers`` callable of ``serve`` /
    ``GatewayServer`` / ``BackgroundServer``. A connection closed without a TLS alert during the
    handshake (port probes, load balancer checks) is not a failure and is only logged at debug level.

Lifecycle
    ``lifecycle_observers`` of ``serve`` / ``GatewayServer`` / ``BackgroundServer`` get ``"started"``
    once the server accepts connections, ``"stopping"`` when a graceful stop begins (the listener is
    closed by then) and ``"stopped"`` after the last connection closed and the backends were released
    (also after a failed start).

Health
    ``/health`` runs every :class:`HealthCheck` of the app concurrently and answers JSON, HTTP 200
    when none failed ("warn" counts as healthy) and 503 otherwise. Built-in checks live in
    :mod:`gateway.web.health`.

All observer callables are called from the serving thread's event loop (TLS failures and lifecycle
events too); a callable that needs to do I/O should hand the event to its own queue or thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from cryptography import x509
from lxml import etree

from gateway.errors import SoapFault
from gateway.security.saml import VerifiedIdentity
from gateway.soap.envelope import Envelope
from gateway.web.endpoints import Endpoint

__all__ = ["Exchange", "ExchangeObserver", "HealthCheck", "HealthResult", "HealthStatus", "LifecycleEvent",
           "LifecycleObserver", "Outcome", "TlsFailure", "TlsFailureObserver", "notify"]

log = logging.getLogger("xig.web")

#: ``ok``: answered normally (registry-level errors inside a normal response included); ``fault``: a SOAP
#: fault was sent; ``busy``: refused by a concurrency limit (or a shutdown) with busy semantics;
#: ``aborted``: the response was not completely sent (client gone, stream broke, shutdown timeout).
Outcome = Literal["ok", "fault", "busy", "aborted"]


@dataclass
class Exchange:
    """One SOAP POST as seen by the gateway."""

    endpoint: Endpoint
    #: ``time.monotonic()`` when the request arrived / when the response was sent or failed
    started: float
    #: wall-clock UTC time the request arrived
    started_at: dt.datetime
    peer_host: str | None
    peer_port: int | None
    #: the verified TLS client certificate (None only without TLS, e.g. in-process ASGI tests)
    client_certificate: x509.Certificate | None
    #: the label used for metrics and limits (:func:`gateway.web.limits.partner_label`)
    partner: str
    finished: float | None = None
    #: the request's wsa:MessageID, once read (also the correlation id of the log lines)
    message_id: str | None = None
    #: the parsed request; None when it could not be parsed (or was refused before parsing)
    envelope: Envelope | None = None
    #: the verified XUA identity; None when verification did not happen or failed
    identity: VerifiedIdentity | None = None
    #: the SOAP fault sent back, if any
    fault: SoapFault | None = None
    #: the response body element (for root-last RAD-75: the one built after streaming); None with a fault
    response_body: etree._Element | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    #: the response was completely handed to the connection (False: client gone, stream broke, aborted)
    completed: bool = False
    http_status: int | None = None
    #: set when a concurrency limit refused the request: ``global``, ``partner``, ``retrievals``,
    #: ``partner-retrievals`` — or ``shutdown`` when a stopping server answered busy
    rejected: str | None = None

    @property
    def transaction(self) -> str:
        return self.endpoint.transaction

    @property
    def duration(self) -> float:
        """Seconds from arrival to the end of the response (so far, while it is still running)."""
        return (self.finished if self.finished is not None else time.monotonic()) - self.started

    @property
    def outcome(self) -> Outcome:
        if not self.completed:
            return "aborted"
        if self.rejected is not None:
            return "busy"
        if self.fault is not None:
            return "fault"
        return "ok"


class ExchangeObserver(Protocol):
    def __call__(self, exchange: Exchange) -> None: ...


@dataclass(frozen=True)
class TlsFailure:
    """A TLS handshake that failed before any HTTP was exchanged."""

    peer_host: str | None
    peer_port: int | None
    #: the OpenSSL reason (e.g. ``TLSV1_ALERT_UNKNOWN_CA``, ``PEER_DID_NOT_RETURN_A_CERTIFICATE``,
    #: ``CERTIFICATE_VERIFY_FAILED: ...``, ``UNSUPPORTED_PROTOCOL``) or a sentence for timeouts/resets
    reason: str
    #: wall-clock UTC time of the failure
    when: dt.datetime


TlsFailureObserver = Callable[[TlsFailure], None]
LifecycleEvent = Literal["started", "stopping", "stopped"]
LifecycleObserver = Callable[[LifecycleEvent], None]

HealthStatus = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class HealthResult:
    status: HealthStatus
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)


class HealthCheck(Protocol):
    """One line of ``/health``: ``name`` is its key in the JSON answer."""

    @property
    def name(self) -> str: ...

    async def check(self) -> HealthResult: ...


_T = TypeVar("_T")


def notify(observers: Iterable[Callable[[_T], None]], value: _T, what: str) -> None:
    """Call every observer with ``value``; an exception is logged and swallowed."""
    for observer in observers:
        try:
            observer(value)
        except Exception:  # noqa: BLE001 - an observer must never break the request path
            log.exception("%s observer %r failed", what, observer)
