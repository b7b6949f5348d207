"""``xig audit ls`` / ``xig audit export`` over a trail filled by a real AuditTrail delivering to a real rsyslogd
(one repository reachable, one not)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from gateway.audit import events as ev
from gateway.audit.model import AuditMessage, AuditSource
from gateway.audit.trail import AuditTrail
from gateway.audit.xml import parse, serialize, validate
from gateway.cli_audit import parse_since, register
from gateway.config import Config, ConfigError, load_config
from gateway.security.certs import CertSet
from gateway.store.db import open_database
from tests.conftest import write_config
from tests.rsyslog import Rsyslog, free_port


def load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError:
        raise typer.Exit(2) from None


APP = typer.Typer()
register(APP, load)
RUNNER = CliRunner()

SOURCE = AuditSource("XIG-TEST", enterprise_site_id="urn:oid:2.999.1")
ALICE = ev.Requestor("alice<Alice.Smith@idp.a.example>", "Alice Smith", "Hospital A", "urn:oid:2.999.7",
                     "urn:oid:2.999.7")
BOB = ev.Requestor("bob<bob@idp.b.example>", "Bob", "Clinic B", "urn:oid:2.999.8", "urn:oid:2.999.8")
P100 = "P-100^^^&2.999.1.1&ISO"
P200 = "P-200^^^&2.999.1.1&ISO"
STUDY = "1.2.826.0.1.3680043.8.498.1"


def ctx(when: dt.datetime, user: ev.Requestor) -> ev.Context:
    return ev.Context(side="responding", outcome=0, when=when, source=SOURCE,
                      initiator=ev.Peer("https://initiator.example.org/ihe", "127.0.0.1"),
                      responder=ev.Peer("https://127.0.0.1:8443/ihe/xca/query", "localhost", "4242"), user=user)


def at(month: int, day: int) -> dt.datetime:
    return dt.datetime(2026, month, day, 9, 30, tzinfo=dt.UTC)


MESSAGES: list[AuditMessage] = [
    *ev.iti55(ctx(at(1, 10), ALICE), query=b"<QueryByParameter/>", home_community_id="urn:oid:2.999.7",
              patients=[P100]),
    *ev.iti38(ctx(at(2, 10), BOB), query=b"<AdhocQueryRequest/>", query_id="urn:uuid:14d4debf-8f97-4251-9a74",
              home_community_id="urn:oid:2.999.8", patient=P200),
    *ev.rad75(ctx(at(3, 10), ALICE), studies=[ev.StudyRef(STUDY, "2.999.1.3", "urn:oid:2.999.8")], patient=P100),
    ev.application_activity(when=at(3, 11), source=SOURCE, started=True, process=ev.Peer("XIG-TEST", "localhost")),
]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, pki: CertSet) -> Iterator[tuple[Path, str, str]]:
    """A config whose database holds MESSAGES: delivered to a live rsyslogd, pending for a dead repository."""
    directory = tmp_path_factory.mktemp("audit-cli")
    rs = Rsyslog(directory / "rsyslog", certificate=pki.partner_cert, private_key=pki.partner_key,
                 client_ca=pki.ca_cert).start()
    dead_port = free_port()
    path = write_config(directory / "gw", pki, extra=f"""
[database]
url = "sqlite:///xig.db"

[audit]
retry_seconds = 0.1

[[audit.repositories]]
name = "arr-live"
host = "127.0.0.1"
port = {rs.tls_port}

