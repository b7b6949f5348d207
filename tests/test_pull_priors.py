"""The import station end to end: two real responding communities, one importing community.

Discover (XCPD fan-out) → ITI-38 → ITI-39 → RAD-75 → reconcile → store in the local (embedded) PACS,
all over mutual TLS with signed assertions; an interrupted job resumes without re-downloading or
duplicating anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest

from gateway.config import Config, load_config
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.initiating.pull import JobBusyError, PullPriors, PullRequest
from gateway.pacs.factory import open_backends
from gateway.security.certs import CertSet
from gateway.store.db import open_database
from gateway.store.jobs import SqlJobStore
from gateway.store.ledger import SqlPatientLinks
from gateway.web.server import BackgroundServer
from tests.conftest import write_config

PATIENT = {"patient_name": "Rivera^Ana", "birth_date": "19750612", "sex": "F"}


def community(tmp_path: Path, pki: CertSet, name: str, hcid: str, extra: str = "") -> Config:
    oid = hcid.removeprefix("urn:oid:")
    return load_config(write_config(tmp_path / name, pki, ids={
        "home_community_id": hcid, "assigning_authority": f"{oid}.1", "repository_unique_id": f"{oid}.2",
        "imaging_source_id": f"{oid}.3"}, extra='[database]\nurl = "sqlite:///xig.db"\n' + extra))


@pytest.fixture
def world(tmp_path: Path, pki: CertSet) -> Any:
    servers: list[BackgroundServer] = []
    studies: dict[str, list[SyntheticStudy]] = {}
    partners = ""
    b_studies = [("CT", 5, "CHEST", "CT chest", "20240110"), ("MR", 3, "KNEE", "MR knee", "20220505")]
    c_studies = [("US", 2, "ABDOMEN", "US abd", "20230101")]
    for name, hcid, specs in (("b", "urn:oid:1.3.6.1.4.1.21367.13.70.202", b_studies),
                              ("c", "urn:oid:1.3.6.1.4.1.21367.13.70.203", c_studies)):
        cfg = community(tmp_path, pki, name, hcid)
        server = BackgroundServer(cfg).start()
        servers.append(server)
        made = [make_study(tmp_path / "seed" / f"{name}{i}", patient_id=f"{name.upper()}-77", **PATIENT,
                           accession=f"{name}{i}", study_description=desc, study_date=date,
                           series=((mod, n, part),), seed=f"{name}{i}")
                for i, (mod, n, part, desc, date) in enumerate(specs)]
        assert server.services.community.backends[0].index_directory(tmp_path / "seed").ok
        for study in made:  # the store holds its own copies
            for f in study.paths:
                f.unlink()
        studies[hcid] = made
        partners += f"""
