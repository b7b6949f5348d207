"""Several worker processes on one database behave as one (GitHub issue #6).

* Races with real processes (``multiprocessing``, spawn): a pool of :data:`WORKERS` interpreters, each
  with its own engine, released together by a barrier, hammer the same ledger, patient-link, job and
  directory operations on one PostgreSQL database (and, where SQLite is meant to work, one SQLite file).
  Each race asserts what one process would have produced: one on-demand entry per study whoever proposed
  it, one manifest with its instances however many deliveries, one patient-link row per key, every new
  job instance counted once, a job claimed by one worker at a time and run once, a claim freed when its
  holder is killed.
* ``xig serve --workers 2`` on PostgreSQL behind real mutual TLS: ITI-55, ITI-38, ITI-39 and RAD-75 sent
  to chosen workers (the other one is stopped with SIGSTOP while a request is sent, so the kernel can only
  hand the connection to the chosen one) give the same DocumentEntry through both, and a KOS retrieved
  through one worker authorises RAD-75 through the other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.pool import Pool
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import httpx
import psutil
import pydicom
import pytest
from sqlalchemy import func, select, text

from gateway.config import Config, load_config
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import make_study
from gateway.ihe import ebrim, iti38, iti39, iti55, rad75
from gateway.ihe.iti39 import DocumentRequest
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.initiating.partners import Partner
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom
from gateway.store import tables
from gateway.store.db import MIGRATIONS, applied_versions, make_engine, open_database
from gateway.store.directory import SqlDirectory
from gateway.store.jobs import JobInstance, JobStudy, SqlJobStore, _advisory_key
from gateway.store.ledger import SqlLedger, SqlPatientLinks
from gateway.web.client import SoapClient, SoapReply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD
from tests.conftest import IHE_TEST_IDS, write_config

WORKERS = 4
ROUNDS = 30
TIMEOUT = 120.0

_barrier: Barrier | None = None  # in each pool process


def _init(barrier: Barrier) -> None:
    global _barrier
    _barrier = barrier


def _together() -> None:
    assert _barrier is not None
    _barrier.wait(TIMEOUT)


def _task(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """Run ``fn`` in a pool process; errors come back as text (the test asserts there were none)."""
    try:
        return "ok", fn(*args)
    except BaseException:  # noqa: BLE001 - reported to the test
        return "error", f"pid {os.getpid()}: {traceback.format_exc()}"


# -- what each worker process does (module level: spawn imports this module) ----------------------------

def _entries(url: str, index: int) -> list[tuple[str, str]]:
    engine = make_engine(url)
    ledger = SqlLedger(engine)
    _together()
    out = [ledger.entry_for_study(f"2.25.{n}", f"urn:uuid:{uuid.uuid4()}", f"1.2.{n}", "2.999.1.3", "P1")
           for n in range(ROUNDS)]
    engine.dispose()
    return [(e.unique_id, e.entry_uuid) for e in out]


def _deliveries(url: str, index: int) -> int:
    engine = make_engine(url)
    ledger = SqlLedger(engine)
    _together()
    for n in range(ROUNDS):
        ledger.record_delivery(kos_uid=f"1.3.{n}", study_uid=f"1.2.{n}", source_id="2.999.1.3", content_digest="d",
                               instances=[(f"1.2.{n}.1", f"1.2.{n}.1.{i}") for i in range(20)],
                               home_community_id=f"urn:oid:2.999.{index}", user=f"worker-{index}")
    engine.dispose()
    return ROUNDS


def _links(url: str, index: int) -> int:
    engine = make_engine(url)
    links = SqlPatientLinks(engine)
    _together()
    for n in range(ROUNDS):
        links.remember(local_patient_id=f"P{n}", local_assigning_authority="2.999.1.1",
                       remote_home_community_id="urn:oid:2.999.2", remote_patient_id=f"R{index}",
                       remote_assigning_authority="2.999.2.1")
    engine.dispose()
    return ROUNDS


def _job_instances(url: str, index: int, job: str) -> int:
    engine = make_engine(url)
    store = SqlJobStore(engine)
    rng = random.Random(index)
    instances = [JobInstance(f"1.2.1.{i}", "urn:oid:2.999.2", "1.2", "1.2.1", "2.999.2.3") for i in range(200)]
    _together()
    new = 0
    for start in range(0, 200, 40):  # overlapping batches, each in its own order
        batch = instances[start:start + 80]
        rng.shuffle(batch)
        store.add_studies(job, [JobStudy("urn:oid:2.999.2", "1.2", "B", "R1"),
                                JobStudy("urn:oid:2.999.2", f"1.3.{start}", "B", "R1")])
        new += store.add_instances(job, batch)
    engine.dispose()
    return new


def _claim_same_job(url: str, index: int, jobs: list[str]) -> list[bool]:
    """For each job: everyone tries at once; the winner keeps its claim until everyone has tried."""
    engine = make_engine(url)
    store = SqlJobStore(engine)
    won = []
    for job in jobs:
        _together()
        claim = store.claim(job)
        won.append(claim is not None)
        _together()
        if claim is not None:
            claim.release()
    engine.dispose()
    return won


def _run_queue(url: str, index: int) -> list[str]:
    """A worker taking jobs until none is left; it records each job it ran in the job's summary too."""
    engine = make_engine(url)
    store = SqlJobStore(engine)
    ran: list[str] = []
    _together()
    while (claim := store.claim_next("pull-priors")) is not None:
        with claim:
            record = store.get(claim.job_id)
            assert record is not None
            runs = record.summary.get("runs", [])
            store.set_state(claim.job_id, "running", {"runs": [*runs, index]})
            ran.append(claim.job_id)
            store.set_state(claim.job_id, "completed", {"runs": [*runs, index]})
    engine.dispose()
    return ran


