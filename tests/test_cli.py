"""The `xig` command as a user runs it: real processes, real TLS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from gateway.security.certs import CertSet
from gateway.security.tls import client_context
from tests.conftest import write_config

XIG = [sys.executable, "-m", "gateway.cli"]
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XIG, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_config_example_then_check(tmp_path: Path) -> None:
    r = run("config", "example")
    assert r.returncode == 0 and "[gateway]" in r.stdout and "home_community_id" in r.stdout
    (tmp_path / "xig.toml").write_text(r.stdout)
    r = run("certs", "init", str(tmp_path / "certs"))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "certs").iterdir()} >= {"ca.crt", "gateway.crt", "gateway.key",
                                                                 "partner.crt", "partner.key"}
    r = run("config", "check", str(tmp_path / "xig.toml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout and "urn:oid:2.999.1" in r.stdout


def test_certs_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run("certs", "init", str(tmp_path)).returncode == 0
    before = (tmp_path / "ca.crt").read_bytes()
    r = run("certs", "init", str(tmp_path))
    assert r.returncode == 1 and "exists" in r.stderr
    assert (tmp_path / "ca.crt").read_bytes() == before
    assert run("certs", "init", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "ca.crt").read_bytes() != before


def test_config_check_reports_every_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[gateway]\nhome_community_id = "x"\n[server]\nlisten = "nope"\n')
    r = run("config", "check", str(tmp_path / "bad.toml"))
    assert r.returncode == 2
    for fragment in ("gateway.home_community_id", "gateway.assigning_authority", "server.listen",
                     "server.certificate", "saml"):
        assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_serve_answers_and_stops_gracefully(tmp_path: Path, pki: CertSet) -> None:
    port = free_port()
    cfg = write_config(tmp_path, pki, port=port)
    proc = subprocess.Popen([*XIG, "serve", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # readiness: uvicorn announces the listening socket
            seen.append(line)
            if "running on" in line.lower():
                break
        else:
            raise AssertionError("".join(seen))
        ctx = client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)
        r = httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx)
        assert r.json()["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
        # uvicorn shuts down gracefully, then re-raises the signal it captured (exit status -SIGTERM)
        assert proc.returncode in (0, -signal.SIGTERM)
        assert "Finished server process" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_self_check(tmp_path: Path) -> None:
    r = run("demo", "--workdir", str(tmp_path / "demo"), "--port", "0", "--no-serve", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("✓") == 9 and "✗" not in r.stdout
    assert "community A audited every exchange" in r.stdout and "RAD-75" in r.stdout
    assert "imported 9 instances of 2 studies" in r.stdout
    assert "patient DEMO-1" in r.stdout and "2 on-demand KOS entries" in r.stdout
    assert "wsse:InvalidSecurity" in r.stdout
    assert "curl --cacert" in r.stdout


def test_pacs_import_and_ls(tmp_path: Path, pki: CertSet) -> None:
    from gateway.dicom.synth import make_study

    cfg = write_config(tmp_path / "gw", pki, extra='[database]\nurl = "sqlite:///xig.db"')
    make_study(tmp_path / "in", patient_id="CLI-1", patient_name="Cli^Carla", birth_date="19800101", sex="F",
               study_description="CT head", series=(("CT", 2, "HEAD"),), seed="cli")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    r = run("pacs", "import", "--config", str(cfg), str(tmp_path / "in"))
    assert r.returncode == 1, r.stdout + r.stderr  # one bad file: reported, the others imported
    assert "2 imported" in r.stdout and "notes.txt" in r.stderr
    r = run("pacs", "import", "--config", str(cfg), str(tmp_path / "in"))
    assert "0 imported" in r.stdout and "2 skipped" in r.stdout  # idempotent
    r = run("pacs", "ls", "--config", str(cfg))
    assert r.returncode == 0 and "CLI-1" in r.stdout and "Cli^Carla" in r.stdout
    r = run("pacs", "ls", "--config", str(cfg), "--patient", "CLI-1")
    assert "CT head" in r.stdout and "CT" in r.stdout
    assert len(list((tmp_path / "gw" / "pacs").rglob("*.dcm"))) == 2
