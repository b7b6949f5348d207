"""Durable import jobs (SQLAlchemy adapter).

A pull-priors job records what it found (studies per community) and every instance of the selected
studies with its state. A killed process leaves ``pending`` instances behind; resuming fetches only
those, so nothing stored is downloaded again and nothing is stored twice.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, func, select, update

from gateway.store.tables import job_instances, job_studies, jobs


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    state: str
    params: dict[str, Any]
    summary: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class JobStudy:
    home_community_id: str
    study_instance_uid: str
    partner: str
    remote_patient_id: str
    kos_uid: str = ""
    description: str = ""
    study_date: str = ""
    modalities: str = ""
    instances: int = 0
    selected: bool = True
    state: str = "pending"
    error: str = ""


@dataclass(frozen=True)
class JobInstance:
    sop_instance_uid: str
    home_community_id: str
    study_instance_uid: str
    series_instance_uid: str
    repository_unique_id: str
    state: str = "pending"
    error: str = ""
    bytes: int = 0


class SqlJobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, kind: str, params: dict[str, Any]) -> str:
        job_id = str(uuid.uuid4())
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(id=job_id, kind=kind, state="created", params=json.dumps(params),
                                              summary="{}", created_at=now, updated_at=now))
        return job_id

    def get(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            return None
        return JobRecord(row.id, row.kind, row.state, json.loads(row.params), json.loads(row.summary or "{}"),
                         row.created_at, row.updated_at)

    def find(self, prefix: str) -> JobRecord | None:
        """A job by its id or a unique prefix of it (as shown by ``xig jobs ls``)."""
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(jobs.c.id).where(jobs.c.id.startswith(prefix)).limit(2))]
        return self.get(ids[0]) if len(ids) == 1 else None

    def recent(self, limit: int = 50) -> list[JobRecord]:
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(jobs.c.id).order_by(jobs.c.created_at.desc()).limit(limit))]
        return [j for j in (self.get(i) for i in ids) if j is not None]

    def set_state(self, job_id: str, state: str, summary: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {"state": state, "updated_at": _now()}
        if summary is not None:
            values["summary"] = json.dumps(summary)
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    # -- studies ----------------------------------------------------------------------------------
    def add_studies(self, job_id: str, studies: Iterable[JobStudy]) -> None:
        rows = [{"job_id": job_id, **s.__dict__, "selected": int(s.selected)} for s in studies]
        if not rows:
            return
        with self.engine.begin() as conn:
            existing = {(r[0], r[1]) for r in conn.execute(
                select(job_studies.c.home_community_id, job_studies.c.study_instance_uid)
                .where(job_studies.c.job_id == job_id))}
            new = [r for r in rows if (r["home_community_id"], r["study_instance_uid"]) not in existing]
            if new:
                conn.execute(job_studies.insert(), new)

    def studies(self, job_id: str) -> list[JobStudy]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_studies).where(job_studies.c.job_id == job_id)
                                .order_by(job_studies.c.home_community_id, job_studies.c.study_date.desc()))
            return [JobStudy(r.home_community_id, r.study_instance_uid, r.partner, r.remote_patient_id, r.kos_uid,
                             r.description, r.study_date, r.modalities, r.instances, bool(r.selected), r.state,
                             r.error) for r in rows]

    def set_study(self, job_id: str, hcid: str, study_uid: str, **values: Any) -> None:
        if "selected" in values:
            values["selected"] = int(values["selected"])
        with self.engine.begin() as conn:
            conn.execute(update(job_studies).where(and_(
                job_studies.c.job_id == job_id, job_studies.c.home_community_id == hcid,
                job_studies.c.study_instance_uid == study_uid)).values(**values))

    # -- instances --------------------------------------------------------------------------------
    def add_instances(self, job_id: str, instances: Sequence[JobInstance]) -> int:
        """Register instances (idempotent: known ones keep their state); returns how many were new."""
        now = _now()
        with self.engine.begin() as conn:
            known = {r[0] for r in conn.execute(select(job_instances.c.sop_instance_uid)
                                                .where(job_instances.c.job_id == job_id))}
            new = [{"job_id": job_id, **i.__dict__, "updated_at": now} for i in instances
                   if i.sop_instance_uid not in known]
            if new:
                conn.execute(job_instances.insert(), new)
        return len(new)

    def instances(self, job_id: str, state: str | None = None) -> list[JobInstance]:
        cond = [job_instances.c.job_id == job_id]
        if state is not None:
            cond.append(job_instances.c.state == state)
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_instances).where(and_(*cond))
                                .order_by(job_instances.c.study_instance_uid, job_instances.c.series_instance_uid,
                                          job_instances.c.sop_instance_uid))
            return [JobInstance(r.sop_instance_uid, r.home_community_id, r.study_instance_uid,
                                r.series_instance_uid, r.repository_unique_id, r.state, r.error, r.bytes)
                    for r in rows]

    def mark(self, job_id: str, sop_instance_uid: str, state: str, *, error: str = "", size: int = 0) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(job_instances).where(and_(
                job_instances.c.job_id == job_id, job_instances.c.sop_instance_uid == sop_instance_uid))
                .values(state=state, error=error, bytes=size, updated_at=_now()))

    def counts(self, job_id: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_instances.c.state, func.count()).where(job_instances.c.job_id == job_id)
                                .group_by(job_instances.c.state))
            return {r[0]: int(r[1]) for r in rows}
