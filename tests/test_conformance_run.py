"""``xig conformance run`` / ``list``: the whole initiator-role suite against XIG's own responding gateway.

The gateway under test is a real XIG responding gateway (mutual TLS, signed assertions) on a real Orthanc
holding the conformance test data; the tester is a second XIG configuration whose ``[[partners]]`` entry
points at it. Every scenario must pass, the JUnit XML, the self-contained HTML report and the raw exchanges
must be written, and mistakes in the setup must end in one clear sentence (exit 2), never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from typer.testing import CliRunner, Result

from conformance import runner
from conformance.scenarios import SCENARIOS, select
from conformance.target import load_target
from gateway.cli import app
from gateway.config import load_config
from gateway.security.certs import CertSet
from gateway.web.server import BackgroundServer
from tests.conformance_fixtures import responder_config, runner_config, seed, start_responder
from tests.conftest import write_config
from tests.orthanc import OrthancServer, free_port

IDS = [s.scenario_id for s in SCENARIOS]


@pytest.fixture(scope="module")
def seeded(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> OrthancServer:
    seed(orthanc, tmp_path_factory.mktemp("conformance-data"))
    return orthanc


@pytest.fixture(scope="module")
def responder(seeded: OrthancServer, pki: CertSet, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[BackgroundServer]:
    server = start_responder(responder_config(tmp_path_factory.mktemp("responder"), pki, seeded))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def runner_toml(responder: BackgroundServer, pki: CertSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runner_config(tmp_path_factory.mktemp("runner"), pki, responder)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def junit_cases(junit: Path) -> dict[str, etree._Element]:
    root = etree.parse(str(junit)).getroot()
    return {tc.get("name"): tc for tc in root.iter("testcase")}


def test_full_suite_passes_against_xig(runner_toml: Path, tmp_path: Path) -> None:
    junit, report = tmp_path / "out" / "results.xml", tmp_path / "out" / "report.html"
    result = invoke("conformance", "run", "--config", runner_toml, "--junit", junit, "--report", report)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for sid in IDS:  # the live summary: one line per scenario as it finishes
        assert f"PASS {sid}" in result.output
    assert f"PASSED: {len(IDS)} passed, 0 failed, 0 could not run" in result.output

    root = etree.parse(str(junit)).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == (str(len(IDS)), "0", "0")
    cases = junit_cases(junit)
    assert list(cases) == IDS
    lines = [ln for tc in cases.values() for ln in (tc.findtext("system-out") or "").splitlines()[1:]]
    assert len(lines) > 200, "every scenario makes many checks"
    assert all(ln.startswith("PASS [") and " (" in ln for ln in lines)  # each check cites its clause
    for expected in ("[metadata.format-code]", "[kos.dciodvfy]", "[rad75.transfer-syntax]", "[security.fault]",
                     "[xcpd.case]", "[soap.relates-to]", "[xsd.valid]", "(RAD TF-3 4.68.4.1.2.3.2"):
        assert any(expected in ln for ln in lines), expected
    assert {tc.get("classname") for tc in cases.values()} >= {"conformance.XCPD", "conformance.RAD-75"}

    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    for forbidden in ("<script", "<link", " src=", 'href="http'):
        assert forbidden not in html  # self-contained: nothing fetched from anywhere
    assert all(f'id="{sid}"' in html for sid in IDS)

    folder = tmp_path / "out" / "report-exchanges"  # default: beside the report
    index = json.loads((folder / "index.json").read_text())
    assert {e["scenario"] for e in index} == set(IDS)
    for entry in index:
        request = (folder / entry["request"]).read_bytes()
        response = (folder / entry["response"]).read_bytes()
        assert request.startswith(b"POST https://127.0.0.1:") and b"Envelope" in request
        assert response.startswith(b"HTTP/1.1 ")
    retrieve = next(e for e in index if e["transaction"] == "RAD-75" and e["status"] == 200)
    assert b"multipart/related" in (folder / retrieve["response"]).read_bytes()
    unsigned = next(e for e in index if e["scenario"] == "security-unsigned-assertion")
    assert unsigned["status"] == 400 and b"wsse:InvalidSecurityToken" in (folder / unsigned["response"]).read_bytes()


async def test_suite_passes_against_stable_entries_and_streamed_retrieves(seeded: OrthancServer, pki: CertSet,
                                                                         tmp_path: Path) -> None:
    """The other responder layouts XIG offers: Stable KOS entries (size, hash, no NewDocumentUniqueId) and
    RAD-75 answers whose root part comes last (XOP ``start``)."""
    config = responder_config(tmp_path / "responder", pki, seeded,
                              extra='\n[responder]\nkos_entry_type = "stable"\nrad75_root_part = "last"\n')
    server = start_responder(config)
    try:
        target = load_target(load_config(runner_config(tmp_path / "runner", pki, server)))
        report = await runner.run(target, select())
    finally:
        server.stop()
    failed = {r.scenario_id: r.error or [c.check_id for c in r.checks if not c.passed]
              for r in report.results if r.status != "passed"}
    assert report.passed and not failed, failed
    entries = next(r for r in report.results if r.scenario_id == "iti38-find-leafclass")
    assert "Stable entries carry size, hash and creationTime" in {c.title for c in entries.checks}


def test_partner_setup_file_and_scenario_selection(runner_toml: Path, tmp_path: Path) -> None:
    """``--partner FILE`` alone: the file is a whole partner setup (an XIG configuration, one [[partners]])."""
    out = tmp_path / "results"
    result = invoke("conformance", "run", "--partner", runner_toml, "-s", "xcpd-match", "-s", "iti38-*",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert list(junit_cases(out / "results.xml")) == ["xcpd-match", "iti38-find-leafclass", "iti38-find-objectref",
                                                    "iti38-get-documents"]
    assert (out / "report.html").is_file() and (out / "exchanges" / "index.json").is_file()


def test_failures_exit_1_and_reports_escape_what_the_partner_sent(responder: BackgroundServer, pki: CertSet,
                                                                  tmp_path: Path) -> None:
    """A test patient the partner does not hold: xcpd-match fails with the right diagnosis, the scenario that
    needs the patient cannot run; the reports say so and escape every text."""
    toml = runner_config(tmp_path / "runner", pki, responder, family="Nobody<script>alert(1)</script>")
    junit, report = tmp_path / "r.xml", tmp_path / "r.html"
    result = invoke("conformance", "run", "--config", toml, "-s", "xcpd-match", "-s", "iti38-find-leafclass",
                    "--junit", junit, "--report", report)
    assert result.exit_code == 1, result.output
    assert "FAIL xcpd-match" in result.output and "ERROR iti38-find-leafclass" in result.output
    assert "NOT PASSED: 0 passed, 1 failed, 1 could not run" in result.output
    cases = junit_cases(junit)
    failure = cases["xcpd-match"].find("failure")
    assert failure is not None and "xcpd.case" in failure.get("message", "")
    assert "[xcpd.case] the answer is Case 1 (one match) (ITI TF-2 3.55.4.2.3)" in (failure.text or "")
    assert "Case 4 (no match)" in (failure.text or "")
    error = cases["iti38-find-leafclass"].find("error")
    assert error is not None and "prerequisite" in error.get("message", "")
    html = report.read_text(encoding="utf-8").lower()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "could not run to the end" in html


def test_unreachable_partner_is_a_diagnosis_not_a_crash(pki: CertSet, tmp_path: Path) -> None:
    port = free_port()
    toml = write_config(tmp_path / "runner", pki, extra=f"""
