"""ATNA audit delivery: RFC 5424 framing, and the durable trail delivering to a real rsyslogd over RFC 5425
(mutual TLS) and RFC 5426 (UDP) — through outages, restarts and refused certificates."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from gateway.audit import events as ev
from gateway.audit import syslog
from gateway.audit.model import AuditMessage, AuditSource
from gateway.audit.trail import PROBATION_SECONDS, SETTLE_SECONDS, AuditTrail
from gateway.audit.xml import parse, serialize, validate
from gateway.config import Config, load_config
from gateway.security.certs import CertSet
from gateway.store import tables
from gateway.store.audit import DELIVERED, FAILED, PENDING, AuditFilter, SqlAuditStore
from gateway.store.db import open_database
from tests.conftest import write_config
from tests.rsyslog import Rsyslog

SOURCE = AuditSource("XIG-TEST", enterprise_site_id="urn:oid:2.999.1")
BASE = dt.datetime(2026, 11, 22, 8, 0, 0, tzinfo=dt.UTC)
USER = ev.Requestor("Zoë<zoe.unal@idp.example.org>", "Zoë Ünal", "Hôpital A", "urn:oid:2.999.7", "urn:oid:2.999.7")
_serial = itertools.count()


def message(tag: str, *, query: bytes = b"<QueryByParameter/>", user: ev.Requestor | None = USER) -> AuditMessage:
    """A responding-gateway ITI-55 audit message about patient ``tag`` (unique time per message)."""
    ctx = ev.Context(side="responding", outcome=0, when=BASE + dt.timedelta(microseconds=next(_serial)),
                     source=SOURCE, initiator=ev.Peer("https://initiator.example.org/xcpd", "127.0.0.1"),
                     responder=ev.Peer("https://127.0.0.1:8443/ihe/xcpd", "localhost", "4242"), user=user)
    [m] = ev.iti55(ctx, query=query, home_community_id="urn:oid:2.999.7", patients=[f"{tag}^^^&2.999.1.1&ISO"],
                   query_id=f"q-{tag}")
    return m


# ------------------------------------------------------------------------------------------ framing


def test_frame_is_rfc5424_with_the_ihe_header() -> None:
    when = dt.datetime(2026, 1, 2, 4, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    framed = syslog.frame(b"<AuditMessage/>", hostname="gw.example.org", app_name="xig", procid="42", timestamp=when)
    assert framed == (b"<85>1 2026-01-02T03:04:05.123456Z gw.example.org xig 42 IHE+RFC-3881 - "
                      b"\xef\xbb\xbf<AuditMessage/>")
    assert syslog.frame(b"\xef\xbb\xbf<a/>", hostname="h", app_name="a", procid="1", timestamp=when, bom=False) \
        .endswith(b"IHE+RFC-3881 - <a/>")
    # header fields: PRINTUSASCII only, RFC length limits, NILVALUE when empty
    odd = syslog.frame(b"<a/>", hostname="my host\u00e9", app_name="x" * 60, procid="", timestamp=when)
    parsed = syslog.parse(odd)
    assert parsed.hostname == "my_host__" and parsed.app_name == "x" * 48 and parsed.procid == "-"
    with pytest.raises(syslog.SyslogFormatError, match="TIMESTAMP"):
        syslog.frame(b"<a/>", hostname="h", app_name="a", procid="1", timestamp="yesterday")


def test_parse_reads_back_every_field() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    m = syslog.parse(syslog.frame("<a b='é'/>".encode(), hostname="h", app_name="xig", procid="7", timestamp=when))
    assert (m.pri, m.facility, m.severity, m.version) == (85, 10, 5, 1)
    assert (m.hostname, m.app_name, m.procid, m.msgid, m.structured_data) == ("h", "xig", "7", "IHE+RFC-3881", "-")
    assert m.when == when and m.bom and m.msg == "<a b='é'/>".encode()
    sd = syslog.parse(b'<13>1 - - - - ID [ex@1 a="x\\]y" b="z"][more@1] hello')
    assert sd.structured_data == '[ex@1 a="x\\]y" b="z"][more@1]' and sd.msg == b"hello" and not sd.bom
    for bad, problem in ((b"hello", "header"), (b"<200>1 - - - - - - x", "PRI"),
                         (b"<13>1 2026-13 - - - - - x", "TIMESTAMP"), (b"<13>1 - - - - - [open x", "unterminated")):
        with pytest.raises(syslog.SyslogFormatError, match=problem):
            syslog.parse(bad)


def test_octet_counting_splits_a_stream_at_any_boundary() -> None:
    frames = [syslog.frame(f"<m n='{i}'>{'é' * i}</m>".encode(), hostname="h", app_name="a", procid="1",
                           timestamp=BASE) for i in range(20)]
    assert syslog.octet_count(b"hello") == b"5 hello"
    stream = b"".join(syslog.octet_count(f) for f in frames)
    reader = syslog.OctetCountedReader()
    got = [m for i in range(len(stream)) for m in reader.feed(stream[i:i + 1])]  # one byte at a time
    assert got == frames and reader.pending == 0
    with pytest.raises(syslog.SyslogFormatError, match="MSG-LEN"):
        syslog.OctetCountedReader().feed(b"0x12 <13>1")
    with pytest.raises(syslog.SyslogFormatError, match="exceeds"):
        syslog.OctetCountedReader(max_message=10).feed(b"11 ")


# ------------------------------------------------------------------------------------------ fixtures


def audit_config(directory: Path, pki: CertSet, repositories: list[dict[str, Any]], *, enabled: bool = True,
                 batch_size: int = 200, database: str = "sqlite:///xig.db") -> Config:
    repos = "".join("\n[[audit.repositories]]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in r.items())
                    for r in repositories)
    return load_config(write_config(directory, pki, extra=f"""
