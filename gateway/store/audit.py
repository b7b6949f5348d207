"""The local ATNA audit store and delivery spool (SQLAlchemy adapter).

Each audit message is one ``audit_messages`` row — its XML exactly as sent, the syslog header fields of the
process that recorded it, and the indexed facts of its :class:`~gateway.audit.model.AuditSummary` (time,
event, outcome, user, community; patients and studies in their own tables) — plus one ``audit_deliveries``
row per repository it must reach. The rows that are still ``pending`` *are* the spool the delivery threads
of :class:`~gateway.audit.trail.AuditTrail` drain; ``delivered`` rows stay as the local audit log that
``xig audit ls`` / ``export`` read. A per-row state (rather than a "sent up to id N" cursor) keeps the spool
correct with several writers, whose ids may commit out of order.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Connection, Engine, Table, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from gateway.audit.model import AuditSummary
from gateway.store.tables import (
    audit_deliveries,
    audit_messages,
    audit_patients,
    audit_repositories,
    audit_studies,
)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"  #: can never be delivered to that repository (e.g. larger than a UDP datagram)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite returns naive datetimes; everything stored is UTC
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


@dataclass(frozen=True)
class NewAuditRecord:
    """One audit message to store: its XML, summary and the syslog header fields of the recording process."""

    xml: bytes
    summary: AuditSummary
    recorded_at: dt.datetime
    hostname: str
    app_name: str
    procid: str


@dataclass(frozen=True)
class SpooledMessage:
    """What a delivery thread needs to (re)build the exact syslog frame of a stored message."""

    id: int
    xml: bytes
    recorded_at: dt.datetime
    hostname: str
    app_name: str
    procid: str


@dataclass(frozen=True)
class Delivery:
    """The state of one message at one repository; for a pending one ``last_error`` is why it is not there yet
    (its own last failed attempt, else the repository's last error)."""

    repository: str
    state: str
    attempts: int
    last_error: str
    updated_at: dt.datetime
    delivered_at: dt.datetime | None


@dataclass(frozen=True)
class StoredAudit:
    """One stored message with its summary and its delivery state per repository."""

    id: int
    recorded_at: dt.datetime
    summary: AuditSummary
    xml: bytes
    deliveries: tuple[Delivery, ...] = field(default=())


@dataclass(frozen=True)
class AuditFilter:
    """``xig audit ls`` filters; every given one must match.

    ``patient``: a CX identifier or just its ID (CX.1); ``since``: event time at or after; ``user``: part of
    the user name, any case; ``community``: a homeCommunityId with or without ``urn:oid:``; ``event``: the
    IHE transaction (``ITI-55``) or EventID code."""

    patient: str | None = None
    since: dt.datetime | None = None
    user: str | None = None
    community: str | None = None
    event: str | None = None


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _community_forms(value: str) -> list[str]:
    bare = value.strip()
    if bare.lower().startswith("urn:oid:"):
        bare = bare[8:]
    return [bare, "urn:oid:" + bare]


class SqlAuditStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- writing ----------------------------------------------------------------------------------

    def add(self, records: Sequence[NewAuditRecord], repositories: Sequence[str]) -> list[int]:
        """Store ``records`` (in order, one transaction) with a pending delivery to each repository; their ids."""
        ids: list[int] = []
        with self.engine.begin() as conn:
            for r in records:
                s = r.summary
                # parameters, not .values(): one cached statement (building and keying a new one per message
                # was a third of the recording's CPU, on the initiating side's event loop)
                result = conn.execute(audit_messages.insert(), {
                    "recorded_at": _utc(r.recorded_at), "event_time": _utc(s.when), "event": s.event[:64],
                    "outcome": s.outcome, "user": s.user[:512], "community": s.community[:72],
                    "hostname": r.hostname, "app_name": r.app_name, "procid": r.procid, "xml": r.xml})
                key = result.inserted_primary_key
                assert key is not None
                message_id = int(key[0])
                ids.append(message_id)
                patients = list(dict.fromkeys(p[:256] for p in s.patients))
                if patients:
                    conn.execute(audit_patients.insert(), [
                        {"message_id": message_id, "patient_id": p, "id_value": p.split("^", 1)[0]} for p in patients])
                studies = list(dict.fromkeys(u[:64] for u in s.studies))
                if studies:
                    conn.execute(audit_studies.insert(), [
                        {"message_id": message_id, "study_instance_uid": u} for u in studies])
                if repositories:
                    conn.execute(audit_deliveries.insert(), [
                        {"message_id": message_id, "repository": repo, "state": PENDING, "attempts": 0,
                         "last_error": "", "updated_at": _utc(r.recorded_at)} for repo in repositories])
        return ids

    def _set(self, repository: str, ids: Sequence[int], values: dict[str, object]) -> None:
        if not ids:
            return
        with self.engine.begin() as conn:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                conn.execute(update(audit_deliveries).where(
                    audit_deliveries.c.repository == repository, audit_deliveries.c.message_id.in_(chunk),
                ).values(**values))

    def mark_sent(self, repository: str, ids: Sequence[int]) -> None:
        """``ids`` were written to the repository (not yet confirmed): count the attempt."""
        self._set(repository, ids, {"attempts": audit_deliveries.c.attempts + 1,
                                    "updated_at": dt.datetime.now(dt.UTC)})

    def mark_delivered(self, repository: str, ids: Sequence[int]) -> None:
        now = dt.datetime.now(dt.UTC)
        self._set(repository, ids, {"state": DELIVERED, "last_error": "", "updated_at": now, "delivered_at": now})

    def mark_failed(self, repository: str, ids: Sequence[int], error: str) -> None:
        """``ids`` can never be delivered to ``repository``: out of the spool, the reason kept."""
        self._set(repository, ids, {"state": FAILED, "last_error": error, "updated_at": dt.datetime.now(dt.UTC)})

    def note_error(self, repository: str, ids: Sequence[int], error: str) -> None:
        """A delivery attempt of ``ids`` failed (they stay pending)."""
        self._set(repository, ids, {"last_error": error, "updated_at": dt.datetime.now(dt.UTC)})

    # -- the spool --------------------------------------------------------------------------------

    def _spooled(self, where: ColumnElement[bool], limit: int | None = None) -> list[SpooledMessage]:
        m = audit_messages
        query = (select(m.c.id, m.c.xml, m.c.recorded_at, m.c.hostname, m.c.app_name, m.c.procid)
                 .join(audit_deliveries, audit_deliveries.c.message_id == m.c.id).where(where)
                 .order_by(m.c.id))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [SpooledMessage(id=int(r.id), xml=bytes(r.xml), recorded_at=_aware(r.recorded_at) or r.recorded_at,
                                   hostname=r.hostname, app_name=r.app_name, procid=r.procid)
                    for r in conn.execute(query)]

    def pending(self, repository: str, *, after_id: int = 0, limit: int = 200) -> list[SpooledMessage]:
        """The oldest messages not yet delivered to ``repository`` with an id above ``after_id``."""
        d = audit_deliveries.c
        return self._spooled(and_(d.repository == repository, d.state == PENDING, d.message_id > after_id), limit)

    def messages(self, repository: str, ids: Sequence[int]) -> list[SpooledMessage]:
        """The messages ``ids`` of ``repository`` whatever their state (to send a window again)."""
        if not ids:
            return []
        d = audit_deliveries.c
        return self._spooled(and_(d.repository == repository, d.message_id.in_(list(ids))))

    def pending_counts(self) -> dict[str, int]:
        """Spool depth per repository."""
        d = audit_deliveries.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(d.repository, func.count()).where(d.state == PENDING).group_by(d.repository))
            return {str(repo): int(n) for repo, n in rows}

    # -- delivery leases (one deliverer per repository across workers) ----------------------------

    def acquire_lease(self, repository: str, owner: str, ttl: float) -> bool:
        """Take or renew the right to deliver to ``repository`` for ``ttl`` seconds; False when another
        live owner holds it."""
        now = time.time()
        with self.engine.begin() as conn:
            taken = conn.execute(update(audit_repositories).where(
                audit_repositories.c.repository == repository,
                or_(audit_repositories.c.owner == owner, audit_repositories.c.expires_at < now),
            ).values(owner=owner, expires_at=now + ttl)).rowcount
        if taken:
            return True
        try:
            with self.engine.begin() as conn:
                conn.execute(audit_repositories.insert().values(repository=repository, owner=owner,
                                                                expires_at=now + ttl, last_error=""))
        except IntegrityError:
            return False  # another owner holds it (or just created it)
        return True

    def report(self, repository: str, error: str | None) -> None:
        """Keep the repository's delivery state for other processes: its last error, or that it works again."""
        now = dt.datetime.now(dt.UTC)
        values: dict[str, object] = (
            {"last_error": error, "last_error_at": now} if error else {"last_error": "", "last_delivered_at": now})
        with self.engine.begin() as conn:
            conn.execute(update(audit_repositories).where(audit_repositories.c.repository == repository)
                         .values(**values))

    def release_lease(self, repository: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(audit_repositories).where(audit_repositories.c.repository == repository,
                                                    audit_repositories.c.owner == owner).values(expires_at=0.0))

    # -- reading ----------------------------------------------------------------------------------

    def _where(self, f: AuditFilter) -> list[ColumnElement[bool]]:
        m = audit_messages.c
        where: list[ColumnElement[bool]] = []
        if f.since is not None:
            where.append(m.event_time >= _utc(f.since))
        if f.user:
            where.append(func.lower(m.user).like(f"%{_escape_like(f.user.lower())}%", escape="\\"))
        if f.community:
            where.append(m.community.in_(_community_forms(f.community)))
        if f.event:
            where.append(m.event == f.event)
        if f.patient:
            p = audit_patients.c
            where.append(m.id.in_(select(p.message_id).where(
                or_(p.patient_id == f.patient, p.id_value == f.patient))))
        return where

    def query(self, f: AuditFilter = AuditFilter(), *, limit: int | None = None, newest_first: bool = False,
              page: int = 500) -> Iterator[StoredAudit]:
        """Matching messages in id order (or newest first), read ``page`` at a time (bounded memory)."""
        m = audit_messages.c
        where = self._where(f)
        last: int | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            size = page if remaining is None else min(page, remaining)
            conditions = list(where)
            if last is not None:
                conditions.append(m.id < last if newest_first else m.id > last)
            q = select(audit_messages).where(*conditions).order_by(
                m.id.desc() if newest_first else m.id).limit(size)
            with self.engine.connect() as conn:
                rows = list(conn.execute(q))
                if not rows:
                    return
                ids = [int(r.id) for r in rows]
                patients = self._children(conn, audit_patients, audit_patients.c.patient_id, ids)
                studies = self._children(conn, audit_studies, audit_studies.c.study_instance_uid, ids)
                deliveries: dict[int, list[Delivery]] = {}
                d = audit_deliveries.c
                repo_errors = {str(repo): str(error) for repo, error in conn.execute(
                    select(audit_repositories.c.repository, audit_repositories.c.last_error))}
                for r in conn.execute(select(audit_deliveries).where(d.message_id.in_(ids))
                                      .order_by(d.message_id, d.repository)):
                    error = r.last_error or (repo_errors.get(r.repository, "") if r.state == PENDING else "")
                    deliveries.setdefault(int(r.message_id), []).append(Delivery(
                        repository=r.repository, state=r.state, attempts=int(r.attempts), last_error=error,
                        updated_at=_aware(r.updated_at) or r.updated_at, delivered_at=_aware(r.delivered_at)))
            for r in rows:
                i = int(r.id)
                summary = AuditSummary(event=r.event, outcome=int(r.outcome),
                                       when=_aware(r.event_time) or r.event_time, user=r.user, community=r.community,
                                       patients=tuple(patients.get(i, ())), studies=tuple(studies.get(i, ())))
                yield StoredAudit(id=i, recorded_at=_aware(r.recorded_at) or r.recorded_at, summary=summary,
                                  xml=bytes(r.xml), deliveries=tuple(deliveries.get(i, ())))
            last = ids[-1]
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < size:
                return

    @staticmethod
    def _children(conn: Connection, table: Table, column: ColumnElement[str], ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for message_id, value in conn.execute(select(table.c.message_id, column)
                                              .where(table.c.message_id.in_(ids)).order_by(table.c.message_id, column)):
            out.setdefault(int(message_id), []).append(str(value))
        return out