[conformance]
family = "CONFORMITY"
given = "Cora"
birth_date = "19310611"

[[partners]]
name = "Gone"
home_community_id = "urn:oid:2.999.404"
xcpd_url = "https://127.0.0.1:{port}/ihe/xcpd"
timeout_seconds = 5
""")
    junit = tmp_path / "gone.xml"
    result = invoke("conformance", "run", "--config", toml, "-s", "xcpd-*", "-s", "iti38-find-leafclass",
                    "--junit", junit)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    cases = junit_cases(junit)
    failure = cases["xcpd-match"].find("failure")
    text = failure.text or "" if failure is not None else ""
    assert "[soap.reply]" in text and "connection refused" in text
    error = cases["iti38-find-leafclass"].find("error")
    assert error is not None and "no endpoint for ITI-38" in error.get("message", "")


def test_list_shows_every_scenario_with_its_clauses() -> None:
    result = invoke("conformance", "list", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [s["id"] for s in listed] == IDS
    assert all(s["spec"] and s["transactions"] and s["description"] for s in listed)
    table = invoke("conformance", "list")
    assert table.exit_code == 0 and all(sid in table.output for sid in IDS)
    assert "ITI TF-2 3.55.4.2.3" in table.output and "RAD TF-3 4.68.4.1.2.3.2" in table.output


def test_setup_mistakes_are_one_sentence_and_exit_2(runner_toml: Path, pki: CertSet, tmp_path: Path) -> None:
    cases: list[tuple[list[str | Path], str]] = [
        (["--config", runner_toml, "-s", "no-such-*"], "no scenario matches 'no-such-*'"),
        (["--partner", tmp_path / "missing.toml"], "is not a file"),
        ([], "give --config FILE"),
        (["--config", runner_toml, "--partner", "Elsewhere"], "no [[partners]] entry named 'Elsewhere'"),
        (["--config", write_config(tmp_path / "bare", pki)], "no [[partners]] entry"),
    ]
    no_patient = write_config(tmp_path / "nopatient", pki, extra='\n[[partners]]\nname = "X"\n'
                                                                  'home_community_id = "urn:oid:2.999.5"\n')
    cases.append((["--config", no_patient], "conformance.family is not set"))
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    junit = tmp_path / "never.xml"
    cases.append((["--config", runner_toml, "--junit", junit, "--exchanges", foreign], "is not an exchanges folder"))
    for args, message in cases:
        result = invoke("conformance", "run", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert not junit.exists() and (foreign / "notes.txt").read_text() == "keep me"