[database]
url = "{database}"

[audit]
enabled = {str(enabled).lower()}
retry_seconds = 0.1
batch_size = {batch_size}
{repos}"""))


def tls(rs: Rsyslog, **extra: Any) -> dict[str, Any]:
    return {"transport": "tls", "host": "127.0.0.1", "port": rs.tls_port, **extra}


def udp(rs: Rsyslog) -> dict[str, Any]:
    return {"transport": "udp", "host": "127.0.0.1", "port": rs.udp_port}


@pytest.fixture
def rsyslogs() -> Iterator[Callable[..., Rsyslog]]:
    """``rsyslogs(directory, certificate=..., private_key=..., client_ca=...)`` → a started rsyslogd."""
    started: list[Rsyslog] = []

    def make(directory: Path, *, start: bool = True, **kwargs: Any) -> Rsyslog:
        rs = Rsyslog(directory, **kwargs)
        started.append(rs)
        return rs.start() if start else rs

    yield make
    for rs in started:
        rs.stop()


@pytest.fixture
def rsyslog(tmp_path: Path, pki: CertSet, rsyslogs: Callable[..., Rsyslog]) -> Rsyslog:
    """rsyslogd with a certificate of our test CA, accepting clients of our test CA."""
    return rsyslogs(tmp_path / "rsyslog", certificate=pki.partner_cert, private_key=pki.partner_key,
                    client_ca=pki.ca_cert)


@pytest.fixture
def trails() -> Iterator[Callable[[Config], tuple[AuditTrail, Engine]]]:
    opened: list[tuple[AuditTrail, Engine]] = []

    def open_trail(cfg: Config) -> tuple[AuditTrail, Engine]:
        engine = open_database(cfg.database.url, cfg.base_dir)
        trail = AuditTrail.open(cfg, engine)
        opened.append((trail, engine))
        return trail, engine

    yield open_trail
    for trail, engine in opened:
        trail.close(1.0)
        engine.dispose()


def received_xml(rs: Rsyslog, input_name: str | None = None) -> Counter[bytes]:
    """The MSG (without BOM) of every audit message rsyslog stored, counted (duplicates show as > 1)."""
    return Counter(m.msg for r in rs.received() if input_name in (None, r.input)
                   for m in [r.parsed()] if m.msgid == syslog.MSGID)


def repo_status(trail: AuditTrail, index: int = 0) -> dict[str, Any]:
    status: dict[str, Any] = trail.status()["repositories"][index]
    return status


# ------------------------------------------------------------------------------------------ delivery


def test_tls_and_udp_repositories_receive_every_message_framed_and_valid(
        tmp_path: Path, pki: CertSet, rsyslog: Rsyslog, trails: Any) -> None:
    cfg = audit_config(tmp_path / "gw", pki, [tls(rsyslog), udp(rsyslog)])
    trail, engine = trails(cfg)
    big = message("BIG", query=b"<QueryByParameter>" + b"x" * 20_000 + b"</QueryByParameter>")  # > 8 KiB
    sent = [message(f"P{i}") for i in range(30)] + [big, message("ANON", user=None)]
    for m in sent:
        trail.record(m)
    assert trail.wait_idle(60), trail.status()

    expected = Counter(serialize(m) for m in sent)
    rsyslog.wait_for(lambda got: received_xml(rsyslog, "tls") == expected and received_xml(rsyslog, "udp") == expected)
    stored = {s.xml: s for s in SqlAuditStore(engine).query()}
    for r in rsyslog.received():
        frame = r.parsed()
        assert (frame.pri, frame.facility, frame.severity, frame.version) == (85, 10, 5, 1)
        assert (frame.msgid, frame.structured_data, frame.bom) == ("IHE+RFC-3881", "-", True)
        assert (frame.hostname, frame.app_name, frame.procid) == (trail.hostname, "xig", str(os.getpid()))
        validate(frame.msg)  # the DICOM audit message schema (+ IHE PurposeOfUse)
        assert parse(frame.msg) in sent
        record = stored[frame.msg]
        assert frame.when == record.recorded_at
        # what arrived is byte for byte the frame rebuilt from the store (so a re-send is identical)
        assert r.raw == syslog.frame(record.xml, hostname=trail.hostname, app_name="xig", procid=str(os.getpid()),
                                     timestamp=record.recorded_at)
        assert {d.repository: d.state for d in record.deliveries} == {
            f"tls://127.0.0.1:{rsyslog.tls_port}": DELIVERED, f"udp://127.0.0.1:{rsyslog.udp_port}": DELIVERED}
    for repo in trail.status()["repositories"]:
        assert repo["connected"] and repo["pending"] == 0 and repo["in_flight"] == 0
        assert repo["delivered"] == len(sent) and repo["last_error"] is None


def test_udp_never_sends_a_message_larger_than_a_datagram(
        tmp_path: Path, pki: CertSet, rsyslog: Rsyslog, trails: Any) -> None:
    cfg = audit_config(tmp_path / "gw", pki, [udp(rsyslog)])
    trail, engine = trails(cfg)
    huge = message("HUGE", query=b"<q>" + b"y" * 70_000 + b"</q>")  # base64 in the XML: ~93 KB
    small = [message("S1"), message("S2")]
    for m in (small[0], huge, small[1]):
        trail.record(m)
    assert trail.wait_idle(60), trail.status()
    rsyslog.wait_for(lambda got: received_xml(rsyslog) == Counter(serialize(m) for m in small))
    [big] = [s for s in SqlAuditStore(engine).query() if s.xml == serialize(huge)]
    [delivery] = big.deliveries
    assert delivery.state == FAILED and "UDP datagram" in delivery.last_error
    assert repo_status(trail)["pending"] == 0


def test_outage_loses_nothing_and_recording_never_waits(
        tmp_path: Path, pki: CertSet, rsyslog: Rsyslog, trails: Any) -> None:
    """Traffic flows, rsyslogd is stopped (SIGTERM) mid-traffic and started again: every message recorded
    arrives at least once (duplicates allowed, and countable because a re-sent frame is identical)."""
    cfg = audit_config(tmp_path / "gw", pki, [tls(rsyslog)], batch_size=50)
    trail, _ = trails(cfg)
    recorded: list[bytes] = []
    stop = threading.Event()

    def produce() -> None:
        for i in range(6000):
            if stop.is_set():
                return
            m = message(f"T{i}")
            trail.record(m)
            recorded.append(serialize(m))

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        rsyslog.wait_for(lambda got: len(got) >= 100)
        rsyslog.stop()  # SIGTERM while the producer keeps recording
        assert trail.wait_until(lambda s: not s["repositories"][0]["connected"], 30), trail.status()
        # recording while the repository is down completes (it only writes the local spool)
        during = [message(f"DOWN{i}") for i in range(20)]
        for m in during:
            trail.record(m)
            recorded.append(serialize(m))
        assert not rsyslog.running
        status = repo_status(trail)
        assert status["pending"] >= len(during) and status["last_error"]
        before = len(rsyslog.received())
        rsyslog.start()
        rsyslog.wait_for(lambda got: len(got) > before + 100)
    finally:
        stop.set()
        producer.join()
    assert trail.wait_idle(120), trail.status()

    got = received_xml(rsyslog)
    missing = [x for x in recorded if x not in got]
    assert not missing, f"{len(missing)} of {len(recorded)} recorded messages never arrived"
    duplicates = sum(got.values()) - len(got)
    assert set(got) == set(recorded) and sum(got.values()) == len(recorded) + duplicates
    down = {serialize(m) for m in during}
    for xml_bytes in got:  # what arrived after the outage is still valid (sampled: those recorded while down)
        if xml_bytes in down:
            validate(xml_bytes)
    print(f"{len(recorded)} recorded, {sum(got.values())} received, {duplicates} duplicates")


def test_messages_a_repository_acknowledged_but_lost_are_sent_again(
        tmp_path: Path, pki: CertSet, rsyslog: Rsyslog, trails: Any) -> None:
    """The repository's kernel acknowledges what we send but the process never reads it (frozen), then dies:
    the bytes were confirmed at the TCP level only, so the messages confirmed just before the connection
    broke are sent again after the reconnect."""
    cfg = audit_config(tmp_path / "gw", pki, [tls(rsyslog)])
    trail, _ = trails(cfg)
    warmup = message("WARM")
    trail.record(warmup)
    assert trail.wait_idle(30)
    rsyslog.pause()
    swallowed = [message(f"F{i}") for i in range(5)]
    for m in swallowed:
        trail.record(m)
    assert trail.wait_until(lambda s: s["repositories"][0]["delivered"] == 1 + len(swallowed), 30), trail.status()
    rsyslog.kill()  # with our messages unread in its socket buffer
    assert trail.wait_until(lambda s: not s["repositories"][0]["connected"], 30), trail.status()
    assert not any(serialize(m) in received_xml(rsyslog) for m in swallowed)
    rsyslog.start()
    assert trail.wait_idle(60), trail.status()
    rsyslog.wait_for(lambda got: all(serialize(m) in received_xml(rsyslog) for m in swallowed))


def test_a_restarted_process_delivers_the_backlog(
        tmp_path: Path, pki: CertSet, rsyslogs: Callable[..., Rsyslog], trails: Any) -> None:
    rs = rsyslogs(tmp_path / "rsyslog", start=False, certificate=pki.partner_cert, private_key=pki.partner_key,
                  client_ca=pki.ca_cert)
    cfg = audit_config(tmp_path / "gw", pki, [tls(rs)])
    first, engine = trails(cfg)
    backlog = [message(f"B{i}") for i in range(25)]
    for m in backlog:
        first.record(m)
    assert first.wait_until(lambda s: s["repositories"][0]["last_error"] is not None, 30)
    assert "refused" in repo_status(first)["last_error"] and repo_status(first)["pending"] == len(backlog)
    first.close(1.0)
    engine.dispose()

    rs.start()
    second, engine = trails(cfg)  # a new process: new engine, new trail, same database
    assert second.wait_idle(60), second.status()
    rs.wait_for(lambda got: received_xml(rs) == Counter(serialize(m) for m in backlog))
    assert all(d.state == DELIVERED for s in SqlAuditStore(engine).query() for d in s.deliveries)


def test_a_repository_with_an_untrusted_certificate_is_never_sent_to(
        tmp_path: Path, pki: CertSet, rogue_pki: CertSet, rsyslogs: Callable[..., Rsyslog], trails: Any) -> None:
    rs = rsyslogs(tmp_path / "rsyslog", certificate=rogue_pki.partner_cert, private_key=rogue_pki.partner_key,
                  client_ca=pki.ca_cert)
    cfg = audit_config(tmp_path / "gw", pki, [tls(rs)])
    trail, engine = trails(cfg)
    kept = [message(f"U{i}") for i in range(5)]
    for m in kept:
        trail.record(m)
    assert trail.wait_until(lambda s: s["repositories"][0]["last_error"] is not None, 30)
    status = repo_status(trail)
    assert "certificate was not accepted" in status["last_error"], status
    assert not status["connected"] and status["pending"] == len(kept) and status["delivered"] == 0
    assert received_xml(rs) == Counter()
    rows = list(SqlAuditStore(engine).query())
    assert len(rows) == len(kept) and all(d.state == PENDING and d.attempts == 0 for r in rows for d in r.deliveries)


def test_a_repository_refusing_our_certificate_gets_everything_once_it_trusts_us(
        tmp_path: Path, pki: CertSet, rogue_pki: CertSet, rsyslogs: Callable[..., Rsyslog], trails: Any) -> None:
    """With TLS 1.3 our side finishes the handshake before the repository judges our certificate: what we
    wrote is not confirmed until the connection stayed healthy, so the refusal's alert keeps it spooled."""
    refusing = rsyslogs(tmp_path / "refusing", certificate=pki.partner_cert, private_key=pki.partner_key,
                        client_ca=rogue_pki.ca_cert)
    cfg = audit_config(tmp_path / "gw", pki, [tls(refusing)])
    trail, _ = trails(cfg)
    kept = [message(f"R{i}") for i in range(5)]
    for m in kept:
        trail.record(m)
    # on failure: what the trail and the repository saw (this wait ran out in rare full-suite runs: a refusal
    # that reset our bytes before they were acknowledged — see the test of a repository closing at once)
    assert trail.wait_until(lambda s: s["repositories"][0]["last_error"] is not None, 30), (
        f"trail status: {json.dumps(trail.status(), default=str)}\nrepository log:\n{refusing.log()}")
    assert repo_status(trail)["pending"] == len(kept) and repo_status(trail)["delivered"] == 0
    assert received_xml(refusing) == Counter()
    refusing.stop()

    trusting = rsyslogs(tmp_path / "trusting", certificate=pki.partner_cert, private_key=pki.partner_key,
                        client_ca=pki.ca_cert, tls_port=refusing.tls_port, udp_port=refusing.udp_port)
    assert trail.wait_idle(60), trail.status()
    trusting.wait_for(lambda got: received_xml(trusting) == Counter(serialize(m) for m in kept))


