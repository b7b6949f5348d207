"""The step-by-step initiating commands against real XIG responders over mutual TLS.

``xig discover`` → ``xig documents`` → ``xig retrieve-kos`` → ``xig retrieve-images``, with the exit codes and
messages an operator relies on: 0 success, 1 partner failure / nothing found, 2 usage errors.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pydicom
import pytest
import typer
from typer.testing import CliRunner

from gateway.cli_steps import register
from gateway.config import Config, ConfigError, load_config
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.security.certs import CertSet
from gateway.store.db import open_database
from gateway.store.response_times import SqlResponseTimes
from gateway.web.server import BackgroundServer
from tests.conftest import write_config

PATIENT: dict[str, Any] = {"patient_name": "Rivera^Ana", "birth_date": "19750612", "sex": "F"}
B_HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.202"
C_HCID = "urn:oid:1.3.6.1.4.1.21367.13.70.203"


def community(tmp_path: Path, pki: CertSet, name: str, hcid: str, extra: str = "") -> Config:
    oid = hcid.removeprefix("urn:oid:")
    return load_config(write_config(tmp_path / name, pki, ids={
        "home_community_id": hcid, "assigning_authority": f"{oid}.1", "repository_unique_id": f"{oid}.2",
        "imaging_source_id": f"{oid}.3"}, extra='[database]\nurl = "sqlite:///xig.db"\n' + extra))


def partner_entry(name: str, hcid: str, url: str, extra: str = "") -> str:
    return f"""
[[partners]]
name = "{name}"
home_community_id = "{hcid}"
xcpd_url = "{url}/ihe/xcpd"
xca_query_url = "{url}/ihe/xca/query"
xca_retrieve_url = "{url}/ihe/xca/retrieve"
xcai_retrieve_url = "{url}/ihe/xcai/retrieve"
max_documents_per_request = 2
timeout_seconds = 10
{extra}"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: CertSet) -> Any:
    """Communities B (CT 5 + MR 3 instances) and C (US 2), an importing station A whose [[partners]] also
    name a dead partner (closed port) and B again under another community id with purpose MARKETING."""
    tmp_path = tmp_path_factory.mktemp("steps")
    servers: list[BackgroundServer] = []
    studies: dict[str, list[SyntheticStudy]] = {}
    partners = ""
    b_studies = [("CT", 5, "CHEST", "CT chest", "20240110"), ("MR", 3, "KNEE", "MR knee", "20220505")]
    c_studies = [("US", 2, "ABDOMEN", "US abd", "20230101")]
    try:
        for name, hcid, specs in (("b", B_HCID, b_studies), ("c", C_HCID, c_studies)):
            cfg = community(tmp_path, pki, name, hcid)
            server = BackgroundServer(cfg).start()
            servers.append(server)
            made = [make_study(tmp_path / "seed" / name / f"{name}{i}", patient_id=f"{name.upper()}-77", **PATIENT,
                               accession=f"{name}{i}", study_description=desc, study_date=date,
                               series=((mod, n, part),), seed=f"{name}{i}")
                    for i, (mod, n, part, desc, date) in enumerate(specs)]
            assert server.services.community.backends[0].index_directory(tmp_path / "seed" / name).ok
            studies[hcid] = made
            partners += partner_entry(f"Community {name.upper()}", hcid, server.url)
        b_url = servers[0].url
        partners += partner_entry("Dead", "urn:oid:2.999.66", f"https://127.0.0.1:{closed_port()}")
        partners += partner_entry("Marketing B", "urn:oid:2.999.67", b_url, 'purpose_of_use = "MARKETING"\n')
        a = community(tmp_path, pki, "a", "urn:oid:1.3.6.1.4.1.21367.13.70.201", partners)
        yield a, studies, tmp_path
    finally:
        for s in servers:
            s.stop()


def load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError:
        raise typer.Exit(2) from None


APP = typer.Typer()
register(APP, load)
RUNNER = CliRunner()