[[partners]]
name = "Community {name.upper()}"
home_community_id = "{hcid}"
xcpd_url = "{server.url}/ihe/xcpd"
xca_query_url = "{server.url}/ihe/xca/query"
xca_retrieve_url = "{server.url}/ihe/xca/retrieve"
xcai_retrieve_url = "{server.url}/ihe/xcai/retrieve"
max_documents_per_request = 2
"""
    a = community(tmp_path, pki, "a", "urn:oid:1.3.6.1.4.1.21367.13.70.201", partners)
    engine = open_database(a.database.url, a.base_dir)
    local = open_backends(a, engine)[0]
    yield a, engine, local, studies
    for s in servers:
        s.stop()


REQUEST = PullRequest(family="RIVERA", given="Ana", birth_date="19750612", gender="F", local_id="LOCAL-5")


async def test_pull_priors_from_two_communities(world: Any) -> None:
    a, engine, local, studies = world
    events: list[tuple[str, dict[str, Any]]] = []
    job = PullPriors(a, SqlJobStore(engine), SqlPatientLinks(engine), local,
                     progress=lambda e, d: events.append((e, d)))
    found = await job.discover(REQUEST)
    assert found.errors == []
    assert sorted((s.description, s.instances) for s in found.studies) == [("CT chest", 5), ("MR knee", 3),
                                                                          ("US abd", 2)]
    # correlations stored: local id ↔ remote id per community
    assert len(SqlPatientLinks(engine).communities_for("LOCAL-5", a.gateway.assigning_authority)) == 2
    result = await job.run(found.job_id)
    assert result.complete and result.counts == {"stored": 10}
    # in the local PACS: reconciled to the local patient, originals kept, outside marker
    patients = local.list_patients()
    assert [(p.patient.PatientID, p.studies, p.instances) for p in patients] == [("LOCAL-5", 3, 10)]
    path = next((a.base_dir / "pacs").rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.PatientID == "LOCAL-5" and ds.IssuerOfPatientID == a.gateway.assigning_authority
    assert "[OUTSIDE]" in ds.StudyDescription and ds.AccessionNumber.startswith("EXT-")
    original = ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert original.PatientID in ("B-77", "C-77")


async def test_interrupted_job_resumes_without_duplicates(world: Any) -> None:
    a, engine, local, _ = world
    stored_first: list[str] = []

    with anyio.CancelScope() as scope:
        def progress(event: str, data: dict[str, Any]) -> None:
            if event == "stored":
                stored_first.append(data["sop"])
                if len(stored_first) == 3:
                    scope.cancel()  # the process dies here, mid-study
        job = PullPriors(a, SqlJobStore(engine), SqlPatientLinks(engine), local, progress=progress)
        found = await job.discover(REQUEST)
        await job.run(found.job_id)
    # the cancel lands inside a stored batch (2 per request): the rest of that batch is recorded, no more
    assert len(stored_first) in (3, 4)
    counts = SqlJobStore(engine).counts(found.job_id)
    assert counts["stored"] == len(stored_first) and counts["pending"] == 10 - len(stored_first)

    stored_again: list[str] = []
    resumed = PullPriors(a, SqlJobStore(engine), SqlPatientLinks(engine), local,
                         progress=lambda e, d: stored_again.append(d["sop"]) if e == "stored" else None)
    result = await resumed.run(found.job_id)
    assert result.complete and result.counts == {"stored": 10}
    assert not set(stored_again) & set(stored_first) and len(stored_again) == 10 - len(stored_first)  # none twice
    assert [(p.patient.PatientID, p.instances) for p in local.list_patients()] == [("LOCAL-5", 10)]


def test_killed_process_resumes_with_jobs_resume(world: Any) -> None:
    """`xig pull-priors` is SIGKILLed mid-import; `xig jobs resume` finishes it: nothing lost, nothing twice."""
    import json
    import os
    import signal
    import subprocess
    import sys

    a, engine, local, _ = world
    cfg_path = a.base_dir / "xig.toml"
    cmd = [sys.executable, "-m", "gateway.cli"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([*cmd, "pull-priors", "--config", str(cfg_path), "--family", "RIVERA", "--given", "Ana",
                             "--birth-date", "19750612", "--gender", "F", "--local-id", "LOCAL-5", "--yes", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    job_id, stored = None, 0
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "job":
            job_id = event["id"]
        if event.get("event") == "stored":
            stored += 1
            if stored == 3:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=30)
    assert job_id is not None and proc.returncode == -signal.SIGKILL
    jobs = SqlJobStore(engine)
    before = jobs.counts(job_id)
    assert 3 <= before.get("stored", 0) < 10 and before.get("pending", 0) > 0
    r = subprocess.run([*cmd, "jobs", "resume", job_id[:8], "--config", str(cfg_path), "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    assert sum(1 for e in resumed if e["event"] == "stored") == 10 - before["stored"]  # only what was missing
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["counts"] == {"stored": 10}
    assert [(p.patient.PatientID, p.instances) for p in local.list_patients()] == [("LOCAL-5", 10)]
    ls = subprocess.run([*cmd, "jobs", "ls", "--config", str(cfg_path)], capture_output=True, text=True, env=env)
    assert job_id[:8] in ls.stdout and "completed" in ls.stdout


def test_partners_from_a_fhir_directory(world: Any, tmp_path: Path, pki: CertSet) -> None:
    """`xig partners import` a directory bundle; pull-priors then reaches the partner it describes."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_initiating_client import endpoint, organization

    a, _, _, _ = world
    b_url = next(p.xcpd_url for p in a.partners if p.name == "Community B").rsplit("/ihe/", 1)[0]
    b_hcid = next(p.home_community_id for p in a.partners if p.name == "Community B")
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": organization(
        b_hcid.removeprefix("urn:oid:"), "B from the directory", [
            endpoint("e1", "ITI-55", b_url + "/ihe/xcpd"), endpoint("e2", "ITI-38", b_url + "/ihe/xca/query"),
            endpoint("e3", "ITI-39", b_url + "/ihe/xca/retrieve"),
            endpoint("e4", "RAD-75", b_url + "/ihe/xcai/retrieve"),
        ])}, {"resource": organization("2.999.10.2", "Plain HTTP Clinic", [
            endpoint("h1", "ITI-55", "http://clinic.example/xcpd")])}]}
    (tmp_path / "directory.json").write_text(json.dumps(bundle))
    station = community(tmp_path, pki, "station", "urn:oid:1.3.6.1.4.1.21367.13.70.209")  # no [[partners]]
    cfg_path = station.base_dir / "xig.toml"
    cmd, env = [sys.executable, "-m", "gateway.cli"], {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([*cmd, "partners", "import", str(tmp_path / "directory.json"), "--config", str(cfg_path)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "1 partner(s) imported" in r.stdout and "Plain HTTP Clinic" in r.stderr
    r = subprocess.run([*cmd, "partners", "ls", "--config", str(cfg_path), "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    listed = json.loads(r.stdout)
    assert [(p["name"], p["source"], p["response_times"]) for p in listed] == [("B from the directory", "directory",
                                                                               {})]
    r = subprocess.run([*cmd, "pull-priors", "--config", str(cfg_path), "--family", "RIVERA", "--given", "Ana",
                        "--birth-date", "19750612", "--gender", "F", "--local-id", "L-9", "--yes", "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["counts"] == {"stored": 8}  # B's two studies (5 + 3 instances)
    # the pull recorded how long B took to answer XCPD and the query (the next fan-outs start the slowest first)
    r = subprocess.run([*cmd, "partners", "ls", "--config", str(cfg_path), "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    (b,) = json.loads(r.stdout)
    assert set(b["response_times"]) == {"ITI-55", "ITI-38"}, b
    assert all(t["samples"] == 1 and 0 < t["average_seconds"] == t["last_seconds"] < 60
               for t in b["response_times"].values()), b
    r = subprocess.run([*cmd, "partners", "ls", "--config", str(cfg_path)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and "Usually answers in" in r.stdout and "ITI-55" in r.stdout and "(1×)" in r.stdout


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
async def test_import_into_a_real_orthanc(world: Any, tmp_path: Path, pki: CertSet, orthanc: Any, kind: str) -> None:
    """The local PACS is a real Orthanc: STOW-RS (dicomweb) or C-STORE (dimse)."""
    import httpx

    from tests.test_rad75_e2e import pacs_section

    a, _, _, _ = world
    text = (a.base_dir / "xig.toml").read_text().replace('[pacs]\nkind = "filesystem"\npath = "pacs"\n',
                                                         pacs_section(kind, orthanc))
    (tmp_path / "orthanc-station").mkdir()
    (tmp_path / "orthanc-station" / "xig.toml").write_text(text)
    cfg = load_config(tmp_path / "orthanc-station" / "xig.toml")
    engine = open_database(cfg.database.url, cfg.base_dir)
    local = open_backends(cfg, engine)[0]
    try:
        job = PullPriors(cfg, SqlJobStore(engine), SqlPatientLinks(engine), local)
        found = await job.discover(PullRequest("RIVERA", "Ana", "19750612", "F", local_id="ORTHANC-LOCAL-1"))
        result = await job.run(found.job_id)
        assert result.complete and result.counts == {"stored": 10}
    finally:
        await local.aclose()
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{orthanc.dicomweb_url}/instances", params={"PatientID": "ORTHANC-LOCAL-1"})
        instances = r.json()
    assert len(instances) == 10
    assert all(i["00100010"]["Value"][0]["Alphabetic"] == "RIVERA^Ana" for i in instances)


async def test_a_job_run_by_another_process_is_refused(world: Any) -> None:
    a, engine, local, _ = world
    job = PullPriors(a, SqlJobStore(engine), SqlPatientLinks(engine), local)
    found = await job.discover(REQUEST)
    claim = SqlJobStore(engine).claim(found.job_id)  # another worker holds it (a file lock beside the database)
    assert claim is not None
    with claim, pytest.raises(JobBusyError, match="being run by another process"):
        await job.run(found.job_id)
    assert SqlJobStore(engine).counts(found.job_id) == {"pending": 10}  # nothing imported meanwhile
    result = await job.run(found.job_id)  # released: it runs
    assert result.complete
