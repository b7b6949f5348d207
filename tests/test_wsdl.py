"""?wsdl rendering (gateway.soap.wsdl) and resource lookup (gateway.resources)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree
from zeep import Client
from zeep.transports import Transport

import gateway
from gateway import resources
from gateway.resources import ResourceDirectoryError, project_root, schemas_dir, wsdl_dir
from gateway.soap.wsdl import (
    SERVICES,
    WSDL_SOAP12,
    ResourceNotFoundError,
    render_schema,
    render_wsdl,
    schema_path,
)

BASE = "https://xig.example.org:8443/ihe"
SCHEMA_BASE = f"{BASE}/schemas"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"

OPERATIONS = {
    "xcpd": "RespondingGateway_PRPA_IN201305UV02",
    "xca-query": "RespondingGateway_CrossGatewayQuery",
    "xca-retrieve": "RespondingGateway_CrossGatewayRetrieve",
    "xcai-retrieve": "RespondingGateway_CrossGatewayRetrieveImagingDocumentSet",
}
# body elements zeep must know after loading the served schemas
ELEMENTS = {
    "xcpd": ["{urn:hl7-org:v3}PRPA_IN201305UV02", "{urn:hl7-org:v3}PRPA_IN201306UV02"],
    "xca-query": [
        "{urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0}AdhocQueryRequest",
        "{urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0}AdhocQueryResponse",
    ],
    "xca-retrieve": ["{urn:ihe:iti:xds-b:2007}RetrieveDocumentSetRequest"],
    "xcai-retrieve": [
        "{urn:ihe:rad:xdsi-b:2009}RetrieveImagingDocumentSetRequest",
        "{urn:ihe:iti:xds-b:2007}RetrieveDocumentSetResponse",
    ],
}


def _address(service: str) -> str:
    return f"{BASE}/{service}"


def _render(service: str) -> etree._Element:
    return etree.fromstring(render_wsdl(service, _address(service), SCHEMA_BASE))


# ------------------------------------------------------------------------------------------ WSDL

def test_services_map_to_existing_wsdl_files() -> None:
    assert dict(SERVICES) == {
        "xcpd": "iti55.wsdl",
        "xca-query": "iti38.wsdl",
        "xca-retrieve": "iti39.wsdl",
        "xcai-retrieve": "rad75.wsdl",
    }
    for name in SERVICES.values():
        assert (wsdl_dir() / name).is_file()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_rendered_wsdl_has_address_and_absolute_schema_locations(service: str) -> None:
    root = _render(service)
    assert root.tag == f"{{{WSDL_NS}}}definitions"
    addresses = root.findall(f".//{{{WSDL_SOAP12}}}address")
    assert addresses and {a.get("location") for a in addresses} == {_address(service)}
    locations = [el.get("schemaLocation") for el in root.iter() if el.get("schemaLocation") is not None]
    for location in locations:
        assert location.startswith(f"{SCHEMA_BASE}/"), location
        assert ".." not in location
        render_schema(location[len(SCHEMA_BASE) + 1 :])  # each one is servable
    original = (wsdl_dir() / SERVICES[service]).read_text()
    assert len(locations) == original.count("schemaLocation=")
    assert "servicelocation" not in render_wsdl(service, _address(service), SCHEMA_BASE).decode()


def test_schema_locations_map_to_paths_under_schemas() -> None:
    root = _render("xcai-retrieve")
    imports = root.iter("{http://www.w3.org/2001/XMLSchema}import")
    assert [el.get("schemaLocation") for el in imports] == [
        f"{SCHEMA_BASE}/xds/XDS.b_DocumentRepository.xsd",
        f"{SCHEMA_BASE}/xds/XDSI.b_ImagingDocumentSource.xsd",
    ]
    query = _render("xca-query").find(".//{http://www.w3.org/2001/XMLSchema}import")
    assert query is not None and query.get("schemaLocation") == f"{SCHEMA_BASE}/xds/query.xsd"
    # a trailing slash on the base does not double up
    again = etree.fromstring(render_wsdl("xca-query", "https://h/x", SCHEMA_BASE + "/"))
    imp = again.find(".//{http://www.w3.org/2001/XMLSchema}import")
    assert imp is not None and imp.get("schemaLocation") == f"{SCHEMA_BASE}/xds/query.xsd"


def test_address_is_escaped_not_injected() -> None:
    address = 'https://h:8443/ihe/xca-query?a=1&b="2"<x/>'
    root = etree.fromstring(render_wsdl("xca-query", address, SCHEMA_BASE))
    assert [a.get("location") for a in root.iter(f"{{{WSDL_SOAP12}}}address")] == [address]
    assert root.find(".//x") is None


def test_unknown_service_is_not_found() -> None:
    with pytest.raises(ResourceNotFoundError, match="unknown service 'rad69'"):
        render_wsdl("rad69", "https://h/x", SCHEMA_BASE)
    with pytest.raises(FileNotFoundError):
        render_wsdl("../iti38", "https://h/x", SCHEMA_BASE)


class InProcessTransport(Transport):  # type: ignore[misc]
    """Serves the WSDL and the schemas from render_wsdl/render_schema; any other URL fails the test."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self.urls: list[str] = []

    def load(self, url: str) -> bytes:
        self.urls.append(url)
        if url == f"{_address(self.service)}?wsdl":
            return render_wsdl(self.service, _address(self.service), SCHEMA_BASE)
        if url.startswith(f"{SCHEMA_BASE}/"):
            return render_schema(url[len(SCHEMA_BASE) + 1 :])
        raise AssertionError(f"zeep asked for an unexpected URL: {url}")


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_zeep_loads_the_served_wsdl_and_schemas(service: str) -> None:
    transport = InProcessTransport(service)
    client = Client(f"{_address(service)}?wsdl", transport=transport)
    [svc] = client.wsdl.services.values()
    [port] = svc.ports.values()
    assert port.binding_options["address"] == _address(service)
    assert OPERATIONS[service] in port.binding._operations
    for element in ELEMENTS[service]:
        assert client.get_element(element) is not None
    assert transport.urls[0] == f"{_address(service)}?wsdl"
    if service != "xcpd":  # the XCPD WSDL declares its elements inline as anyType
        assert any(u.endswith("/xds/rim.xsd") for u in transport.urls)  # relative import inside an XSD


