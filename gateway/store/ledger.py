"""The ledger of issued KOS manifests and of on-demand DocumentEntries (SQLAlchemy adapter).

RAD-75 may serve an instance only when a manifest referencing it was delivered (ITI-39) to the
requesting community within the authorisation window (Carequality Imaging-002). The ledger is in
the database so every worker process and a restarted gateway see the same deliveries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, and_, case, select

from gateway.store.db import dialect_insert
from gateway.store.tables import document_entries, kos_deliveries, kos_instances, kos_manifests, patient_links


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; everything stored is UTC
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class EntryRecord:
    unique_id: str
    entry_uuid: str
    study_instance_uid: str
    source_id: str
    patient_id: str


class SqlLedger:
    """KOS manifests, their instances, their deliveries, and on-demand entry ids."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- on-demand DocumentEntries ------------------------------------------------------------
    def entry_for_study(self, unique_id: str, entry_uuid: str, study_uid: str, source_id: str,
                        patient_id: str) -> EntryRecord:
        """Record (idempotently) the on-demand entry standing for ``study_uid``; return the stored one.

        Several workers may ask at once: the first row written wins (``INSERT … ON CONFLICT DO NOTHING``
        on the uniqueId, which waits for a concurrent writer's commit) and every caller returns that row.
        """
        found = self.find_entry(unique_id=unique_id)  # the usual case, a read only (own transaction: see below)
        if found is not None:
            return found
        # a fresh transaction whose first statement writes: SQLite takes its write lock (waiting up to
        # busy_timeout) instead of failing to upgrade a read snapshot another process has outdated
        with self.engine.begin() as conn:
            conn.execute(dialect_insert(conn, document_entries).values(
                unique_id=unique_id, entry_uuid=entry_uuid, study_instance_uid=study_uid, source_id=source_id,
                patient_id=patient_id, created_at=_now()).on_conflict_do_nothing(index_elements=["unique_id"]))
            row = conn.execute(select(document_entries).where(document_entries.c.unique_id == unique_id)).one()
        return EntryRecord(row.unique_id, row.entry_uuid, row.study_instance_uid, row.source_id, row.patient_id)

    def find_entry(self, unique_id: str | None = None, entry_uuid: str | None = None) -> EntryRecord | None:
        cond = document_entries.c.unique_id == unique_id if unique_id else document_entries.c.entry_uuid == entry_uuid
        with self.engine.connect() as conn:
            row = conn.execute(select(document_entries).where(cond)).first()
        if row is None:
            return None
        return EntryRecord(row.unique_id, row.entry_uuid, row.study_instance_uid, row.source_id, row.patient_id)

    # -- manifests and deliveries -------------------------------------------------------------
    def record_delivery(self, *, kos_uid: str, study_uid: str, source_id: str, content_digest: str,
                        instances: Sequence[tuple[str, str]], home_community_id: str, organization_id: str = "",
                        user: str = "") -> None:
        """Remember that ``kos_uid`` (referencing ``instances`` = (series uid, sop uid)) went to a community.

        The manifest and its instances are written once, by whichever worker gets there first (the others'
        ``ON CONFLICT DO NOTHING`` waits for its commit, then adds only its own delivery row).
        """
        now = _now()
        with self.engine.begin() as conn:
            created = conn.execute(dialect_insert(conn, kos_manifests).values(
                kos_uid=kos_uid, study_instance_uid=study_uid, source_id=source_id, content_digest=content_digest,
                created_at=now).on_conflict_do_nothing(index_elements=["kos_uid"])
                .returning(kos_manifests.c.kos_uid)).first() is not None
            if created and instances:
                by_sop = {sop: series for series, sop in instances}  # each instance once
                conn.execute(kos_instances.insert(), [
                    {"kos_uid": kos_uid, "sop_instance_uid": sop, "series_instance_uid": series,
                     "study_instance_uid": study_uid} for sop, series in by_sop.items()])
            conn.execute(kos_deliveries.insert().values(
                kos_uid=kos_uid, home_community_id=home_community_id, organization_id=organization_id,
                user=user, delivered_at=now))

    def authorized(self, sop_instance_uids: Iterable[str], home_community_id: str,
                   window: dt.timedelta) -> set[str]:
        """The subset of ``sop_instance_uids`` referenced by a manifest delivered to the community in time."""
        uids = list(dict.fromkeys(sop_instance_uids))
        if not uids:
            return set()
        since = _now() - window
        allowed: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(uids), 500):
                batch = uids[i:i + 500]
                q = (select(kos_instances.c.sop_instance_uid).distinct()
                     .join(kos_deliveries, kos_deliveries.c.kos_uid == kos_instances.c.kos_uid)
                     .where(and_(kos_instances.c.sop_instance_uid.in_(batch),
                                 kos_deliveries.c.home_community_id == home_community_id,
                                 kos_deliveries.c.delivered_at >= since)))
                allowed.update(row[0] for row in conn.execute(q))
        return allowed

    def deliveries(self, kos_uid: str) -> list[tuple[str, str, str, dt.datetime]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(kos_deliveries).where(kos_deliveries.c.kos_uid == kos_uid)
                                .order_by(kos_deliveries.c.id))
            return [(r.home_community_id, r.organization_id, r.user, _aware(r.delivered_at)) for r in rows]


class SqlPatientLinks:
    """Which initiating community learned which local patient (XCPD), for later queries and audit."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def remember(self, *, local_patient_id: str, local_assigning_authority: str, remote_home_community_id: str,
                 remote_patient_id: str | None = None, remote_assigning_authority: str | None = None) -> None:
        now = _now()
        values = {"local_patient_id": local_patient_id, "local_assigning_authority": local_assigning_authority,
                  "remote_home_community_id": remote_home_community_id, "remote_patient_id": remote_patient_id,
                  "remote_assigning_authority": remote_assigning_authority, "first_seen": now, "last_seen": now}
        keys = ["local_patient_id", "local_assigning_authority", "remote_home_community_id"]
        with self.engine.begin() as conn:
            insert = dialect_insert(conn, patient_links).values(**values)
            # concurrent workers commit in any order: last_seen only moves forward (never before first_seen)
            last_seen = case((insert.excluded.last_seen > patient_links.c.last_seen, insert.excluded.last_seen),
                             else_=patient_links.c.last_seen)
            conn.execute(insert.on_conflict_do_update(index_elements=keys, set_={
                "last_seen": last_seen, "remote_patient_id": remote_patient_id,
                "remote_assigning_authority": remote_assigning_authority}))

    def communities_for(self, local_patient_id: str, local_assigning_authority: str) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(patient_links.c.remote_home_community_id).where(and_(
                patient_links.c.local_patient_id == local_patient_id,
                patient_links.c.local_assigning_authority == local_assigning_authority)))
            return sorted(r[0] for r in rows)