def xig(*args: str) -> Any:
    result = RUNNER.invoke(APP, list(args), env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def cfg_path(a: Config) -> str:
    return str(a.base_dir / "xig.toml")


DEMOGRAPHICS = ("--family", "RIVERA", "--given", "Ana", "--birth-date", "19750612", "--gender", "F")


def test_chained_discover_documents_retrieve_kos_retrieve_images(world: Any, tmp_path: Path) -> None:
    a, studies, _ = world
    c = cfg_path(a)
    # ITI-55 fan-out to B and C
    r = xig("discover", "--config", c, *DEMOGRAPHICS, "--local-id", "LOCAL-5", "--partner", "Community B",
            "--partner", "Community C", "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    found = json.loads(r.stdout)
    assert found["ok"] and [p["status"] for p in found["partners"]] == ["match", "match"]
    b = next(p for p in found["partners"] if p["partner"] == "Community B")
    assert b["matches"][0]["home_community_id"] == B_HCID and b["seconds"] > 0
    patient_id = b["matches"][0]["patient_id"]
    # each partner's response time is recorded in the station's database (the next fan-out asks the slowest first)
    engine = open_database(a.database.url, a.base_dir)
    try:
        first = {hcid: samples for tr, hcid, _, _, samples, _ in SqlResponseTimes(engine).all() if tr == "ITI-55"}
        assert first.keys() >= {B_HCID, C_HCID} and first[B_HCID] >= 1
        # the table form too
        r = xig("discover", "--config", c, *DEMOGRAPHICS, "--partner", "Community B")
        assert r.exit_code == 0 and "Community B" in r.stdout and "match (1)" in r.stdout and B_HCID in r.stdout
        again = {hcid: samples for tr, hcid, _, _, samples, _ in SqlResponseTimes(engine).all() if tr == "ITI-55"}
        assert again[B_HCID] == first[B_HCID] + 1 and again[C_HCID] == first[C_HCID]
    finally:
        engine.dispose()
    # XIG answers NotHealthDataLocator: the flag is shown per match, not dropped
    assert b["matches"][0]["health_data_locator"] is False
    row = next(line for line in r.stdout.splitlines() if "match (1)" in line)
    assert "Locator" in r.stdout and re.search(r"│\s*no\s*│", row), row

    # ITI-38 at B with the id B gave us
    r = xig("documents", "--config", c, "--partner", "Community B", "--patient-id", patient_id, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    docs = json.loads(r.stdout)["documents"]
    assert sorted(tuple(d["modalities"]) for d in docs) == [("CT",), ("MR",)]
    assert all(d["home_community_id"] == B_HCID and d["entry_type"] in ("stable", "on-demand") for d in docs)
    r = xig("documents", "--config", c, "--partner", "Community B", "--patient-id", patient_id)
    assert r.exit_code == 0 and "2 imaging manifest(s)" in r.stdout and docs[0]["unique_id"] in r.stdout

    # ITI-39: both manifests (the repository found by GetDocuments), written to a folder
    kos_dir = tmp_path / "kos"
    args = [x for d in docs for x in ("--document-id", d["unique_id"])]
    r = xig("retrieve-kos", "--config", c, "--partner", "Community B", *args, "--out", str(kos_dir), "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)["documents"]
    assert sorted(g["instances"] for g in got) == [3, 5] and all(g["studies"] == 1 and g["series"] == 1
                                                                for g in got)
    assert all(g["new_document_unique_id"] for g in got)  # XIG's entries are On-Demand: a new id per retrieve
    kos_files = [Path(g["path"]) for g in got]
    assert all(f.parent == kos_dir and f.is_file() for f in kos_files)
    assert not [p for p in kos_dir.iterdir() if p.name.startswith(".")]  # atomic: no temporary left
    # the text form, with an explicit repository id (no lookup)
    r = xig("retrieve-kos", "--config", c, "--partner", "Community B", "--document-id", docs[0]["unique_id"],
            "--repository-id", got[0]["repository_unique_id"], "--out", str(tmp_path / "kos2"))
    assert r.exit_code == 0, r.stdout + r.stderr

    # RAD-75: every instance of each KOS, one file per instance, SOP Instance UIDs as in the KOS
    seeded = {s.StudyInstanceUID: s for s in studies[B_HCID]}
    for kos_file in kos_files:
        kos = parse_kos(kos_file)
        assert kos.study_instance_uid in seeded
        out = tmp_path / "images" / kos_file.stem
        r = xig("retrieve-images", "--config", c, "--partner", "Community B", "--kos", str(kos_file),
                "--out", str(out), "--json")
        assert r.exit_code == 0, r.stdout + r.stderr
        summary = json.loads(r.stdout)
        assert summary["ok"] and summary["delivered"] == len(kos.references) and summary["failed"] == 0
        assert summary["batches"] == (len(kos.references) + 1) // 2  # max_documents_per_request = 2
        assert [(s["requested"], s["delivered"]) for s in summary["series"]] == [(len(kos.references),) * 2]
        files = sorted(out.iterdir())
        assert len(files) == len(kos.references)
        uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
        assert uids == {ref.sop_instance_uid for ref in kos.references}
        assert {f.name for f in files} == {f"{u}.dcm" for u in uids}
        assert uids == {i.SOPInstanceUID for i in seeded[kos.study_instance_uid].instances}  # what B was seeded with
    r = xig("retrieve-images", "--config", c, "--partner", "Community B", "--kos", str(kos_files[0]),
            "--out", str(tmp_path / "images-text"))
    assert r.exit_code == 0 and "written to" in r.stdout

    # a manifest naming an instance B does not hold: the others are delivered, the missing one is reported
    ds = pydicom.dcmread(kos_files[0])
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    bogus = pydicom.Dataset()
    bogus.ReferencedSOPClassUID = series.ReferencedSOPSequence[0].ReferencedSOPClassUID
    bogus.ReferencedSOPInstanceUID = "2.25.1234567890"
    series.ReferencedSOPSequence.append(bogus)
    ds.save_as(tmp_path / "bogus-kos.dcm")
    n = len(series.ReferencedSOPSequence)
    out = tmp_path / "images-partial"
    r = xig("retrieve-images", "--config", c, "--partner", "Community B", "--kos", str(tmp_path / "bogus-kos.dcm"),
            "--out", str(out), "--json")
    assert r.exit_code == 1, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert (summary["delivered"], summary["failed"]) == (n - 1, 1)
    [failure] = summary["failures"]
    assert failure["sop_instance_uid"] == "2.25.1234567890" and failure["error_code"]
    assert summary["series"][0]["errors"] == {failure["error_code"]: 1}
    assert "2.25.1234567890" in r.stderr and failure["error_code"] in r.stderr
    assert len(list(out.iterdir())) == n - 1


def test_unreachable_partner(world: Any, tmp_path: Path) -> None:
    a, _, _ = world
    c = cfg_path(a)
    r = xig("documents", "--config", c, "--partner", "Dead", "--patient-id", "X^^^&1.2.3&ISO")
    assert r.exit_code == 1
    assert "partner Dead, ITI-38: connection refused" in r.stderr and "Traceback" not in r.stderr + r.stdout
    r = xig("discover", "--config", c, *DEMOGRAPHICS, "--partner", "Dead", "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["partners"][0]["status"] == "failed" and out["partners"][0]["error"]["kind"] == "unreachable"
    # a fan-out where one partner is dead still succeeds with the others, and says which one failed
    r = xig("discover", "--config", c, *DEMOGRAPHICS, "--partner", "Dead", "--partner", "Community C")
    assert r.exit_code == 0 and "connection refused" in r.stderr and "failed (unreachable)" in r.stdout
    r = xig("retrieve-kos", "--config", c, "--partner", "Dead", "--document-id", "1.2.3", "--out",
            str(tmp_path / "k"), "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["error"]["kind"] == "unreachable"


def test_a_database_that_cannot_be_opened_is_one_sentence(world: Any, tmp_path: Path) -> None:
    a, _, _ = world
    (tmp_path / "station").mkdir()
    broken = tmp_path / "station" / "xig.toml"
    broken.write_text((a.base_dir / "xig.toml").read_text().replace('url = "sqlite:///xig.db"',
                                               f'url = "postgresql://xig@127.0.0.1:{closed_port()}/xig"'))
    r = xig("discover", "--config", str(broken), *DEMOGRAPHICS, "--partner", "Community B", "--json")
    assert r.exit_code == 1 and "cannot open the database postgresql://" in r.stderr, r.stderr
    assert json.loads(r.stdout)["error"]["kind"] == "database" and "Traceback" not in r.stderr + r.stdout


def test_usage_errors_exit_2(world: Any, tmp_path: Path) -> None:
    a, _, _ = world
    c = cfg_path(a)
    r = xig("documents", "--config", c, "--partner", "Nobody", "--patient-id", "X^^^&1.2.3&ISO")
    assert r.exit_code == 2 and "no partner named" in r.stderr and "Community B" in r.stderr
    r = xig("discover", "--config", c, *DEMOGRAPHICS, "--partner", "Nobody")
    assert r.exit_code == 2 and "Nobody" in r.stderr
    r = xig("discover", "--config", c, "--family", "X", "--given", "Y", "--birth-date", "1975", "--gender", "Q")
    assert r.exit_code == 2 and "--gender" in r.stderr
    r = xig("documents", "--config", c, "--partner", "Community B", "--patient-id", "^^^")
    assert r.exit_code == 2 and "--patient-id" in r.stderr
    (tmp_path / "not-a-kos.dcm").write_bytes(b"nothing")
    r = xig("retrieve-images", "--config", c, "--partner", "Community B", "--kos", str(tmp_path / "not-a-kos.dcm"),
            "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not a DICOM" in r.stderr
    r = xig("documents", "--config", str(tmp_path / "missing.toml"), "--partner", "B", "--patient-id", "X")
    assert r.exit_code == 2


def test_soap_fault_is_reported(world: Any, tmp_path: Path) -> None:
    a, _, _ = world
    c = cfg_path(a)
    r = xig("documents", "--config", c, "--partner", "Marketing B", "--patient-id", "B-77^^^&1.2.3&ISO")
    assert r.exit_code == 1
    assert "SOAP fault Sender/wsse:FailedAuthentication" in r.stderr and "MARKETING" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = xig("discover", "--config", c, *DEMOGRAPHICS, "--partner", "Marketing B", "--json")
    assert r.exit_code == 1
    fault = json.loads(r.stdout)["partners"][0]["error"]["fault"]
    assert fault["code"] == "Sender" and fault["subcode"].endswith("FailedAuthentication")
    assert "MARKETING" in fault["reason"] + (fault["detail"] or "")


def test_nothing_found_exit_1(world: Any) -> None:
    a, _, _ = world
    c = cfg_path(a)
    r = xig("discover", "--config", c, "--family", "NOBODY", "--given", "Zed", "--birth-date", "19000101",
            "--gender", "M", "--partner", "Community C")
    assert r.exit_code == 1 and "NF" in r.stdout
    r = xig("documents", "--config", c, "--partner", "Community C", "--patient-id",
            "NOBODY^^^&1.3.6.1.4.1.21367.13.70.203.1&ISO", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["documents"] == []