class LateRefusal:
    """A repository that accepts our TLS 1.3 handshake and refuses us ``delay`` seconds later — the refusal of a
    busy repository checking our certificate: it closes each connection without reading a byte of it (the
    kernel answers the unread data with a reset). A real TLS server on loopback, one thread per connection."""

    def __init__(self, pki: CertSet, delay: float, *, tls12: bool = False) -> None:
        from gateway.security.tls import server_context
        from tests.rsyslog import free_port

        self.context = server_context(pki.partner_cert, pki.partner_key, pki.ca_cert)
        if tls12:  # the client's handshake ends only with our Finished: a close right after it precedes its data
            self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.delay = delay
        self.port = free_port()
        self.handshakes = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> LateRefusal:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._refuse_later, args=(raw,), daemon=True).start()

    def _refuse_later(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            tls = self.context.wrap_socket(raw, server_side=True)  # the handshake completes: we are "accepted"
            self.handshakes += 1
            self._stop.wait(self.delay)  # judging the certificate takes this long; nothing is read meanwhile
            tls.close()
        except (OSError, ssl.SSLError):
            raw.close()


def test_a_repository_refusing_us_after_the_settle_time_still_gets_everything(
        tmp_path: Path, pki: CertSet, rsyslogs: Callable[..., Rsyslog], trails: Any) -> None:
    """A refusal slower than SETTLE_SECONDS but within PROBATION_SECONDS of the handshake: nothing a new
    connection carried counts as delivered before the connection has proved itself, so nothing is lost."""
    assert SETTLE_SECONDS < 0.5 < PROBATION_SECONDS
    _kept_until_trusted(LateRefusal(pki, delay=0.5), [message(f"L{i}") for i in range(5)], tmp_path, pki, rsyslogs,
                        trails)


def test_a_repository_closing_before_our_messages_arrive_is_noticed(
        tmp_path: Path, pki: CertSet, rsyslogs: Callable[..., Rsyslog], trails: Any) -> None:
    """A repository that closes each connection as soon as its handshake is done (TLS 1.2: before our first
    message can arrive) answers our messages with a reset. The kernel never counts reset bytes as
    acknowledged (SIOCOUTQ stays non-zero): waiting for the acknowledgement alone waited forever, with the
    messages in flight and no error (the cause of a rare full-suite failure of the refusal test above)."""
    # one message: a second write would already fail on the reset
    _kept_until_trusted(LateRefusal(pki, delay=0, tls12=True), [message("C1")], tmp_path, pki, rsyslogs, trails)


def _kept_until_trusted(refusing: LateRefusal, kept: list[AuditMessage], tmp_path: Path, pki: CertSet,
                        rsyslogs: Callable[..., Rsyslog], trails: Any) -> None:
    """``refusing`` breaks every connection: the trail reports it and keeps ``kept`` pending; then a
    repository that trusts us, on the same port, receives all of them."""
    with refusing:
        cfg = audit_config(tmp_path / "gw", pki, [{"transport": "tls", "host": "127.0.0.1", "port": refusing.port}])
        trail, _ = trails(cfg)
        for m in kept:
            trail.record(m)
        assert trail.wait_until(lambda s: s["repositories"][0]["last_error"] is not None, 30), trail.status()
        status = repo_status(trail)
        assert refusing.handshakes >= 1 and status["delivered"] == 0 and status["pending"] == len(kept), status
    trusting = rsyslogs(tmp_path / "trusting", certificate=pki.partner_cert, private_key=pki.partner_key,
                        client_ca=pki.ca_cert, tls_port=refusing.port)
    assert trail.wait_idle(60), trail.status()
    trusting.wait_for(lambda got: received_xml(trusting) == Counter(serialize(m) for m in kept))


def test_a_database_failure_keeps_messages_in_memory_until_it_is_back(
        tmp_path: Path, pki: CertSet, rsyslog: Rsyslog, trails: Any) -> None:
    cfg = audit_config(tmp_path / "gw", pki, [tls(rsyslog)])
    trail, engine = trails(cfg)
    first = [message("D1"), message("D2")]
    for m in first:
        trail.record(m)
    assert trail.wait_idle(30)
    with engine.begin() as conn:  # the spool table disappears under the running trail
        conn.execute(text("ALTER TABLE audit_messages RENAME TO audit_messages_away"))
    held = [message(f"H{i}") for i in range(3)]
    for m in held:
        trail.record(m)  # never raises
    status = trail.status()
    assert status["memory_queue"] == len(held) and status["database_error"], status
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_messages_away RENAME TO audit_messages"))
    assert trail.wait_idle(30), trail.status()
    assert trail.status()["database_error"] is None and trail.status()["dropped"] == 0
    rsyslog.wait_for(lambda got: received_xml(rsyslog) == Counter(serialize(m) for m in first + held))
    with engine.connect() as conn:  # stored in recording order
        assert [bytes(x) for (x,) in conn.execute(select(tables.audit_messages.c.xml)
                                                  .order_by(tables.audit_messages.c.id))] == \
            [serialize(m) for m in first + held]


def test_record_never_raises_and_a_disabled_trail_records_nothing(
        tmp_path: Path, pki: CertSet, trails: Any) -> None:
    trail, engine = trails(audit_config(tmp_path / "on", pki, []))
    naive = AuditMessage(event_id=ev.EV_QUERY, action="E", outcome=0, when=dt.datetime(2026, 1, 1),
                         source=SOURCE, participants=())
    trail.record(naive)  # cannot be serialised: logged and counted, not raised
    assert trail.status()["unserializable"] == 1
    trail.record(message("LOCAL"))
    [only] = list(SqlAuditStore(engine).query())
    assert only.deliveries == () and only.summary.patients == ("LOCAL^^^&2.999.1.1&ISO",)

    off, off_engine = trails(audit_config(tmp_path / "off", pki, [], enabled=False))
    off.record(message("NOPE"))
    assert off.status() == {"enabled": False, "repositories": []}
    assert list(SqlAuditStore(off_engine).query(AuditFilter())) == []


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "sqlite:///xig.db"
    return str(request.getfixturevalue("pg_url"))


def test_workers_sharing_a_spool_deliver_each_message_once(
        tmp_path: Path, pki: CertSet, rsyslog: Rsyslog, trails: Any, database: str) -> None:
    cfg = audit_config(tmp_path / "gw", pki, [tls(rsyslog)], database=database)
    a, _ = trails(cfg)
    b, _ = trails(cfg)  # a second worker process on the same database
    sent = [message(f"W{i}") for i in range(40)]
    for i, m in enumerate(sent):
        (a if i % 2 else b).record(m)
    assert a.wait_idle(60) and b.wait_idle(60), (a.status(), b.status())
    assert [repo_status(a)["delivering"], repo_status(b)["delivering"]].count(True) == 1
    rsyslog.wait_for(lambda got: len(received_xml(rsyslog)) == len(sent))
    assert received_xml(rsyslog) == Counter(serialize(m) for m in sent)  # each exactly once


def test_store_filters_on_both_databases(tmp_path: Path, pki: CertSet, trails: Any, database: str) -> None:
    trail, engine = trails(audit_config(tmp_path / "gw", pki, [], database=database))
    other = ev.Requestor("bob<bob@idp.b.example>", "Bob", "Clinic B", "urn:oid:2.999.8", "urn:oid:2.999.8")
    sent = [message("A1"), message("B2", user=other), message("A1_%")]
    for m in sent:
        trail.record(m)
    store = SqlAuditStore(engine)

    def ids(**filters: Any) -> list[str]:
        return [s.summary.patients[0].split("^")[0] for s in store.query(AuditFilter(**filters))]

    assert ids() == ["A1", "B2", "A1_%"]
    assert ids(patient="A1") == ["A1"] and ids(patient="A1_%^^^&2.999.1.1&ISO") == ["A1_%"]
    assert ids(user="ZOË<") == ["A1", "A1_%"] and ids(user="%") == [] and ids(user="bob@IDP") == ["B2"]
    assert ids(since=BASE + dt.timedelta(days=1)) == [] and ids(since=BASE, event="ITI-55") == ["A1", "B2", "A1_%"]
    assert ids(community="2.999.7") == ids(community="urn:oid:2.999.7") == ["A1", "B2", "A1_%"]
    newest = [s.summary.patients[0].split("^")[0] for s in store.query(limit=2, newest_first=True, page=1)]
    assert newest == ["A1_%", "B2"]
