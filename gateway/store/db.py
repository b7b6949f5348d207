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

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select
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
]


def resolve_url(url: str, base_dir: Path) -> str:
    """``sqlite:///relative.db`` is relative to the config file's folder (created when missing)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        path = (base_dir / url.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return url


def make_engine(url: str) -> Engine:
    engine = create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
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


def open_database(url: str, base_dir: Path) -> Engine:
    engine = make_engine(resolve_url(url, base_dir))
    migrate(engine)
    return engine