def test_zeep_service_proxy_uses_the_address() -> None:
    client = Client(f"{_address('xca-retrieve')}?wsdl", transport=InProcessTransport("xca-retrieve"))
    proxy = client.service
    assert proxy._binding_options["address"] == _address("xca-retrieve")
    assert callable(proxy.RespondingGateway_CrossGatewayRetrieve)


# ------------------------------------------------------------------------------------------ XSDs

def test_render_schema_returns_the_file_unchanged() -> None:
    data = render_schema("xds/query.xsd")
    assert data == (schemas_dir() / "xds" / "query.xsd").read_bytes()
    assert b'schemaLocation="rim.xsd"' in data  # relative imports stay relative
    assert render_schema("xds/./query.xsd") == data  # harmless normalisation is fine
    assert render_schema("hl7v3/HL7V3/NE2008/multicacheschemas/PRPA_IN201306UV02.xsd").startswith(b"<?xml")


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".",
        "..",
        "../wsdl/iti38.wsdl",
        "../schemas/xds/query.xsd",
        "xds/../../wsdl/iti38.wsdl",
        "xds/../../schemas/xds/query.xsd",
        "xds/query.xsd/../../../../etc/passwd.xsd",
        "/etc/passwd",
        "/work/main/schemas/xds/query.xsd",
        "//etc/passwd.xsd",
        "file:///etc/passwd",
        "C:/Windows/win.ini",
        "xds\\..\\..\\wsdl\\iti38.wsdl",
        "xds/query.xsd\x00.xsd",
        "README.md",
        "xds",
        "xds/",
        "xds/nope.xsd",
        "../../../../../../etc/hosts",
    ],
)
def test_render_schema_refuses_anything_but_an_xsd_inside_schemas(path: str) -> None:
    with pytest.raises(ResourceNotFoundError):
        render_schema(path)
    with pytest.raises(FileNotFoundError):
        schema_path(path)


def test_render_schema_refuses_a_symlink_leading_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "wsdl").mkdir()
    secret = tmp_path / "secret.xsd"
    secret.write_text("<secret/>")
    (tmp_path / "schemas" / "ok.xsd").write_text("<ok/>")
    (tmp_path / "schemas" / "link.xsd").symlink_to(secret)
    monkeypatch.setenv("XIG_HOME", str(tmp_path))
    assert render_schema("ok.xsd") == b"<ok/>"
    with pytest.raises(ResourceNotFoundError):
        render_schema("link.xsd")


# ------------------------------------------------------------------------------------------ resources

def test_project_root_defaults_to_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XIG_HOME", raising=False)
    root = project_root()
    assert root == Path(gateway.__file__).resolve().parent.parent
    assert schemas_dir() == root / "schemas" and (schemas_dir() / "xds" / "query.xsd").is_file()
    assert wsdl_dir() == root / "wsdl" and (wsdl_dir() / "iti38.wsdl").is_file()


def test_xig_home_overrides_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "wsdl").mkdir()
    monkeypatch.setenv(resources.XIG_HOME_ENV, str(tmp_path))
    assert project_root() == tmp_path.resolve()
    assert schemas_dir() == tmp_path.resolve() / "schemas"
    assert wsdl_dir() == tmp_path.resolve() / "wsdl"


def test_missing_directories_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "schemas").mkdir()
    monkeypatch.setenv("XIG_HOME", str(tmp_path))
    with pytest.raises(ResourceDirectoryError, match=r"wsdl is missing; set \$XIG_HOME"):
        wsdl_dir()
    with pytest.raises(ResourceDirectoryError, match="wsdl is missing"):
        render_wsdl("xca-query", "https://h/x", SCHEMA_BASE)
    monkeypatch.setenv("XIG_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(ResourceDirectoryError, match="nowhere.*is not a directory"):
        project_root()