[[audit.repositories]]
name = "arr-dead"
host = "127.0.0.1"
port = {dead_port}
""")
    cfg = load_config(path)
    engine = open_database(cfg.database.url, cfg.base_dir)
    trail = AuditTrail.open(cfg, engine)
    try:
        for m in MESSAGES:
            trail.record(m)

        def settled(s: dict[str, Any]) -> bool:
            live, dead = s["repositories"]
            return bool(live["pending"] == 0 and live["in_flight"] == 0 and dead["last_error"])
        assert trail.wait_until(settled, 60), trail.status()
    finally:
        trail.close(1.0)
        engine.dispose()
        rs.stop()
    yield path, "arr-live", "arr-dead"


def xig(*args: str) -> Any:
    result = RUNNER.invoke(APP, list(args), env={"COLUMNS": "250"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def ls_json(path: Path, *filters: str) -> list[dict[str, Any]]:
    result = xig("audit", "ls", "--config", str(path), "--json", *filters)
    assert result.exit_code == 0, result.output
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return items


def events_of(items: list[dict[str, Any]]) -> list[str]:
    return [i["event"] for i in items]


def test_ls_lists_newest_first_with_summary_and_delivery_state(filled: tuple[Path, str, str]) -> None:
    path, live, dead = filled
    items = ls_json(path)
    assert events_of(items) == ["110100", "RAD-75", "ITI-38", "ITI-55"]
    rad75 = items[1]
    assert rad75["patients"] == [P100] and rad75["studies"] == [STUDY]
    assert rad75["user"] == "alice<Alice.Smith@idp.a.example>" and rad75["community"] == "urn:oid:2.999.8"
    assert rad75["event_time"] == "2026-03-10T09:30:00+00:00" and rad75["outcome_text"] == "success"
    for item in items:
        states = {d["repository"]: d for d in item["delivery"]}
        assert states[live]["state"] == "delivered" and states[live]["delivered_at"]
        assert states[dead]["state"] == "pending" and "refused" in states[dead]["last_error"]
        assert "message" not in item

    table = xig("audit", "ls", "--config", str(path))
    assert table.exit_code == 0
    for text in ("RAD-75", "ITI-38", "P-200^^^&2.999.1.1&ISO", STUDY, "arr-live: delivered", "arr-dead: pending"):
        assert text in table.stdout


@pytest.mark.parametrize(("filters", "expected"), [
    (("--patient", "P-100"), ["RAD-75", "ITI-55"]),
    (("--patient", P200), ["ITI-38"]),
    (("--patient", "P-999"), []),
    (("--since", "2026-02-01"), ["110100", "RAD-75", "ITI-38"]),
    (("--since", "2026-03-10T09:30Z"), ["110100", "RAD-75"]),
    (("--user", "ALICE.smith"), ["RAD-75", "ITI-55"]),
    (("--user", "bob@"), ["ITI-38"]),
    (("--community", "2.999.8"), ["RAD-75", "ITI-38"]),
    (("--community", "urn:oid:2.999.7"), ["ITI-55"]),
    (("--patient", "P-100", "--community", "2.999.8", "--since", "2026-03-01", "--user", "alice"), ["RAD-75"]),
    (("--event", "ITI-38"), ["ITI-38"]),
    (("--limit", "2"), ["110100", "RAD-75"]),
])
def test_ls_filters(filled: tuple[Path, str, str], filters: tuple[str, ...], expected: list[str]) -> None:
    assert events_of(ls_json(filled[0], *filters)) == expected


def test_ls_with_no_match_and_bad_since(filled: tuple[Path, str, str]) -> None:
    path = str(filled[0])
    none = xig("audit", "ls", "--config", path, "--patient", "NOBODY")
    assert none.exit_code == 0 and "no audit messages match" in none.stdout
    bad = xig("audit", "ls", "--config", path, "--since", "yesterday")
    assert bad.exit_code == 2 and "neither an ISO date/time" in bad.stderr and "Traceback" not in bad.output
    assert parse_since("24h", now=at(3, 11)) == at(3, 10)
    assert parse_since("2026-03-10T10:30+01:00") == at(3, 10)


def test_export_writes_one_valid_audit_message_per_line_with_delivery_state(
        filled: tuple[Path, str, str], tmp_path: Path) -> None:
    path, live, dead = filled
    out = tmp_path / "audit.jsonl"
    result = xig("audit", "export", "--config", str(path), "--out", str(out))
    assert result.exit_code == 0 and "4 audit message(s) exported" in result.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(MESSAGES)
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]  # no temporary file left behind
    for line, original in zip(lines, MESSAGES, strict=True):  # oldest first = recording order
        record = json.loads(line)
        xml_bytes = record["message"].encode("utf-8")
        validate(xml_bytes)
        assert parse(xml_bytes) == original and xml_bytes == serialize(original)
        assert {d["repository"]: d["state"] for d in record["delivery"]} == {live: "delivered", dead: "pending"}
        assert all(d["attempts"] >= 1 for d in record["delivery"] if d["repository"] == live)

    filtered = xig("audit", "export", "--config", str(path), "--patient", "P-200")
    assert filtered.exit_code == 0
    [only] = [json.loads(x) for x in filtered.stdout.splitlines()]
    assert only["event"] == "ITI-38" and only["patients"] == [P200]


def test_export_to_a_missing_folder_fails_cleanly(filled: tuple[Path, str, str], tmp_path: Path) -> None:
    target = tmp_path / "missing" / "audit.jsonl"
    result = xig("audit", "export", "--config", str(filled[0]), "--out", str(target))
    assert result.exit_code == 2 and "does not exist" in result.stderr and "Traceback" not in result.output
    assert not target.parent.exists()
