"""Prometheus metrics (``GET /metrics``, text format), one registry per :class:`Metrics` object.

Each app gets its own ``CollectorRegistry`` so two gateways in one process (tests, the demo) never
mix their numbers. Metric names are prefixed ``xig_``:

==========================================  =========  ========================================================
``xig_requests_total``                      counter    SOAP requests answered, by ``transaction``, ``partner``,
                                                       ``outcome`` (``ok``, ``fault``, ``busy``, ``aborted``)
``xig_request_duration_seconds``            histogram  arrival → last byte sent, by ``transaction``, ``outcome``
``xig_request_bytes_total``                 counter    bytes received (``direction="in"``) and streamed back
                                                       (``"out"``), by ``transaction``, ``partner``
``xig_requests_in_flight``                  gauge      admitted requests not yet finished, by ``transaction``
``xig_busy_rejections_total``               counter    requests refused by a limit, by ``transaction``, ``limit``
``xig_soap_faults_total``                   counter    faults sent, by ``transaction``, ``subcode``
``xig_tls_handshake_failures_total``        counter    failed handshakes, by ``reason``
``xig_pacs_request_duration_seconds``       histogram  PACS calls, by ``backend``, ``operation``, ``outcome``
``xig_pacs_requests_in_flight``             gauge      PACS calls running, by ``backend``
``xig_pacs_open_associations``              gauge      open DIMSE associations, by ``backend`` (callback)
``xig_outbound_requests_total``             counter    requests XIG sent to partners (:meth:`observe_outbound`)
``xig_outbound_request_duration_seconds``   histogram  their duration, by ``transaction``, ``outcome``
``xig_build_info``                          gauge      1, with the ``version`` label
==========================================  =========  ========================================================

Other code adds gauges computed on scrape with :meth:`Metrics.set_gauge_callback` (e.g. the audit
spool depth).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import gateway
from gateway.web.exchange import Exchange, TlsFailure

__all__ = ["GaugeValue", "Metrics"]

log = logging.getLogger("xig.metrics")

#: seconds: from a cached XCPD answer (ms) to a whole study over a slow link (minutes)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PACS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: what a gauge callback returns: one value, or values per label tuple (or per single label value)
GaugeValue = float | int | Mapping[str, float | int] | Mapping[tuple[str, ...], float | int]


class _CallbackGauge(Collector):
    def __init__(self, name: str, documentation: str, fn: Callable[[], GaugeValue], labels: Sequence[str]) -> None:
        self.name, self.documentation, self.fn, self.labels = name, documentation, fn, list(labels)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels or None)
        try:
            value = self.fn()
        except Exception:  # noqa: BLE001 - one broken callback must not break the whole scrape
            log.exception("metrics callback %s failed", self.name)
            return
        if isinstance(value, Mapping):
            for key, v in value.items():
                family.add_metric([key] if isinstance(key, str) else list(key), float(v))
        else:
            family.add_metric([], float(value))
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labels or None)


class Metrics:
    """The gateway's metrics; also an :class:`~gateway.web.exchange.ExchangeObserver` (call it with an exchange)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("xig_requests_total", "SOAP requests answered", ["transaction", "partner", "outcome"],
                                registry=r)
        self.duration = Histogram("xig_request_duration_seconds", "SOAP request duration, arrival to last byte",
                                  ["transaction", "outcome"], buckets=REQUEST_BUCKETS, registry=r)
        self.bytes = Counter("xig_request_bytes_total", "SOAP bytes received (in) and sent (out)",
                             ["transaction", "partner", "direction"], registry=r)
        self.in_flight = Gauge("xig_requests_in_flight", "SOAP requests being processed", ["transaction"], registry=r)
        self.busy = Counter("xig_busy_rejections_total", "SOAP requests refused by a concurrency limit",
                            ["transaction", "limit"], registry=r)
        self.faults = Counter("xig_soap_faults_total", "SOAP faults sent", ["transaction", "subcode"], registry=r)
        self.tls_failures = Counter("xig_tls_handshake_failures_total", "failed TLS handshakes", ["reason"],
                                    registry=r)
        self.pacs_duration = Histogram("xig_pacs_request_duration_seconds", "PACS call duration",
                                       ["backend", "operation", "outcome"], buckets=PACS_BUCKETS, registry=r)
        self.pacs_in_flight = Gauge("xig_pacs_requests_in_flight", "PACS calls running", ["backend"], registry=r)
        self.outbound = Counter("xig_outbound_requests_total", "requests sent to partners",
                                ["transaction", "partner", "outcome"], registry=r)
        self.outbound_duration = Histogram("xig_outbound_request_duration_seconds", "requests sent to partners",
                                           ["transaction", "outcome"], buckets=REQUEST_BUCKETS, registry=r)
        Gauge("xig_build_info", "XIG version", ["version"], registry=r).labels(gateway.__version__).set(1)
        self._callbacks: dict[str, _CallbackGauge] = {}
        self._lock = threading.Lock()

    # -- observers --------------------------------------------------------------------------------
    def __call__(self, exchange: Exchange) -> None:
        """Record one finished SOAP exchange (this object is an exchange observer)."""
        tx, partner, outcome = exchange.transaction, exchange.partner, exchange.outcome
        self.requests.labels(tx, partner, outcome).inc()
        self.duration.labels(tx, outcome).observe(exchange.duration)
        self.bytes.labels(tx, partner, "in").inc(exchange.bytes_in)
        self.bytes.labels(tx, partner, "out").inc(exchange.bytes_out)
        if exchange.rejected is not None:
            self.busy.labels(tx, exchange.rejected).inc()
        if exchange.fault is not None:
            self.faults.labels(tx, str(exchange.fault.subcode or exchange.fault.code)).inc()

    def request_started(self, transaction: str) -> None:
        self.in_flight.labels(transaction).inc()

    def request_finished(self, transaction: str) -> None:
        self.in_flight.labels(transaction).dec()

    def observe_tls_failure(self, failure: TlsFailure) -> None:
        """A TLS failure observer (``tls_failure_observers=[metrics.observe_tls_failure]``)."""
        self.tls_failures.labels(failure.reason.split(":", 1)[0][:80]).inc()

    # -- public API for other code ----------------------------------------------------------------
    def observe_outbound(self, transaction: str, partner: str, outcome: str, seconds: float) -> None:
        """One request XIG sent to a partner (initiating side), e.g. ``("ITI-55", "Community B", "ok", 0.42)``."""
        self.outbound.labels(transaction, partner, outcome).inc()
        self.outbound_duration.labels(transaction, outcome).observe(seconds)

    @contextlib.contextmanager
    def pacs_call(self, backend: str, operation: str) -> Iterator[None]:
        """Time one PACS call: ``with metrics.pacs_call("dimse:ORTHANC@host:4242", "find_studies"): ...``.

        The outcome is ``error`` when the block raises, ``ok`` otherwise.
        """
        gauge = self.pacs_in_flight.labels(backend)
        gauge.inc()
        start = time.monotonic()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            gauge.dec()
            self.pacs_duration.labels(backend, operation, outcome).observe(time.monotonic() - start)

    def set_gauge_callback(self, name: str, documentation: str, fn: Callable[[], GaugeValue],
                           labels: Sequence[str] = ()) -> None:
        """A gauge whose value(s) ``fn`` computes at each scrape (e.g. the audit spool depth).

        ``fn`` returns a number, or — with ``labels`` — a mapping from label value(s) to numbers. It runs
        in the thread serving ``/metrics`` and must be cheap. Setting the same name again replaces it.
        ``name`` should start with ``xig_``.
        """
        with self._lock:
            old = self._callbacks.pop(name, None)
            if old is not None:
                self.registry.unregister(old)
            collector = _CallbackGauge(name, documentation, fn, labels)
            self.registry.register(collector)
            self._callbacks[name] = collector

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self.registry)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """``(body, content type)`` in the format the scraper's ``Accept`` header asks for (text 0.0.4 by default,
        OpenMetrics when asked)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
