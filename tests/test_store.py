"""Persistence: migrations, the KOS ledger (RAD-75 authorisation), patient links, jobs, the partner
directory and the partners' response times — the same behaviour on SQLite and on a real PostgreSQL.

Every test runs on both databases (``db_url``): a fresh SQLite file and a fresh PostgreSQL database of
a real server (:mod:`tests.postgres`). "Restart" means a new engine on the same URL, as a new process
would open it. Concurrency between processes is in :mod:`tests.test_postgres_workers`.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine, func, inspect, select

from gateway.initiating.partners import Partner
from gateway.store import tables
from gateway.store.db import MIGRATIONS, applied_versions, make_engine, migrate, open_database, resolve_url
from gateway.store.directory import SqlDirectory
from gateway.store.jobs import JobInstance, JobStudy, SqlJobStore
from gateway.store.ledger import SqlLedger, SqlPatientLinks
from gateway.store.response_times import WEIGHT, SqlResponseTimes

if TYPE_CHECKING:
    from tests.postgres import PostgresServer


HOUR = dt.timedelta(hours=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/xig.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def engines(db_url: str, tmp_path: Path) -> Iterator[list[Engine]]:
    """``engines[0]`` opened (migrated) on ``db_url``; call ``reopen()`` for another, like a new process."""
    opened: list[Engine] = [open_database(db_url, tmp_path)]
    yield opened
    for e in opened:
        e.dispose()


def reopen(engines: list[Engine], db_url: str, tmp_path: Path) -> Engine:
    engines.append(open_database(db_url, tmp_path))
    return engines[-1]


def test_postgresql_url_as_operators_write_it_uses_psycopg(pg_url: str, tmp_path: Path) -> None:
    assert pg_url.startswith("postgresql://")  # no "+driver": SQLAlchemy alone would want psycopg2
    engine = open_database(pg_url, tmp_path)
    try:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        assert applied_versions(engine) == {m.version for m in MIGRATIONS}
    finally:
        engine.dispose()


def test_relative_sqlite_url_resolves_against_config_dir(tmp_path: Path) -> None:
    assert resolve_url("sqlite:///var/xig.db", tmp_path) == f"sqlite:///{tmp_path}/var/xig.db"
    assert (tmp_path / "var").is_dir()
    assert resolve_url("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"


def test_migrations_apply_once_and_concurrently(db_url: str) -> None:
    engines = [make_engine(db_url) for _ in range(4)]
    results: list[list[int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(engines))

    def run(engine: Engine) -> None:
        try:
            start.wait(30)
            results.append(migrate(engine))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert sorted(v for r in results for v in r) == [m.version for m in MIGRATIONS]  # each exactly once
        assert applied_versions(engines[0]) == {m.version for m in MIGRATIONS}
        assert migrate(engines[0]) == []
        names = set(inspect(engines[0]).get_table_names())
        assert {"pacs_instances", "patient_links", "kos_manifests", "kos_instances", "kos_deliveries",
                "document_entries", "jobs", "job_studies", "job_instances", "directory_partners",
                "schema_migrations"} <= names
    finally:
        for e in engines:
            e.dispose()


def test_ledger_authorises_only_delivered_instances_to_that_community(engines: list[Engine], db_url: str,
                                                                       tmp_path: Path) -> None:
    ledger = SqlLedger(engines[0])
    ledger.record_delivery(kos_uid="1.2.9", study_uid="1.2", source_id="2.999.1.3", content_digest="d",
                           instances=[("1.2.1", "1.2.1.1"), ("1.2.1", "1.2.1.2")],
                           home_community_id="urn:oid:2.999.2", organization_id="urn:oid:2.999.2.5", user="u")
    assert ledger.authorized(["1.2.1.1", "1.2.1.2", "1.2.1.3"], "urn:oid:2.999.2", HOUR) == {"1.2.1.1", "1.2.1.2"}
    assert ledger.authorized(["1.2.1.1"], "urn:oid:2.999.3", HOUR) == set()  # another community: refused
    assert ledger.authorized(["1.2.1.1"], "urn:oid:2.999.2", dt.timedelta(seconds=-1)) == set()  # window passed
    # a second delivery of the same content-derived manifest only adds a delivery row
    ledger.record_delivery(kos_uid="1.2.9", study_uid="1.2", source_id="2.999.1.3", content_digest="d",
                           instances=[("1.2.1", "1.2.1.1"), ("1.2.1", "1.2.1.2")],
                           home_community_id="urn:oid:2.999.3")
    deliveries = ledger.deliveries("1.2.9")
    assert [d[0] for d in deliveries] == ["urn:oid:2.999.2", "urn:oid:2.999.3"]
    assert deliveries[0][1:3] == ("urn:oid:2.999.2.5", "u")
    assert all(d[3].tzinfo is not None and abs(dt.datetime.now(dt.UTC) - d[3]) < HOUR for d in deliveries)
    assert ledger.authorized(["1.2.1.1"], "urn:oid:2.999.3", HOUR) == {"1.2.1.1"}
    with engines[0].connect() as conn:
        assert conn.execute(select(func.count()).select_from(tables.kos_manifests)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(tables.kos_instances)).scalar() == 2
    # survives a restart (new engine on the same database)
    again = SqlLedger(reopen(engines, db_url, tmp_path))
    assert again.authorized(["1.2.1.2"], "urn:oid:2.999.2", HOUR) == {"1.2.1.2"}


def test_ledger_authorises_large_requests_in_batches(engines: list[Engine]) -> None:
    ledger = SqlLedger(engines[0])
    instances = [("1.5.1", f"1.5.1.{i}") for i in range(1200)]  # more than one 500-uid IN (...) batch
    ledger.record_delivery(kos_uid="1.5.9", study_uid="1.5", source_id="s", content_digest="d",
                           instances=instances, home_community_id="urn:oid:2.999.2")
    asked = [sop for _, sop in instances] + ["1.5.1.x"]
    assert ledger.authorized(asked, "urn:oid:2.999.2", HOUR) == {sop for _, sop in instances}


def test_entries_are_idempotent(engines: list[Engine], db_url: str, tmp_path: Path) -> None:
    ledger = SqlLedger(engines[0])
    a = ledger.entry_for_study("1.9.1", "urn:uuid:a", "1.2", "2.999.1.3", "P1")
    b = ledger.entry_for_study("1.9.1", "urn:uuid:b", "1.2", "2.999.1.3", "P1")
    assert a == b and a.entry_uuid == "urn:uuid:a"
    assert ledger.find_entry(unique_id="1.9.1") == a
    assert ledger.find_entry(entry_uuid="urn:uuid:a") == a
    assert ledger.find_entry(unique_id="1.9.404") is None
    assert SqlLedger(reopen(engines, db_url, tmp_path)).entry_for_study("1.9.1", "urn:uuid:c", "1.2", "x", "y") == a


def test_patient_links_upsert(engines: list[Engine]) -> None:
    links = SqlPatientLinks(engines[0])
    links.remember(local_patient_id="P1", local_assigning_authority="2.999.1.1",
                   remote_home_community_id="urn:oid:2.999.2", remote_patient_id="R9",
                   remote_assigning_authority="2.999.2.1")
    links.remember(local_patient_id="P1", local_assigning_authority="2.999.1.1",
                   remote_home_community_id="urn:oid:2.999.2", remote_patient_id="R10",
                   remote_assigning_authority="2.999.2.1")
    links.remember(local_patient_id="P1", local_assigning_authority="2.999.1.1",
                   remote_home_community_id="urn:oid:2.999.4")
    links.remember(local_patient_id="P1", local_assigning_authority="2.999.1.1",  # no id: still one community
                   remote_home_community_id="urn:oid:2.999.4")
    assert links.communities_for("P1", "2.999.1.1") == ["urn:oid:2.999.2", "urn:oid:2.999.4"]
    assert links.communities_for("P2", "2.999.1.1") == []
    with engines[0].connect() as conn:
        rows = conn.execute(select(tables.patient_links).order_by(tables.patient_links.c.remote_home_community_id))
        first = next(iter(rows))
    assert first.remote_patient_id == "R10" and first.last_seen >= first.first_seen  # updated in place


def test_job_store_resumable_state(engines: list[Engine], db_url: str, tmp_path: Path) -> None:
    store = SqlJobStore(engines[0])
    job = store.create("pull-priors", {"local_id": "L1"})
    store.add_studies(job, [JobStudy("urn:oid:2.999.2", "1.2", "B", "R1", description="CT")])
    store.add_studies(job, [JobStudy("urn:oid:2.999.2", "1.2", "B", "R1")])  # idempotent
    assert [(s.study_instance_uid, s.description) for s in store.studies(job)] == [("1.2", "CT")]
    insts = [JobInstance(f"1.2.1.{i}", "urn:oid:2.999.2", "1.2", "1.2.1", "2.999.2.3") for i in range(3)]
    assert store.add_instances(job, insts) == 3
    store.mark(job, "1.2.1.0", "stored", size=10)
    assert store.add_instances(job, insts) == 0  # a resumed discovery keeps known states
    assert store.add_instances(job, [*insts, JobInstance("1.2.1.3", "urn:oid:2.999.2", "1.2", "1.2.1", "r")]) == 1
    assert [i.sop_instance_uid for i in store.instances(job, "pending")] == ["1.2.1.1", "1.2.1.2", "1.2.1.3"]
    assert store.counts(job) == {"stored": 1, "pending": 3}
    store.set_state(job, "interrupted", {"stored": 1})
    again = SqlJobStore(reopen(engines, db_url, tmp_path))  # a new process
    record = again.find(job[:8])
    assert record is not None and record.state == "interrupted" and record.params == {"local_id": "L1"}
    assert [j.id for j in again.recent()] == [job]


def test_job_claims_are_exclusive_and_released(engines: list[Engine], db_url: str, tmp_path: Path) -> None:
    store = SqlJobStore(engines[0])
    other = SqlJobStore(reopen(engines, db_url, tmp_path))  # another engine: its own connections / files
    first, second, done = (store.create("pull-priors", {"n": i}) for i in range(3))
    store.set_state(done, "completed")
    claim = store.claim(first)
    assert claim is not None and claim.held
    assert store.claim(first) is None and other.claim(first) is None  # held: by this engine or another
    # the next claimable job skips the held one and the completed one
    nxt = other.claim_next("pull-priors")
    assert nxt is not None and nxt.job_id == second
    assert other.claim_next("pull-priors") is None
    assert other.claim_next("other-kind") is None
    claim.release()
    claim.release()  # idempotent
    assert not claim.held
    with other.claim(first) as again:  # released: anyone may take it now
        assert again is not None and again.held
    assert not again.held
    nxt.release()
    store.set_state(second, "completed")  # finished while unclaimed: not picked up again
    last = store.claim_next("pull-priors")
    assert last is not None and last.job_id == first
    last.release()


def test_directory_replace_all(engines: list[Engine]) -> None:
    directory = SqlDirectory(engines[0])
    assert directory.replace_all([Partner(name="A", home_community_id="urn:oid:2.999.5"),
                                  Partner(name="B", home_community_id="urn:oid:2.999.6")], "one.json") == 2
    assert [p.name for p in directory.partners()] == ["A", "B"]
    assert directory.replace_all([Partner(name="C", home_community_id="urn:oid:2.999.5")], "two.json") == 1
    assert [(p.name, p.home_community_id) for p in directory.partners()] == [("C", "urn:oid:2.999.5")]


def test_response_times_average_per_transaction_and_community(engines: list[Engine], db_url: str,
                                                              tmp_path: Path) -> None:
    times = SqlResponseTimes(engines[0])
    a, b, c = "urn:oid:2.999.5", "urn:oid:2.999.6", "urn:oid:2.999.7"
    assert times.expected("ITI-55", [a, b]) == {} and times.expected("ITI-55", []) == {}
    times.record("ITI-55", {a: 2.0, b: 0.25})
    times.record("ITI-38", {a: 9.0})
    times.record("ITI-55", {})  # nothing observed: nothing written
    assert times.expected("ITI-55", [a, b, c]) == {a: 2.0, b: 0.25}  # a first observation is the average
    times.record("ITI-55", {a: 1.0})
    again = SqlResponseTimes(reopen(engines, db_url, tmp_path))  # a new process sees it
    expected = again.expected("ITI-55", [a, b, a])
    assert expected.keys() == {a, b} and expected[a] == pytest.approx(2.0 + WEIGHT * (1.0 - 2.0))
    assert again.expected("ITI-38", [a, b]) == {a: 9.0}  # per transaction
    rows = {(r[0], r[1]): r[2:5] for r in again.all()}
    assert all(r[5].tzinfo is not None and abs(r[5] - dt.datetime.now(dt.UTC)) < HOUR for r in again.all())
    assert rows[("ITI-55", a)] == (pytest.approx(2.0 + WEIGHT * (1.0 - 2.0)), 1.0, 2)  # average, last, samples
    assert rows[("ITI-55", b)] == (0.25, 0.25, 1) and rows[("ITI-38", a)] == (9.0, 9.0, 1)


def test_concurrent_response_time_records_are_all_counted(engines: list[Engine], db_url: str,
                                                         tmp_path: Path) -> None:
    """Two processes recording the same communities at once: no observation lost to a read-modify-write."""
    stores = [SqlResponseTimes(engines[0]), SqlResponseTimes(reopen(engines, db_url, tmp_path))]
    hcids = [f"urn:oid:2.999.9.{i}" for i in range(5)]
    errors: list[BaseException] = []

    def record(store: SqlResponseTimes) -> None:
        try:
            for _ in range(10):
                store.record("ITI-55", dict.fromkeys(hcids, 1.0))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {r[1]: r[4] for r in stores[0].all()} == dict.fromkeys(hcids, 20)


def test_the_postgres_fixture_is_a_real_server(postgres: PostgresServer, pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(select(func.version())).scalar()
            assert isinstance(version, str) and version.startswith("PostgreSQL")
        assert postgres.port > 0 and f":{postgres.port}/" in pg_url
    finally:
        engine.dispose()