def _migrate(url: str, index: int) -> list[int]:
    from gateway.store.db import migrate

    engine = make_engine(url)
    _together()
    try:
        return migrate(engine)
    finally:
        engine.dispose()


def _directory(url: str, index: int) -> int:
    engine = make_engine(url)
    directory = SqlDirectory(engine)
    partners = [Partner(name=f"W{index}-{i}", home_community_id=f"urn:oid:2.999.{i}") for i in range(5)]
    _together()
    for _ in range(10):
        directory.replace_all(partners, f"worker-{index}.json")
    engine.dispose()
    return 10


def _hold_claim(url: str, job: str, held: Any, release: Any) -> None:
    engine = make_engine(url)
    claim = SqlJobStore(engine).claim(job)
    held.send(claim is not None)
    release.recv()  # never answered: the test kills this process


# -- fixtures --------------------------------------------------------------------------------------------

class Workers:
    """:data:`WORKERS` spawned interpreters sharing one barrier (reset before each race)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(WORKERS)
        self.pool: Pool = ctx.Pool(WORKERS, initializer=_init, initargs=(self.barrier,))


@pytest.fixture(scope="module")
def pool() -> Iterator[Workers]:
    workers = Workers()
    try:
        yield workers
    finally:
        workers.pool.terminate()
        workers.pool.join()


def race(workers: Workers, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(args[0], index, *args[1:])`` in every pool process at once; their results (fails on any error).

    Each task blocks at the barrier until all of them have started, so each pool process runs exactly one.
    """
    workers.barrier.reset()  # a race that failed may have broken it
    results = workers.pool.starmap_async(_task, [(fn, *args[:1], i, *args[1:]) for i in range(WORKERS)],
                                         chunksize=1).get(TIMEOUT)
    errors = [r for status, r in results if status != "ok"]
    assert errors == [], "\n".join(errors)
    return [r for _, r in results]


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database: a fresh PostgreSQL database or SQLite file."""
    url = str(request.getfixturevalue("pg_url")) if request.param == "postgresql" else f"sqlite:///{tmp_path}/x.db"
    open_database(url, tmp_path).dispose()
    return url


def count(url: str, table: Any) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    finally:
        engine.dispose()


# -- races -----------------------------------------------------------------------------------------------

def test_concurrent_migrations_apply_each_step_once(pool: Workers, pg_url: str) -> None:
    applied = race(pool, _migrate, pg_url)
    assert sorted(v for a in applied for v in a) == [m.version for m in MIGRATIONS]
    engine = make_engine(pg_url)
    try:
        assert applied_versions(engine) == {m.version for m in MIGRATIONS}
    finally:
        engine.dispose()


def test_one_on_demand_entry_per_study_whoever_proposes_it(pool: Workers, db: str) -> None:
    results = race(pool, _entries, db)
    for n in range(ROUNDS):
        answers = {r[n] for r in results}
        assert len(answers) == 1, f"study {n}: workers got different entries {answers}"
    assert count(db, tables.document_entries) == ROUNDS
    engine = make_engine(db)
    try:
        stored = {e.unique_id: e.entry_uuid for e in (SqlLedger(engine).find_entry(unique_id=f"2.25.{n}")
                                                      for n in range(ROUNDS)) if e is not None}
    finally:
        engine.dispose()
    assert stored == dict(results[0])  # what every worker returned is what is stored


def test_deliveries_write_each_manifest_once_and_every_delivery(pool: Workers, db: str) -> None:
    race(pool, _deliveries, db)
    assert count(db, tables.kos_manifests) == ROUNDS
    assert count(db, tables.kos_instances) == ROUNDS * 20
    assert count(db, tables.kos_deliveries) == ROUNDS * WORKERS
    engine = make_engine(db)
    try:
        ledger = SqlLedger(engine)
        for index in range(WORKERS):
            asked = [f"1.2.{n}.1.{i}" for n in (0, ROUNDS - 1) for i in range(20)]
            assert ledger.authorized(asked, f"urn:oid:2.999.{index}", dt.timedelta(hours=1)) == set(asked)
        assert sorted(d[2] for d in ledger.deliveries("1.3.0")) == [f"worker-{i}" for i in range(WORKERS)]
    finally:
        engine.dispose()


def test_patient_links_concurrent_upserts_keep_one_row(pool: Workers, db: str) -> None:
    race(pool, _links, db)
    assert count(db, tables.patient_links) == ROUNDS
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(tables.patient_links)).all()
    finally:
        engine.dispose()
    assert {r.remote_patient_id for r in rows} <= {f"R{i}" for i in range(WORKERS)}
    assert all(r.last_seen >= r.first_seen for r in rows)


def test_job_instances_added_concurrently_are_counted_once(pool: Workers, db: str, tmp_path: Path) -> None:
    engine = make_engine(db)
    job = SqlJobStore(engine).create("pull-priors", {})
    engine.dispose()
    new = race(pool, _job_instances, db, job)
    assert sum(new) == 200  # each new instance counted by exactly one worker
    assert count(db, tables.job_instances) == 200
    assert count(db, tables.job_studies) == 1 + 5


def test_a_job_claim_is_held_by_one_worker(pool: Workers, db: str) -> None:
    engine = make_engine(db)
    store = SqlJobStore(engine)
    jobs = [store.create("pull-priors", {"n": i}) for i in range(8)]
    won = race(pool, _claim_same_job, db, jobs)
    for i, job in enumerate(jobs):
        assert sum(w[i] for w in won) == 1, f"job {job}: {sum(w[i] for w in won)} workers held the claim"
    for job in jobs:  # every claim was released
        claim = store.claim(job)
        assert claim is not None
        claim.release()
    engine.dispose()


def test_queued_jobs_are_each_run_once(pool: Workers, db: str) -> None:
    engine = make_engine(db)
    store = SqlJobStore(engine)
    jobs = {store.create("pull-priors", {"n": i}) for i in range(24)}
    ran = race(pool, _run_queue, db)
    runs = Counter(j for r in ran for j in r)
    assert set(runs) == jobs and set(runs.values()) == {1}, runs
    for job in jobs:
        record = store.get(job)
        assert record is not None and record.state == "completed" and len(record.summary["runs"]) == 1
    engine.dispose()


def test_concurrent_directory_imports_leave_one_whole_directory(pool: Workers, pg_url: str) -> None:
    open_database(pg_url, Path(".")).dispose()
    race(pool, _directory, pg_url)
    engine = make_engine(pg_url)
    try:
        names = [p.name for p in SqlDirectory(engine).partners()]
    finally:
        engine.dispose()
    assert len(names) == 5 and len({n.split("-")[0] for n in names}) == 1, names  # one import, not a mix


def test_a_killed_holder_frees_its_claim(db: str) -> None:
    engine = make_engine(db)
    store = SqlJobStore(engine)
    job = store.create("pull-priors", {})
    ctx = multiprocessing.get_context("spawn")
    held_r, held_w = ctx.Pipe(duplex=False)
    release_r, release_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_hold_claim, args=(db, job, held_w, release_r))
    proc.start()
    try:
        assert held_r.poll(TIMEOUT) and held_r.recv() is True
        assert store.claim(job) is None  # held by the other process
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(TIMEOUT)
        assert proc.exitcode == -signal.SIGKILL
        if engine.dialect.name == "postgresql":
            # the server ends the dead client's session, and its lock, once it sees the connection close:
            # wait for that in the server itself (a blocking lock request), with a deadline
            with engine.connect() as conn:
                conn.execute(text("SET lock_timeout = '30s'"))
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _advisory_key(job)})
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _advisory_key(job)})
        claim = store.claim(job)  # the kernel released the file lock with the process (SQLite)
        assert claim is not None, "the claim of a killed process was not released"
        claim.release()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        engine.dispose()


# -- `xig serve --workers 2` on PostgreSQL, behind real mutual TLS -----------------------------------------

HCID = IHE_TEST_IDS["home_community_id"]
AA = IHE_TEST_IDS["assigning_authority"]
REPO = IHE_TEST_IDS["repository_unique_id"]
SOURCE = IHE_TEST_IDS["imaging_source_id"]
EVRLE = "1.2.840.10008.1.2.1"


class ServeProcess:
    """``python -m gateway.cli serve --workers N``; its stdout lines announce readiness and replacements."""

    def __init__(self, config: Path, workers: int, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                                      "--workers", str(workers)], stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, text=True, cwd=config.parent,
                                     env={**os.environ, "COLUMNS": "400"})
        self.log_path = log
        self.url = ""
        self.pids: list[int] = []

    def next_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the CLI says something (or exits)
        assert line, f"xig serve exited with {self.proc.poll()}:\n{self.log_path.read_text()[-3000:]}"
        return line.strip()

    def ready(self) -> ServeProcess:
        line = self.next_line()
        match = re.search(r"on (https://\S+) with (\d+) worker processes \(([\d, ]+)\)", line)
        assert match, line
        self.url = match.group(1)
        self.pids = [int(p) for p in match.group(3).split(", ")]
        return self

    @contextlib.contextmanager
    def only(self, pid: int) -> Iterator[None]:
        """Every other worker is stopped (SIGSTOP): only ``pid`` can accept a new connection meanwhile."""
        others = [p for p in self.pids if p != pid]
        for p in others:
            os.kill(p, signal.SIGSTOP)
        try:
            yield
        finally:
            for p in others:
                os.kill(p, signal.SIGCONT)

    def stop(self) -> int:
        for p in self.pids:  # never leave a stopped worker behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


async def soap(cfg: Config, pki: CertSet, url: str, body: Any, action: str, **kw: Any) -> SoapReply:
    """One exchange on a new connection (a new TLS connection is what a worker accepts)."""
    async with SoapClient(client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)) as c:
        reply = await c.call(url, body, action, security=security_header(cfg, url), **kw)
    assert reply.fault is None, reply.fault
    return reply


@pytest.fixture
def two_workers(tmp_path: Path, pki: CertSet, pg_url: str) -> Iterator[tuple[Config, ServeProcess, list[Any]]]:
    path = write_config(tmp_path / "gw", pki, ids=IHE_TEST_IDS, extra=f'\n[database]\nurl = "{pg_url}"\n')
    cfg = load_config(path)
    studies = [make_study(tmp_path / "in" / "s1", patient_id="MW-1", patient_name="Worker^Wanda",
                          birth_date="19720304", sex="F", accession="MW1", study_description="CT chest",
                          series=(("CT", 3, "CHEST"), ("CT", 2, "CHEST")), seed="mw1"),
               make_study(tmp_path / "in" / "s2", patient_id="MW-1", patient_name="Worker^Wanda",
                          birth_date="19720304", sex="F", accession="MW2", study_description="MR head",
                          study_date="20230101", series=(("MR", 2, "HEAD"),), seed="mw2")]
    imported = subprocess.run([sys.executable, "-m", "gateway.cli", "pacs", "import", "--config", str(path),
                               str(tmp_path / "in")], capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr + imported.stdout
    server = ServeProcess(path, 2, tmp_path / "serve.log")
    try:
        yield cfg, server.ready(), studies
    finally:
        server.stop()


async def test_serve_with_two_workers_on_postgresql_answers_as_one(two_workers: Any, pki: CertSet,
                                                                 pg_url: str, tmp_path: Path) -> None:
    cfg, server, studies = two_workers
    first, second = server.pids
    assert first != second
    assert set(server.pids) <= {c.pid for c in psutil.Process(server.proc.pid).children()}  # + resource tracker
    base = server.url

    # ITI-55 through the first worker: the match is remembered in the shared database
    body, _ = iti55.build_request(
        PatientDemographics(names=(PersonName(family=("Worker",), given=("Wanda",)),), gender="F",
                            birth_time="19720304"),
        sender_device_id="2.999.2", home_community_id="urn:oid:2.999.2", receiver_device_id=HCID[8:],
        assigning_authority="2.999.2.1", local_patient_id="REMOTE-7")
    with server.only(first):
        found = iti55.parse_response((await soap(cfg, pki, base + XCPD.path, body, XCPD.request_action)).body)
    assert found.status == "match" and [p.patient_id.extension for p in found.patients] == ["MW-1"]

    # ITI-38 through each worker: the same on-demand DocumentEntries (uniqueId and entryUUID)
    query = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("MW-1", AA)))
    answers = []
    for pid in (first, second, first):
        with server.only(pid):
            reply = await soap(cfg, pki, base + XCA_QUERY.path, query, XCA_QUERY.request_action)
        answers.append(sorted((e.unique_id, e.entry_uuid) for e in iti38.parse_response(reply.body).entries))
    assert len(answers[0]) == 2 and answers[0] == answers[1] == answers[2]
    entry = next(e for e in iti38.parse_response(reply.body).entries
                 if f"{studies[0].StudyInstanceUID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID" in e.reference_ids)

    # ITI-39 (the KOS) through the second worker only
    with server.only(second):
        reply = await soap(cfg, pki, base + XCA_RETRIEVE.path, iti39.build_request(
            [DocumentRequest(HCID, REPO, entry.unique_id)]), XCA_RETRIEVE.request_action, use_mtom=True)
    doc = iti39.parse_response(reply.body, reply.attachments).documents[0]
    kos = parse_kos(doc.data if doc.data is not None else doc.attachment)
    assert {r.sop_instance_uid for r in kos.references} == {i.SOPInstanceUID for i in studies[0].instances}

    # RAD-75 through the first worker: authorised by the delivery the second one recorded
    items = [(r.study_uid, r.series_uid, DocumentRequest(HCID, r.retrieve_location_uid, r.sop_instance_uid))
             for r in kos.references]
    other = studies[1].instances[0]  # its study's KOS was never retrieved: refused
    items.append((studies[1].StudyInstanceUID, other.SeriesInstanceUID,
                  DocumentRequest(HCID, SOURCE, other.SOPInstanceUID)))
    out = tmp_path / "images"
    out.mkdir()
    with server.only(first):
        reply = await soap(cfg, pki, base + XCAI_RETRIEVE.path, rad75.build_request(rad75.imaging_request(
            items, [EVRLE])), XCAI_RETRIEVE.request_action, use_mtom=True,
            sink_factory=lambda _: mtom.FileSink(out))
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":PartialSuccess")
    assert {d.document_unique_id for d in res.documents} == {i.SOPInstanceUID for i in studies[0].instances}
    assert [(e.code, other.SOPInstanceUID in (e.context or "")) for e in res.errors] == [
        ("XDSDocumentUniqueIdError", True)]
    for d in res.documents:
        assert pydicom.dcmread(Path(d.attachment)).SOPInstanceUID == d.document_unique_id

    # one row per thing in the shared database, whichever worker wrote it
    assert count(pg_url, tables.document_entries) == 2
    assert count(pg_url, tables.kos_manifests) == 1 and count(pg_url, tables.kos_deliveries) == 1
    assert count(pg_url, tables.patient_links) == 1

    # a worker that dies is replaced; the replacement serves from the same database
    os.kill(first, signal.SIGKILL)
    line = server.next_line()
    assert f"replaced worker(s) {first} (exit code -9)" in line, line
    server.pids = [int(p) for p in line.rsplit("workers now ", 1)[1].split(", ")]
    replacement = next(p for p in server.pids if p not in (first, second))
    with server.only(replacement):
        reply = await soap(cfg, pki, base + XCAI_RETRIEVE.path, rad75.build_request(rad75.imaging_request(
            items[:1], [EVRLE])), XCAI_RETRIEVE.request_action, use_mtom=True)
    assert rad75.parse_response(reply.body, reply.attachments).status.endswith(":Success")

    # SIGTERM: every worker stops gracefully, then the parent exits 0
    assert server.stop() == 0
    assert not any(psutil.pid_exists(p) for p in server.pids)


def _running(pids: list[int]) -> list[psutil.Process]:
    """Those of ``pids`` still running (a zombie has exited: it only waits to be reaped)."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def test_workers_on_sqlite_stop_when_their_supervisor_is_killed(tmp_path: Path, pki: CertSet) -> None:
    """A SQLite file works for several workers too; and a killed parent leaves no worker serving unsupervised."""
    path = write_config(tmp_path / "gw", pki, extra='\n[database]\nurl = "sqlite:///xig.db"\n')
    server = ServeProcess(path, 2, tmp_path / "serve.log").ready()
    try:
        ctx = client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)
        for pid in server.pids:  # each worker answers
            with server.only(pid), httpx.Client(verify=ctx, timeout=30) as http:
                assert http.get(server.url + "/health").status_code == 200
        server.proc.kill()
        server.proc.wait(30)
        # orphans are reaped by whoever adopts them (maybe not at once): wait for the real condition
        deadline = time.monotonic() + 60
        while _running(server.pids) and time.monotonic() < deadline:
            psutil.wait_procs(_running(server.pids), timeout=1)
        assert _running(server.pids) == [], "workers kept running without their supervisor"
        assert "the supervising process is gone: stopping" in (tmp_path / "serve.log").read_text()
    finally:
        server.stop()
