"""Configuration: the example is valid, every problem is reported with its key, paths resolve."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.cli import example_config_text
from gateway.config import ConfigError, load_config, parse_config
from gateway.security.certs import CertSet
from tests.conftest import write_config


def test_example_config_is_valid_and_complete(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    cfg = parse_config(data, base_dir=tmp_path)
    assert cfg.gateway.home_community_id == "urn:oid:2.999.1"
    assert cfg.gateway.assigning_authority == "2.999.1.1"
    assert cfg.server.certificate == (tmp_path / "certs/gateway.crt").resolve()
    assert cfg.pacs[0].kind == "filesystem"
    assert cfg.partners[0].xcai_retrieve_url == "https://b.example:8443/ihe/xcai/retrieve"
    # the fixed key names of the design are all present in the example
    for section, keys in {
        "gateway": ["home_community_id", "assigning_authority", "repository_unique_id", "imaging_source_id"],
        "server": ["listen", "certificate", "private_key", "client_ca"],
        "saml": ["trusted_issuers", "signing_certificate", "signing_key"],
        "database": ["url"],
    }.items():
        assert set(keys) <= set(data[section]), section


def test_loaded_config_resolves_relative_paths(tmp_path: Path, pki: CertSet) -> None:
    cfg = load_config(write_config(tmp_path, pki, port=9443))
    assert cfg.server.port == 9443 and cfg.server.host == "127.0.0.1"
    assert cfg.pacs[0].path == (tmp_path / "pacs").resolve()  # type: ignore[union-attr]
    assert cfg.client_certificate == cfg.server.certificate  # [client] defaults to the server identity


def test_hcid_forms_are_normalised(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    data["gateway"]["home_community_id"] = "2.999.7"
    data["partners"][0]["home_community_id"] = "urn:oid:2.999.8"
    cfg = parse_config(data, base_dir=tmp_path)
    assert cfg.gateway.home_community_id == "urn:oid:2.999.7"
    assert cfg.partners[0].home_community_id == "urn:oid:2.999.8"


def test_every_problem_is_named(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    data["gateway"]["home_community_id"] = "not-an-oid"
    data["server"]["listen"] = "8443"
    data["server"]["lisen"] = "typo"
    del data["saml"]["signing_key"]
    data["pacs"] = {"kind": "dimse", "port": 99999}
    data["partners"][0]["xcpd_url"] = "http://plain.example/xcpd"
    with pytest.raises(ConfigError) as exc:
        parse_config(data, base_dir=tmp_path, source="bad.toml")
    text = "\n".join(exc.value.problems)
    assert "gateway.home_community_id" in text and "not an OID" in text
    assert "server.listen" in text and "host:port" in text
    assert "server.lisen: unknown key" in text
    assert "saml.signing_key" in text
    assert "pacs[0].port" in text
    assert "partners[0].xcpd_url" in text and "https://" in text


def test_pacs_array_form_and_kinds(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    data["pacs"] = [{"kind": "dimse", "host": "127.0.0.1", "port": 4242, "imaging_source_id": "2.999.1.30"},
                    {"kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web"}]
    cfg = parse_config(data, base_dir=tmp_path)
    assert [p.kind for p in cfg.pacs] == ["dimse", "dicomweb"]
    data["pacs"] = [{"kind": "tape"}]
    with pytest.raises(ConfigError) as exc:
        parse_config(data, base_dir=tmp_path)
    assert "pacs[0]" in exc.value.problems[0]


def test_missing_files_and_bad_toml(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text(example_config_text())
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "x.toml")
    assert any("server.certificate: file" in p for p in exc.value.problems)
    (tmp_path / "y.toml").write_text("[gateway\nx=1")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "y.toml")
    assert "not valid TOML" in exc.value.problems[0]
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "absent.toml")
    assert exc.value.problems == ["file not found"]


def test_dicomweb_url_must_be_http(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    data["pacs"] = {"kind": "dicomweb", "url": "orthanc:8042/dicom-web"}
    with pytest.raises(ConfigError) as exc:
        parse_config(data, base_dir=tmp_path, source="bad.toml")
    assert any("url" in p and "must start with http:// or https://" in p for p in exc.value.problems)
