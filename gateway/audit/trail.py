"""The durable ATNA audit trail: record locally at once, deliver to the repositories in the background.

:meth:`AuditTrail.record` is what every audited code path calls. In the caller's thread it serialises the
message (:func:`gateway.audit.xml.serialize`), summarises it (:func:`gateway.audit.events.summarize`) and
inserts it into the database spool (:class:`~gateway.store.audit.SqlAuditStore`) with one pending delivery
per configured repository — then returns. It never raises and never waits for a repository: auditing must
not stop the application (ITI TF-2 3.20.4.1.2, "buffer locally when the repository is unreachable"). If the
database itself fails, the message waits in a bounded in-memory queue that a background thread keeps
writing to the database (errors are logged loudly; only when that queue is full is a message dropped, and
counted in :meth:`status`).

One delivery thread per repository drains that repository's pending rows in id order: it connects (TLS:
RFC 5425, UDP: RFC 5426, :mod:`gateway.audit.transport`), sends up to ``batch_size`` messages at a time,
wakes immediately when a message is recorded and, while the repository is unreachable, tries again every
``retry_seconds``. Several worker processes share one spool: a lease row per repository lets one of them
deliver at a time; a worker that dies loses the lease after :data:`LEASE_SECONDS`.

**Delivery semantics: at least once.** Syslog over TLS has no application acknowledgement, and a
``send()`` that returned only means the bytes reached our kernel: a repository stopped with data in its
socket buffer loses it silently from the sender's point of view. So a sent message stays *in flight* —
still ``pending`` in the database — until the connection proved it arrived:

1. the peer's TCP acknowledged every byte written so far (the socket's send queue, ``SIOCOUTQ``, is empty) —
   meanwhile the connection must stay healthy: bytes that met a reset are never acknowledged;
2. :data:`SETTLE_SECONDS` later the connection is still healthy: not closed, not reset, no TLS alert. A
   receiver that dies or shuts down with unread data closes the connection with a reset; one that refuses
   our client certificate after a TLS 1.3 handshake sends an alert or closes — both show up here;
3. the connection is at least :data:`PROBATION_SECONDS` old and healthy. With TLS 1.3 our side finishes the
   handshake before the repository has judged our certificate, and nothing but a refusal ever comes back
   (a syslog receiver sends no data): a busy repository's refusal can take longer than
   :data:`SETTLE_SECONDS`, and what a new connection carried would then count as delivered and be lost;

and only then is it marked ``delivered``. When the connection breaks, every in-flight message is sent again
on the next connection, and so are the messages confirmed within the last :data:`REPLAY_SECONDS` before the
break was noticed, at most ``4 * batch_size`` of them (a repository that acknowledged data and died before
storing it). After a restart of XIG everything not yet confirmed is sent again. The price is duplicates: a
re-sent message is byte-for-byte the same syslog message as the first sending (same TIMESTAMP = recording
time, HOSTNAME, APP-NAME, PROCID and XML, all stored with the message), so a repository or an auditor counts
and removes duplicates by comparing messages. A message is lost only if the repository acknowledged it,
stayed connected and healthy for :data:`SETTLE_SECONDS` (on a new connection: until it was
:data:`PROBATION_SECONDS` old) and :data:`REPLAY_SECONDS` and still did not store it — that needs an
application-level acknowledgement (RELP), which RFC 5425 does not have. UDP (RFC 5426) can only report
an ICMP "port unreachable" (treated like a broken connection); anything else lost on the way goes
unnoticed.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from gateway.audit import syslog
from gateway.audit.events import summarize
from gateway.audit.model import AuditMessage
from gateway.audit.transport import Connector, FrameTooLarge, SyslogConnection, TransportError, repository_key
from gateway.audit.xml import serialize
from gateway.config import AuditRepository, Config
from gateway.store.audit import NewAuditRecord, SpooledMessage, SqlAuditStore

log = logging.getLogger("xig.audit")

#: seconds a connection must stay healthy after the peer acknowledged the bytes before they count as delivered
SETTLE_SECONDS = 0.25
#: a new connection confirms nothing before it has been open and healthy this long (see the module docstring)
PROBATION_SECONDS = 2.0
#: after a broken connection, messages confirmed this many seconds before are sent again too (at most
#: ``4 * batch_size`` of them)
REPLAY_SECONDS = 2.0
#: messages kept in memory while the database is unavailable (beyond that they are dropped, and counted)
MEMORY_QUEUE = 10_000
#: minimum lifetime of a delivery lease (renewed a few times within it)
LEASE_SECONDS = 15.0


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class _RepoState:
    """What :meth:`AuditTrail.status` reports of one repository (written by its delivery thread)."""

    connected: bool = False
    delivering: bool = False  #: this process holds the repository's delivery lease
    in_flight: int = 0
    delivered: int = 0  #: messages confirmed by this process
    last_error: str | None = None
    last_error_at: dt.datetime | None = None
    last_delivered_at: dt.datetime | None = None


class _Deliverer:
    """The delivery thread of one repository (see the module docstring for the confirmation rules)."""

    def __init__(self, trail: AuditTrail, repo: AuditRepository, connect: Callable[[], SyslogConnection]) -> None:
        self.trail = trail
        self.repo = repo
        self.key = repository_key(repo)
        self.connect = connect
        self.owner = f"{trail.hostname}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.state = _RepoState()
        self.wake = threading.Event()
        self.busy = True  #: set by record(), cleared when nothing is pending or in flight
        self.window = 4 * trail.batch_size
        self.thread = threading.Thread(target=self._run, name=f"xig-audit {self.key}", daemon=True)
        self._conn: SyslogConnection | None = None
        self._in_flight: list[int] = []
        self._cursor = 0  #: highest pending id sent on this connection
        self._replay: list[int] = []
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._snapshot: tuple[int, float] | None = None  #: (in-flight count covered, when the peer had acked them)
        self._retry_at = 0.0
        self._connected_at = 0.0  #: when the current connection was opened (monotonic)
        self._lease_until = 0.0
        self._dirty = True  #: the spool may hold rows not sent yet (woken by record(), or a full batch)

    # -- state reporting ----------------------------------------------------------------------------

    def _fail(self, error: str) -> None:
        if error != self.state.last_error:
            log.warning("audit repository %s: %s (messages stay in the spool)", self.key, error)
            self._report(error)
        self.state.last_error = error
        self.state.last_error_at = _utcnow()
        self.trail._changed()

    def _report(self, error: str | None) -> None:
        """Keep the repository's error (or its recovery) in the database for ``xig audit ls`` / ``export``."""
        if not self.state.delivering:
            return
        try:
            self.trail.store.report(self.key, error)
        except Exception:  # noqa: BLE001 - bookkeeping only
            log.debug("audit repository %s: could not store its state", self.key, exc_info=True)

    def _frame(self, m: SpooledMessage) -> bytes:
        return syslog.frame(m.xml, hostname=m.hostname, app_name=m.app_name, procid=m.procid, timestamp=m.recorded_at)

    # -- connection ---------------------------------------------------------------------------------

    def _drop_connection(self, error: str | None) -> None:
        """Close the connection; everything in flight and recently confirmed goes out again next time."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if error is not None:
            horizon = time.monotonic() - REPLAY_SECONDS
            self._replay = sorted({i for t, i in self._recent if t >= horizon})[-self.window:]
            if self._in_flight:
                try:
                    self.trail.store.note_error(self.key, self._in_flight, error)
                except Exception:  # noqa: BLE001 - only bookkeeping; the rows stay pending anyway
                    log.exception("audit repository %s: could not note the error", self.key)
            self._fail(error)
            self._retry_at = time.monotonic() + self.trail.retry_seconds
        self._recent.clear()
        self._in_flight = []
        self._snapshot = None
        self._cursor = 0
        self.state.connected = False
        self.state.in_flight = 0
        self.trail._changed()

    def _ensure_lease(self) -> bool:
        now = time.monotonic()
        ttl = max(LEASE_SECONDS, 3 * self.trail.retry_seconds)
        if now < self._lease_until - 2 * ttl / 3:
            return True
        held = self.trail.store.acquire_lease(self.key, self.owner, ttl)
        self._lease_until = now + ttl if held else 0.0
        if held != self.state.delivering:
            self.state.delivering = held
            if not held:
                log.info("audit repository %s: another XIG process delivers to it", self.key)
                self._drop_connection(None)
            self.trail._changed()
        return held

    # -- one step -----------------------------------------------------------------------------------

    def _send_batch(self, conn: SyslogConnection) -> int:
        """Send what is due; returns how many messages were fetched (a full batch: more may be waiting)."""
        if not self._in_flight and self._cursor:
            self._cursor = 0  # nothing unconfirmed: every pending row is unsent (even one committed late)
            self._dirty = True
        room = self.window - len(self._in_flight)
        replaying = bool(self._replay)
        if room <= 0 or not (replaying or self._dirty):
            return 0
        limit = min(self.trail.batch_size, room)
        store = self.trail.store
        if replaying:
            batch = store.messages(self.key, self._replay[:limit])
            self._replay = self._replay[limit:]
        else:
            batch = store.pending(self.key, after_id=self._cursor, limit=limit)
            self._dirty = len(batch) >= limit
        sent: list[int] = []
        try:
            for m in batch:
                if not replaying:
                    self._cursor = max(self._cursor, m.id)
                try:
                    conn.send(self._frame(m))
                except FrameTooLarge as exc:
                    store.mark_failed(self.key, [m.id], str(exc))
                    log.error("audit message %d cannot be delivered to %s: %s", m.id, self.key, exc)
                    continue
                sent.append(m.id)
                self._in_flight.append(m.id)
        finally:
            store.mark_sent(self.key, sent)
            self.state.in_flight = len(self._in_flight)
        return len(batch) if not replaying else limit

    def _confirm(self, conn: SyslogConnection) -> float | None:
        """Advance the confirmation of in-flight messages; returns how long to wait for the next step."""
        if not self._in_flight:
            return None
        now = time.monotonic()
        if self._snapshot is None:
            unacked = conn.unacknowledged()
            if unacked:
                # bytes a peer reset never get acknowledged: the kernel keeps counting them as unacknowledged
                # (SIOCOUTQ stays non-zero after the reset), so waiting for the count alone waits forever
                if not conn.healthy():
                    raise TransportError(conn.error or f"audit repository {self.key} broke the connection")
                return 0.01
            self._snapshot = (len(self._in_flight), now)
            return SETTLE_SECONDS
        covered, since = self._snapshot
        if now - since < SETTLE_SECONDS:
            return SETTLE_SECONDS - (now - since)
        if now - self._connected_at < PROBATION_SECONDS:
            return PROBATION_SECONDS - (now - self._connected_at)
        if not conn.healthy():
            raise TransportError(conn.error or f"audit repository {self.key} broke the connection")
        confirmed, self._in_flight = self._in_flight[:covered], self._in_flight[covered:]
        self._snapshot = None
        self.trail.store.mark_delivered(self.key, confirmed)
        self._recent.extend((now, i) for i in confirmed)
        while self._recent and (self._recent[0][0] < now - REPLAY_SECONDS or len(self._recent) > self.window * 4):
            self._recent.popleft()
        self.state.in_flight = len(self._in_flight)
        self.state.delivered += len(confirmed)
        self.state.last_delivered_at = _utcnow()
        if self.state.last_error is not None or self.state.delivered == len(confirmed):
            self._report(None)
        self.state.last_error = None
        self.trail._changed()
        return 0.0 if self._in_flight else None

    def _step(self) -> float | None:
        """One round; returns the seconds to wait (None: until woken)."""
        closing = self.trail._closing.is_set()
        if not self._ensure_lease():  # another process delivers this spool
            self._set_idle()
            if closing:
                raise _Stop()
            return max(LEASE_SECONDS, 3 * self.trail.retry_seconds) / 3
        if self._conn is None:
            now = time.monotonic()
            if now < self._retry_at and not closing:
                return self._retry_at - now
            if not self.trail.store.pending(self.key, limit=1) and not self._replay:
                self._set_idle()
                if closing:
                    raise _Stop()
                return None
            try:
                self._conn = self.connect()
            except TransportError as exc:
                self._retry_at = time.monotonic() + self.trail.retry_seconds
                self._fail(str(exc))
                if closing:
                    raise _Stop() from None
                return self.trail.retry_seconds
            self._connected_at = time.monotonic()
            self.state.connected = True
            self._dirty = True
            log.info("audit repository %s: connected", self.key)
            self.trail._changed()
        conn = self._conn
        try:
            fetched = self._send_batch(conn)
            wait = self._confirm(conn)
        except TransportError as exc:
            self._drop_connection(str(exc))
            if closing:
                raise _Stop() from None
            return self.trail.retry_seconds
        if fetched >= self.trail.batch_size:
            return 0.0  # more may be waiting
        if wait is None and not self._in_flight:
            if not conn.healthy():  # idle: notice a repository that went away
                self._drop_connection(conn.error or "connection lost")
                return 0.0
            self._set_idle()
            if closing:
                raise _Stop()
            return self.trail.retry_seconds
        return wait

    def _set_idle(self) -> None:
        with self.trail._cond:
            if self.busy:
                self.busy = False
                self.trail._cond.notify_all()

    def _run(self) -> None:
        while not self.trail._stop.is_set():
            if self.wake.is_set():  # record() stored something since the last round
                self.wake.clear()
                self._dirty = True
            try:
                wait = self._step()
            except _Stop:
                break
            except Exception as exc:  # noqa: BLE001 - the database failed; keep trying
                log.exception("audit delivery to %s failed", self.key)
                self._fail(f"local audit store: {exc}")
                wait = self.trail.retry_seconds
            if wait is None or wait > 0:
                self.wake.wait(wait)
        try:
            self._drop_connection(None)
            if self.state.delivering:
                self.trail.store.release_lease(self.key, self.owner)
        except Exception:  # noqa: BLE001
            log.exception("audit delivery to %s: closing failed", self.key)


class _Stop(Exception):
    """Ends a delivery thread while closing."""


class AuditTrail:
    """The :class:`~gateway.audit.model.AuditSink` of a running XIG: durable local store + syslog delivery.

    Public API: :meth:`open`, :meth:`record`, :meth:`status`, :meth:`wait_until`, :meth:`wait_idle`,
    :meth:`close`; ``enabled``, ``store`` and ``repositories`` (the repository keys)."""

    def __init__(self, config: Config, store: SqlAuditStore, *, hostname: str | None = None,
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        audit = config.audit
        self.enabled = audit.enabled
        self.store = store
        self.hostname = hostname or socket.gethostname()
        self.app_name = audit.app_name
        self.retry_seconds = audit.retry_seconds
        self.batch_size = audit.batch_size
        self.clock = clock
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._stop = threading.Event()
        self._memory: collections.deque[NewAuditRecord] = collections.deque()
        self._memory_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._memory_wake = threading.Event()
        self._dropped = 0
        self._unserializable = 0
        self._db_error: str | None = None
        self._started = False
        self._deliverers: list[_Deliverer] = []
        if self.enabled:
            for repo in audit.repositories:
                self._deliverers.append(_Deliverer(self, repo, Connector(repo, config)))
        self.repositories: tuple[str, ...] = tuple(d.key for d in self._deliverers)
        self._spool_thread = threading.Thread(target=self._spool_loop, name="xig-audit spool", daemon=True)

    @classmethod
    def open(cls, config: Config, engine: Engine) -> AuditTrail:
        """The trail of ``config`` on ``engine`` (migrated), its delivery threads started. With
        ``[audit] enabled = false`` it records nothing and starts no thread."""
        trail = cls(config, SqlAuditStore(engine))
        trail.start()
        return trail

    def start(self) -> AuditTrail:
        if self.enabled and not self._started:
            self._started = True
            self._spool_thread.start()
            for d in self._deliverers:
                d.thread.start()
        return self

    # -- recording ----------------------------------------------------------------------------------

    def record(self, message: AuditMessage) -> None:
        """Store ``message`` durably and schedule its delivery; never raises, never waits for a repository."""
        if not self.enabled:
            return
        try:
            record = NewAuditRecord(xml=serialize(message), summary=summarize(message), recorded_at=self.clock(),
                                    hostname=syslog.header_field(self.hostname, syslog.MAX_HOSTNAME),
                                    app_name=syslog.header_field(self.app_name, syslog.MAX_APP_NAME),
                                    procid=str(os.getpid()))
        except Exception:  # noqa: BLE001 - never into the transaction
            self._unserializable += 1
            log.exception("AUDIT MESSAGE LOST: it cannot be serialised (event %s at %s)",
                          getattr(getattr(message, "event_id", None), "code", "?"), getattr(message, "when", "?"))
            return
        try:
            with self._memory_lock:
                queued = bool(self._memory)
                if queued:
                    self._queue(record)
            if queued:
                self._flush_memory(batches=1)  # the rest is written by the spool thread
            else:
                try:
                    self.store.add([record], self.repositories)
                except Exception as exc:  # noqa: BLE001 - the database failed: keep it in memory
                    self._database_failed(exc)
                    with self._memory_lock:
                        self._queue(record)
                    self._memory_wake.set()
                    return
            self._wake_all()
        except Exception:  # noqa: BLE001 - last resort
            log.exception("audit trail: recording failed")

    def _queue(self, record: NewAuditRecord) -> None:
        """Append to the memory queue (``_memory_lock`` held)."""
        if len(self._memory) >= MEMORY_QUEUE:
            self._dropped += 1
            log.error("AUDIT MESSAGE LOST: the database is unavailable and %d messages already wait in memory "
                      "(%d dropped so far)", MEMORY_QUEUE, self._dropped)
            return
        self._memory.append(record)

    def _database_failed(self, exc: BaseException) -> None:
        first = self._db_error is None
        self._db_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if first:
            log.error("AUDIT STORE UNAVAILABLE: messages are kept in memory (at most %d) until the database "
                      "is back: %s", MEMORY_QUEUE, self._db_error)
        self._changed()

    def _flush_memory(self, batches: int | None = None) -> bool:
        """Write the memory queue (or its first ``batches`` batches) to the database in order; True when it is
        empty afterwards."""
        if not self._flush_lock.acquire(blocking=False):
            return False
        try:
            while batches is None or batches > 0:
                if batches is not None:
                    batches -= 1
                with self._memory_lock:
                    batch = [self._memory[i] for i in range(min(len(self._memory), self.batch_size))]
                if not batch:
                    return True
                try:
                    self.store.add(batch, self.repositories)
                except Exception as exc:  # noqa: BLE001
                    self._database_failed(exc)
                    return False
                with self._memory_lock:
                    for _ in batch:
                        self._memory.popleft()
                if self._db_error is not None:
                    log.warning("audit store available again; writing the messages kept in memory")
                    self._db_error = None
                self._wake_all()
            return not self._memory
        finally:
            self._flush_lock.release()

    def _spool_loop(self) -> None:
        while not self._stop.is_set():
            self._memory_wake.wait(self.retry_seconds if self._memory else None)
            self._memory_wake.clear()
            if self._memory:
                self._flush_memory()
                self._changed()

    def _wake_all(self) -> None:
        with self._cond:
            for d in self._deliverers:
                d.busy = True
        for d in self._deliverers:
            d.wake.set()

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- observing ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /health and /metrics: spool depth, connection and last error per repository."""
        if not self.enabled:
            return {"enabled": False, "repositories": []}
        try:
            pending: dict[str, int] | None = self.store.pending_counts()
            db_error = self._db_error
        except Exception as exc:  # noqa: BLE001
            pending, db_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        repos = []
        for d in self._deliverers:
            s = d.state
            repos.append({
                "name": d.key, "transport": d.repo.transport, "host": d.repo.host, "port": d.repo.port,
                "pending": None if pending is None else pending.get(d.key, 0), "in_flight": s.in_flight,
                "connected": s.connected, "delivering": s.delivering, "delivered": s.delivered,
                "last_error": s.last_error, "last_error_at": _iso(s.last_error_at),
                "last_delivered_at": _iso(s.last_delivered_at),
            })
        return {"enabled": True, "memory_queue": len(self._memory), "dropped": self._dropped,
                "unserializable": self._unserializable, "database_error": db_error, "repositories": repos}

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """Block until ``predicate(self.status())`` holds, re-checked whenever a delivery thread reports a
        change (connected, failed, delivered); False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(self.status()):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing waits for delivery (memory queue, spool and in-flight messages all empty)."""
        def idle(status: dict[str, Any]) -> bool:
            return (not status["memory_queue"] and not any(d.busy for d in self._deliverers)
                    and all(r["pending"] == 0 and r["in_flight"] == 0 for r in status["repositories"]))
        return self.wait_until(idle, timeout)

    # -- closing ------------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, then stop the threads. Messages still
        pending stay in the database for the next start; a later :meth:`record` still stores durably."""
        if not self._started or self._stop.is_set():
            return
        deadline = time.monotonic() + timeout
        self._closing.set()
        if not self._flush_memory() and self._memory:
            log.error("AUDIT MESSAGES LOST: %d messages could not be written to the database before closing: %s",
                      len(self._memory), self._db_error)
        for d in self._deliverers:
            d.wake.set()
        for d in self._deliverers:
            d.thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._memory_wake.set()
        for d in self._deliverers:
            d.wake.set()
        for d in self._deliverers:
            d.thread.join(1.0)
        self._spool_thread.join(1.0)
        self._changed()
