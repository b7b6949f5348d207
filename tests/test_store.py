"""Persistence: migrations, the KOS ledger (RAD-75 authorisation) and patient links, on real SQLite."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from sqlalchemy import inspect

from gateway.store.db import MIGRATIONS, applied_versions, make_engine, migrate, open_database, resolve_url
from gateway.store.ledger import SqlLedger, SqlPatientLinks

HOUR = dt.timedelta(hours=1)


def test_migrations_apply_once_and_concurrently(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    engines = [make_engine(url) for _ in range(4)]
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run(engine: object) -> None:
        try:
            results.append(migrate(engine))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v for r in results for v in r) == [m.version for m in MIGRATIONS]  # each applied exactly once
    assert applied_versions(engines[0]) == {m.version for m in MIGRATIONS}
    assert migrate(engines[0]) == []
    names = set(inspect(engines[0]).get_table_names())
    assert {"pacs_instances", "patient_links", "kos_manifests", "kos_instances", "kos_deliveries",
            "document_entries", "schema_migrations"} <= names


def test_relative_sqlite_url_resolves_against_config_dir(tmp_path: Path) -> None:
    assert resolve_url("sqlite:///var/xig.db", tmp_path) == f"sqlite:///{tmp_path}/var/xig.db"
    assert (tmp_path / "var").is_dir()
    assert resolve_url("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"


def test_ledger_authorises_only_delivered_instances_to_that_community(tmp_path: Path) -> None:
    ledger = SqlLedger(open_database("sqlite:///l.db", tmp_path))
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
    assert [d[0] for d in ledger.deliveries("1.2.9")] == ["urn:oid:2.999.2", "urn:oid:2.999.3"]
    assert ledger.authorized(["1.2.1.1"], "urn:oid:2.999.3", HOUR) == {"1.2.1.1"}
    # survives a restart (new engine on the same file)
    again = SqlLedger(open_database("sqlite:///l.db", tmp_path))
    assert again.authorized(["1.2.1.2"], "urn:oid:2.999.2", HOUR) == {"1.2.1.2"}


def test_entries_are_idempotent(tmp_path: Path) -> None:
    ledger = SqlLedger(open_database("sqlite:///e.db", tmp_path))
    a = ledger.entry_for_study("1.9.1", "urn:uuid:a", "1.2", "2.999.1.3", "P1")
    b = ledger.entry_for_study("1.9.1", "urn:uuid:b", "1.2", "2.999.1.3", "P1")
    assert a == b and a.entry_uuid == "urn:uuid:a"
    assert ledger.find_entry(unique_id="1.9.1") == a
    assert ledger.find_entry(entry_uuid="urn:uuid:a") == a
    assert ledger.find_entry(unique_id="1.9.404") is None


def test_patient_links_upsert(tmp_path: Path) -> None:
    links = SqlPatientLinks(open_database("sqlite:///p.db", tmp_path))
    links.remember(local_patient_id="P1", local_assigning_authority="2.999.1.1",
                   remote_home_community_id="urn:oid:2.999.2", remote_patient_id="R9",
                   remote_assigning_authority="2.999.2.1")
    links.remember(local_patient_id="P1", local_assigning_authority="2.999.1.1",
                   remote_home_community_id="urn:oid:2.999.2")
    links.remember(local_patient_id="P1", local_assigning_authority="2.999.1.1",
                   remote_home_community_id="urn:oid:2.999.4")
    assert links.communities_for("P1", "2.999.1.1") == ["urn:oid:2.999.2", "urn:oid:2.999.4"]
    assert links.communities_for("P2", "2.999.1.1") == []


def test_job_store_resumable_state(tmp_path: Path) -> None:
    from gateway.store.jobs import JobInstance, JobStudy, SqlJobStore

    store = SqlJobStore(open_database("sqlite:///j.db", tmp_path))
    job = store.create("pull-priors", {"local_id": "L1"})
    store.add_studies(job, [JobStudy("urn:oid:2.999.2", "1.2", "B", "R1", description="CT")])
    store.add_studies(job, [JobStudy("urn:oid:2.999.2", "1.2", "B", "R1")])  # idempotent
    assert [s.study_instance_uid for s in store.studies(job)] == ["1.2"]
    insts = [JobInstance(f"1.2.1.{i}", "urn:oid:2.999.2", "1.2", "1.2.1", "2.999.2.3") for i in range(3)]
    assert store.add_instances(job, insts) == 3
    store.mark(job, "1.2.1.0", "stored", size=10)
    assert store.add_instances(job, insts) == 0  # a resumed discovery keeps known states
    assert [i.sop_instance_uid for i in store.instances(job, "pending")] == ["1.2.1.1", "1.2.1.2"]
    assert store.counts(job) == {"stored": 1, "pending": 2}
    store.set_state(job, "interrupted", {"stored": 1})
    again = SqlJobStore(open_database("sqlite:///j.db", tmp_path))  # a new process
    record = again.find(job[:8])
    assert record is not None and record.state == "interrupted" and record.params == {"local_id": "L1"}
    assert [j.id for j in again.recent()] == [job]
