"""Durable import jobs (SQLAlchemy adapter).

A pull-priors job records what it found (studies per community) and every instance of the selected
studies with its state. A killed process leaves ``pending`` instances behind; resuming fetches only
those, so nothing stored is downloaded again and nothing is stored twice.

Several processes may share one database (worker processes, ``xig jobs resume`` run twice): whoever
runs a job first takes its :class:`JobClaim`, which no other process can take until it is released.
A claim is a lock held by the claimant's own database session (a PostgreSQL advisory lock) or open
file (an ``flock`` beside the SQLite database), so it also ends when the claimant dies: a killed job can
be resumed at once, with no lease to expire and no stale "running" flag to clear.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, create_engine, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from gateway.store.db import dialect_insert
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


#: the states :meth:`SqlJobStore.claim_next` picks a job up from
CLAIMABLE = ("created", "interrupted")


class JobClaim:
    """The exclusive right to run one job, until :meth:`release` (or the end of a ``with`` block, or the
    holder's death)."""

    def __init__(self, job_id: str, release: Callable[[], None]) -> None:
        self.job_id = job_id
        self._release: Callable[[], None] | None = release

    @property
    def held(self) -> bool:
        return self._release is not None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> JobClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _advisory_key(job_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"xig-job:{job_id}".encode()).digest()[:8], "big", signed=True)


def _postgres_lock(engine: Engine, job_id: str) -> Callable[[], None] | None:
    """A session-level advisory lock, on a connection of its own (``engine`` has no pool): the lock lives
    exactly as long as that session, which ends on release, on garbage collection or with the process."""
    key = _advisory_key(job_id)
    conn = engine.connect()
    try:
        conn.execution_options(isolation_level="AUTOCOMMIT")  # hold the lock, not a transaction
        got = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
    except BaseException:
        conn.close()
        raise
    if not got:
        conn.close()
        return None

    def release() -> None:
        with contextlib.suppress(DBAPIError):  # a lost session has lost its lock too
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        conn.close()  # no pool: the session ends here
    return release


def _file_lock(path: Path) -> Callable[[], None] | None:
    """An exclusive ``flock`` on ``path``; the file is removed on release (safely: see the inode check)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one

    def release() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
    return release


_memory_claims: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()
_memory_guard = threading.Lock()


def _memory_lock(engine: Engine, job_id: str) -> Callable[[], None] | None:
    """In-memory SQLite lives in one process: a set of claimed ids per engine is enough."""
    with _memory_guard:
        held = _memory_claims.setdefault(engine, set())
        if job_id in held:
            return None
        held.add(job_id)

    def release() -> None:
        with _memory_guard:
            held.discard(job_id)
    return release


class SqlJobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._claims_engine: Engine | None = None  # PostgreSQL: one connection per claim, never pooled

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
        """Register studies (idempotent: known ones are kept as they are, also against a concurrent caller)."""
        rows = sorted(({"job_id": job_id, **s.__dict__, "selected": int(s.selected)} for s in studies),
                      key=lambda r: (r["home_community_id"], r["study_instance_uid"]))  # one lock order
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(dialect_insert(conn, job_studies).on_conflict_do_nothing(
                index_elements=["job_id", "home_community_id", "study_instance_uid"]), rows)

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
        """Register instances (idempotent: known ones keep their state); returns how many were new.

        One ``INSERT … ON CONFLICT DO NOTHING`` in primary-key order, so concurrent callers neither fail on
        each other's rows nor deadlock, and each new instance is counted by exactly one of them.
        """
        now = _now()
        rows = sorted(({"job_id": job_id, **i.__dict__, "updated_at": now}
                       for i in {i.sop_instance_uid: i for i in instances}.values()),
                      key=lambda r: r["sop_instance_uid"])
        if not rows:
            return 0
        with self.engine.begin() as conn:
            result = conn.execute(dialect_insert(conn, job_instances).on_conflict_do_nothing(
                index_elements=["job_id", "sop_instance_uid"]).returning(job_instances.c.sop_instance_uid), rows)
            return len(result.all())

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

    # -- claims -----------------------------------------------------------------------------------
    def claim(self, job_id: str) -> JobClaim | None:
        """Take the exclusive right to run ``job_id``; ``None`` when another holder (any process) has it."""
        if self.engine.dialect.name == "postgresql":
            if self._claims_engine is None:
                self._claims_engine = create_engine(self.engine.url, poolclass=NullPool)
            release = _postgres_lock(self._claims_engine, job_id)
        elif self.engine.url.database in (None, "", ":memory:"):
            release = _memory_lock(self.engine, job_id)
        else:
            name = job_id if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", job_id) else hashlib.sha256(
                job_id.encode()).hexdigest()
            release = _file_lock(Path(f"{self.engine.url.database}-claims") / f"{name}.lock")
        return JobClaim(job_id, release) if release is not None else None

    def claim_next(self, kind: str, states: Sequence[str] = CLAIMABLE) -> JobClaim | None:
        """Claim the oldest job of ``kind`` in one of ``states`` that no one else holds (``None``: none left).

        The state is read again once the claim is held, so a job another worker finished meanwhile is
        never run twice.
        """
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(jobs.c.id).where(and_(jobs.c.kind == kind,
                                                                           jobs.c.state.in_(states)))
                                              .order_by(jobs.c.created_at, jobs.c.id))]
        for job_id in ids:
            claim = self.claim(job_id)
            if claim is None:
                continue  # another worker runs it
            record = self.get(job_id)
            if record is not None and record.state in states:
                return claim
            claim.release()
        return None
