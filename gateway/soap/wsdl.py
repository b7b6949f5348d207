"""WSDL and XSD documents served for ``?wsdl`` (pure functions over the shipped files).

The WSDLs under ``wsdl/`` are IPF's Responding Gateway WSDLs whose ``schemaLocation`` attributes were
made relative to the project (``../schemas/xds/query.xsd``). :func:`render_wsdl` fills in the real
endpoint address and turns each relative ``schemaLocation`` into an absolute URL under the base from
which :func:`render_schema` serves ``schemas/``. The XSDs are served unchanged: their own imports are
relative (``rim.xsd``), so a client resolves them against the XSD's URL, under the same base.

:func:`render_schema` serves only ``.xsd`` files inside the schemas directory; anything else raises
:class:`ResourceNotFoundError` (a :class:`FileNotFoundError`) for the HTTP layer to answer 404. The
HTTP layer percent-decodes the URL path before calling it.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from lxml import etree

from gateway import resources

#: Service key → WSDL file under ``wsdl/``.
SERVICES: Mapping[str, str] = {
    "xcpd": "iti55.wsdl",
    "xca-query": "iti38.wsdl",
    "xca-retrieve": "iti39.wsdl",
    "xcai-retrieve": "rad75.wsdl",
}

WSDL_SOAP12 = "http://schemas.xmlsoap.org/wsdl/soap12/"
_SCHEMAS_PREFIX = "../schemas/"


class ResourceNotFoundError(FileNotFoundError):
    """No servable WSDL/XSD under that name (unknown service, bad or escaping path): HTTP 404."""


@functools.lru_cache(maxsize=256)
def _read(path: Path) -> bytes:
    return path.read_bytes()


def _wsdl_parser() -> etree.XMLParser:
    # Our own files, but parse them as strictly as anything else.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _schema_url(location: str, wsdl_file: Path, schemas: Path, schema_base_url: str) -> str:
    """Absolute URL for a WSDL ``schemaLocation``; absolute locations are returned unchanged."""
    if "://" in location or location.startswith(("urn:", "/")):
        return location
    target = Path(posixpath.normpath((wsdl_file.parent / location).as_posix())).resolve()
    if not target.is_relative_to(schemas):
        raise ValueError(f"{wsdl_file.name}: schemaLocation {location!r} points outside {schemas}")
    return f"{schema_base_url.rstrip('/')}/{target.relative_to(schemas).as_posix()}"


@functools.lru_cache(maxsize=64)
def _render_wsdl(path: Path, schemas: Path, address: str, schema_base_url: str) -> bytes:
    root = etree.fromstring(_read(path), _wsdl_parser(), base_url=str(path))
    for addr in root.iter(f"{{{WSDL_SOAP12}}}address"):
        addr.set("location", address)
    for el in root.iter():
        location = el.get("schemaLocation") if isinstance(el.tag, str) else None
        if location is not None:
            el.set("schemaLocation", _schema_url(location, path, schemas, schema_base_url))
    out: bytes = etree.tostring(root.getroottree(), encoding="UTF-8", xml_declaration=True)
    return out


def render_wsdl(service: str, address: str, schema_base_url: str) -> bytes:
    """The WSDL of ``service`` (a key of :data:`SERVICES`) with its endpoint and schema URLs filled in.

    Every ``soap12:address/@location`` becomes ``address``; every relative ``schemaLocation``
    (``../schemas/xds/query.xsd``) becomes ``schema_base_url + "/xds/query.xsd"``.
    Raises :class:`ResourceNotFoundError` for an unknown service.
    """
    try:
        name = SERVICES[service]
    except KeyError:
        known = ", ".join(sorted(SERVICES))
        raise ResourceNotFoundError(f"unknown service {service!r} (known: {known})") from None
    path = resources.wsdl_dir() / name
    if not path.is_file():
        raise ResourceNotFoundError(f"WSDL file {path} is missing")
    return _render_wsdl(path, resources.schemas_dir().resolve(), address, schema_base_url)


def schema_path(relative_path: str) -> Path:
    """The XSD file under ``schemas/`` that ``relative_path`` names, or :class:`ResourceNotFoundError`.

    Refuses absolute paths, backslashes, NUL, ``..`` segments that remain after normalisation,
    anything that is not a ``.xsd`` file and anything resolving (through symlinks too) outside the
    schemas directory.
    """
    if not relative_path or "\\" in relative_path or "\x00" in relative_path:
        raise ResourceNotFoundError(f"not a schema path: {relative_path!r}")
    if relative_path.startswith("/") or PurePosixPath(relative_path).is_absolute() or ":" in relative_path:
        raise ResourceNotFoundError(f"absolute schema path refused: {relative_path!r}")
    normalised = posixpath.normpath(relative_path)
    if normalised in (".", "..") or ".." in PurePosixPath(normalised).parts:
        raise ResourceNotFoundError(f"schema path escapes the schemas directory: {relative_path!r}")
    if not normalised.lower().endswith(".xsd"):
        raise ResourceNotFoundError(f"only .xsd files are served: {relative_path!r}")
    schemas = resources.schemas_dir().resolve()
    candidate = (schemas / normalised).resolve()
    if not candidate.is_relative_to(schemas) or not candidate.is_file():
        raise ResourceNotFoundError(f"no such schema: {relative_path!r}")
    return candidate


def render_schema(relative_path: str) -> bytes:
    """The bytes of the XSD at ``schemas/<relative_path>``, unchanged (reads are cached)."""
    return _read(schema_path(relative_path))
