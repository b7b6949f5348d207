"""Shared fixtures: a test PKI, gateway configurations and real gateways on loopback TLS."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from gateway.config import Config, load_config
from gateway.logs import configure_logging
from gateway.security.certs import CertSet, init_certs
from tests.orthanc import orthanc_fixture

pytest_plugins = ["tests.postgres"]  # the postgres / pg_url fixtures (a real PostgreSQL)

#: one real Orthanc (DIMSE + DICOMweb) for the whole session; tests use their own patients and UIDs
orthanc = orthanc_fixture()

if TYPE_CHECKING:
    from gateway.web.server import BackgroundServer

#: Real messages, WSDLs and XSDs from public IHE tooling and production gateways: ``shared/`` sits
#: beside the repository (on developer machines and in CI alike).
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "spec" / "samples"


@contextlib.contextmanager
def logging_to(stream: IO[str], *, json: bool, level: int | str) -> Iterator[None]:
    """XIG's logging (:func:`gateway.logs.configure_logging`) into ``stream`` for a block; the root logger's
    handlers and level, and pynetdicom's level, as they were afterwards."""
    root, pynetdicom = logging.getLogger(), logging.getLogger("pynetdicom")
    saved = (list(root.handlers), root.level, pynetdicom.level)
    configure_logging(json=json, level=level, stream=stream)
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        pynetdicom.setLevel(saved[2])


@pytest.fixture(scope="session")
def samples() -> Path:
    assert SAMPLES.exists(), f"sample messages not found at {SAMPLES}"
    return SAMPLES


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return init_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    """A second, untrusted CA with its own gateway/partner certificates."""
    return init_certs(tmp_path_factory.mktemp("rogue-pki"), ca_name="Rogue CA")


#: OIDs under IHE's test arc (1.3.6.1.4.1.21367, as the NIST test kits use): dciodvfy rejects the
#: 2.999 example arc inside DICOM objects, so tests that produce DICOM use these.
IHE_TEST_IDS = {"home_community_id": "urn:oid:1.3.6.1.4.1.21367.13.70.201",
                "assigning_authority": "1.3.6.1.4.1.21367.13.20.201",
                "repository_unique_id": "1.3.6.1.4.1.21367.13.80.201",
                "imaging_source_id": "1.3.6.1.4.1.21367.13.71.201.1"}


def write_config(directory: Path, pki: CertSet, *, port: int = 0, extra: str = "",
                 saml_extra: str = "", server_extra: str = "", ids: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "xig.toml"
    g = {"home_community_id": "urn:oid:2.999.1", "assigning_authority": "2.999.1.1",
         "repository_unique_id": "2.999.1.2", "imaging_source_id": "2.999.1.3", **(ids or {})}
    path.write_text(f"""
[gateway]
home_community_id = "{g['home_community_id']}"
assigning_authority = "{g['assigning_authority']}"
repository_unique_id = "{g['repository_unique_id']}"
imaging_source_id = "{g['imaging_source_id']}"

[server]
listen = "127.0.0.1:{port}"
certificate = "{pki.gateway_cert}"
private_key = "{pki.gateway_key}"
client_ca = "{pki.ca_cert}"
{server_extra}

[saml]
trusted_issuers = "{pki.ca_cert}"
signing_certificate = "{pki.partner_cert}"
signing_key = "{pki.partner_key}"
{saml_extra}

[pacs]
kind = "filesystem"
path = "pacs"
{extra}
""")
    return path


@pytest.fixture
def config(tmp_path: Path, pki: CertSet) -> Config:
    return load_config(write_config(tmp_path / "gw", pki))


@pytest.fixture
def start_gateway() -> Iterator[Any]:
    """``start_gateway(config, handlers)`` → a started :class:`BackgroundServer`, stopped after the test."""
    from gateway.web.server import BackgroundServer

    started: list[BackgroundServer] = []

    def start(config: Config, handlers: Any = None) -> BackgroundServer:
        server = BackgroundServer(config, handlers).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()
