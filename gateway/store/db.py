"""Engine creation and schema migrations.

Migrations are an ordered list of steps applied once each, recorded in ``schema_migrations``, in
one transaction per step; every process runs :func:`migrate` at start-up, and concurrent starters
are safe because each step's version row is the primary key (the loser's transaction rolls back
and finds the step applied). XIG uses this small runner rather than Alembic: the schema is owned
by the application, steps are plain SQLAlchemy Core, and no ``env.py``/revision tooling is needed
to install or upgrade a gateway.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.schema import CreateTable

from gateway.store import tables


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial(conn: Connection) -> None:
    tables.metadata.create_all(conn, tables=[tables.pacs_instances, tables.patient_links, tables.kos_manifests,
                                             tables.kos_instances, tables.kos_deliveries, tables.document_entries])


def _jobs(conn: Connection) -> None:
    tables.metadata.create_all(conn, tables=[tables.jobs, tables.job_studies, tables.job_instances])


MIGRATIONS: list[Migration] = [
    Migration(1, "filesystem PACS index, patient links, KOS ledger, on-demand entries", _initial),
    Migration(2, "durable import jobs", _jobs),
    Migration(3, "partners imported from a FHIR directory",
              lambda conn: tables.metadata.create_all(conn, tables=[tables.directory_partners])),
    Migration(4, "ATNA audit trail: messages, their patients and studies, delivery state, repositories",
              lambda conn: tables.metadata.create_all(conn, tables=[
                  tables.audit_messages, tables.audit_patients, tables.audit_studies, tables.audit_deliveries,
                  tables.audit_repositories])),
    Migration(5, "partner response times (fan-out order)",
              lambda conn: tables.metadata.create_all(conn, tables=[tables.partner_response_times])),
]


def resolve_url(url: str, base_dir: Path) -> str:
    """``sqlite:///relative.db`` is relative to the config file's folder (created when missing)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        path = (base_dir / url.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return url


def driver_url(url: str) -> str:
    """``postgresql://`` (what operators write) means psycopg 3, the driver XIG installs (SQLAlchemy's default
    for that scheme is psycopg2)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def _set_wal(cur: Any) -> None:
    """Switch a SQLite file to WAL. Several processes opening a brand-new file at once race for the lock
    this needs, and SQLite does not apply the busy timeout to it: retry for up to 10 s with backoff."""
    import sqlite3
    import time

    deadline = time.monotonic() + 10.0
    pause = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)  # a production retry of a lock held by another process, not test synchronisation
            pause = min(pause * 2, 0.2)


def make_engine(url: str) -> Engine:
    engine = create_engine(driver_url(url), future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=10000")
            _set_wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine


def applied_versions(engine: Engine) -> set[int]:
    if not inspect(engine).has_table("schema_migrations"):
        return set()
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(select(tables.schema_migrations.c.version))}


def migrate(engine: Engine) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    try:
        with engine.begin() as conn:
            conn.execute(CreateTable(tables.schema_migrations, if_not_exists=True))
    except DBAPIError:
        # PostgreSQL can still race on IF NOT EXISTS (catalog unique violation); the table is there
        if not inspect(engine).has_table("schema_migrations"):
            raise
    done = applied_versions(engine)
    applied: list[int] = []
    for m in MIGRATIONS:
        if m.version in done:
            continue
        try:
            with engine.begin() as conn:
                conn.execute(tables.schema_migrations.insert().values(
                    version=m.version, description=m.description, applied_at=dt.datetime.now(dt.UTC)))
                m.apply(conn)
            applied.append(m.version)
        except IntegrityError:
            continue  # another process applied it first
    return applied


def dialect_insert(conn: Connection, table: Table) -> sqlite.Insert | postgresql.Insert:
    """``INSERT`` with ``ON CONFLICT`` support for the connection's database (SQLite or PostgreSQL): the
    single-statement way for concurrent writers (several workers) to add a row that may already exist."""
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


def open_database(url: str, base_dir: Path) -> Engine:
    engine = make_engine(resolve_url(url, base_dir))
    migrate(engine)
    return engine
