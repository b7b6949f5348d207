"""XML Schema validation of SOAP body elements (inbound requests, outbound responses in tests).

A :class:`SchemaSet` knows which XSD under ``schemas/`` declares each body root element XIG handles,
compiles each XSD once (lazily, or all at once with :meth:`SchemaSet.warm` at start-up) and validates
a body element as a document of its own.

Offline by construction
    Every file libxml2 wants while compiling (the root XSD and each ``xs:import``/``xs:include``)
    goes through :class:`LocalSchemaResolver`, which opens only regular files inside the schemas
    directory and refuses everything else (``http:``, ``https:``, ``ftp:``, paths escaping the
    directory) with a :class:`SchemaCompileError` naming the refused location. The resolver never
    answers "don't know", so libxml2's default loader (which could go to the network) never runs.

Validating a body taken out of an envelope
    The element is copied into a fresh tree whose root declares *every* namespace in scope at the
    element, not only the ones its own node names use. ``copy.deepcopy`` alone keeps just the latter,
    so a prefix used only inside QName-valued content (``xsi:type="hl7:CE"``) and declared on the SOAP
    Envelope would no longer resolve. Line numbers of the original message are kept in the copy, so
    error messages point into what the partner sent.

RAD-75 ``DocumentRequest`` namespace
    In ``RetrieveImagingDocumentSetRequest/StudyRequest/SeriesRequest``, IHE RAD TF-3 (and the
    NIST/dcm4chee schema we ship) puts ``DocumentRequest`` and its children in the XDS.b namespace
    ``urn:ihe:iti:xds-b:2007`` because ``SeriesRequest`` extends ``ihe:RetrieveDocumentSetRequestType``.
    IPF's ``IHEXDSIB.xsd`` declares it in ``urn:ihe:rad:xdsi-b:2009`` instead, so IPF-based gateways
    send that. Both are accepted: before validation, a copy has the xdsi-b ``DocumentRequest`` and its
    ``HomeCommunityId``/``RepositoryUniqueId``/``DocumentUniqueId`` renamed into xds-b (see
    :func:`normalise_rad75_document_requests`); XIG itself always emits xds-b. The caller's element is
    never modified.

Thread safety
    Compilation is guarded by a per-schema lock, so concurrent first uses compile once. Validation is
    serialised per compiled schema too: lxml keeps one ``error_log`` per ``XMLSchema`` object and
    clears it at the start of every validation, so two concurrent validations would mix or lose each
    other's messages. Validation itself is sub-millisecond to a few milliseconds (see ``warm()``'s
    timings and the README of ``schemas/``), different schemas validate in parallel.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from lxml import etree

from gateway import resources
from gateway.errors import XIG_INTERNAL, XIG_SCHEMA_INVALID, XigError, receiver_fault, sender_fault
from gateway.soap import ns

log = logging.getLogger(__name__)

_HL7_MULTICACHE = "hl7v3/HL7V3/NE2008/multicacheschemas"

#: Body root element (Clark notation) → XSD declaring it, relative to ``schemas/``.
BODY_SCHEMAS: Mapping[str, str] = {
    ns.q(ns.QUERY, "AdhocQueryRequest"): "xds/query.xsd",
    ns.q(ns.QUERY, "AdhocQueryResponse"): "xds/query.xsd",
    ns.q(ns.XDSB, "RetrieveDocumentSetRequest"): "xds/XDS.b_DocumentRepository.xsd",
    ns.q(ns.XDSB, "RetrieveDocumentSetResponse"): "xds/XDS.b_DocumentRepository.xsd",
    ns.q(ns.XDSI, "RetrieveImagingDocumentSetRequest"): "xds/XDSI.b_ImagingDocumentSource.xsd",
    ns.q(ns.RS, "RegistryResponse"): "xds/rs.xsd",
    ns.q(ns.HL7, "PRPA_IN201305UV02"): f"{_HL7_MULTICACHE}/PRPA_IN201305UV02.xsd",
    ns.q(ns.HL7, "PRPA_IN201306UV02"): f"{_HL7_MULTICACHE}/PRPA_IN201306UV02.xsd",
    ns.q(ns.HL7, "MCCI_IN000002UV01"): f"{_HL7_MULTICACHE}/MCCI_IN000002UV01.xsd",
}

#: How many libxml2 messages a fault reason quotes.
MAX_REASON_ERRORS = 3

_RAD75_REQUEST = ns.q(ns.XDSI, "RetrieveImagingDocumentSetRequest")
_RAD75_DOCUMENT_REQUEST_PATH = (
    f"{{{ns.XDSI}}}StudyRequest/{{{ns.XDSI}}}SeriesRequest/{{{ns.XDSI}}}DocumentRequest"
)
_DOCUMENT_REQUEST_CHILDREN = ("HomeCommunityId", "RepositoryUniqueId", "DocumentUniqueId")


class SchemaCompileError(XigError):
    """An XSD could not be compiled (missing file, refused location, schema error): a deployment bug."""


class _RefusedLocation(Exception):  # noqa: N818 - internal signal raised inside the resolver
    """Raised inside the resolver; lxml swallows it and libxml2 reports a failed load."""


class LocalSchemaResolver(etree.Resolver):  # type: ignore[misc]
    """Resolves schema locations to regular files under ``root``; refuses everything else.

    ``loaded`` lists the files handed to libxml2, ``refused`` the locations turned away.
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root.resolve()
        self.loaded: list[Path] = []
        self.refused: list[str] = []

    def local_path(self, url: str) -> Path | None:
        """The file under ``root`` that ``url`` names, or None if it names anything else."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                return None
            candidate = Path(unquote(parts.path))
        elif parts.scheme and len(parts.scheme) > 1:  # http:, https:, ftp:, urn:, ... (not C:)
            return None
        else:
            candidate = Path(url)
            if not candidate.exists() and "%" in url:
                candidate = Path(unquote(url))
        if not candidate.is_absolute():
            candidate = self.root / candidate
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            return None
        return resolved

    def resolve(self, url: str | None, pubid: str | None, context: Any) -> Any:
        path = self.local_path(url) if url else None
        if path is None:
            self.refused.append(str(url or pubid))
            raise _RefusedLocation(url)
        self.loaded.append(path)
        return self.resolve_filename(str(path), context)


def schema_parser(resolver: LocalSchemaResolver) -> etree.XMLParser:
    parser = etree.XMLParser(
        no_network=True,
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
    )
    parser.resolvers.add(resolver)
    return parser


def compile_schema(path: Path, root: Path) -> etree.XMLSchema:
    """Compile the XSD at ``path``, loading it and everything it imports only from files under ``root``.

    Raises :class:`SchemaCompileError` naming refused locations (network URLs, files outside ``root``)
    or the libxml2 message. A fresh parser (and resolver) is used per compilation.
    """
    resolver = LocalSchemaResolver(root)
    parser = schema_parser(resolver)
    try:
        doc = etree.parse(str(path), parser)
        schema = etree.XMLSchema(doc)
    except (etree.LxmlError, OSError, _RefusedLocation) as exc:
        if resolver.refused:
            raise SchemaCompileError(_refusal_message(path, resolver)) from None
        message = getattr(exc, "msg", None) or str(exc)
        raise SchemaCompileError(f"cannot compile XML schema {path}: {message}") from None
    if resolver.refused:  # libxml2 may treat a failed import as a warning; never accept a partial schema
        raise SchemaCompileError(_refusal_message(path, resolver))
    return schema


def _refusal_message(path: Path, resolver: LocalSchemaResolver) -> str:
    refused = ", ".join(dict.fromkeys(resolver.refused))
    return (
        f"cannot compile XML schema {path}: refused to load {refused} "
        f"(schemas are loaded only from files under {resolver.root}, never from the network)"
    )


def normalise_rad75_document_requests(request: etree._Element) -> int:
    """Rename xdsi-b ``DocumentRequest`` elements (IPF style) of a RAD-75/RAD-69 request into xds-b.

    Works in place on ``request`` (a ``RetrieveImagingDocumentSetRequest``); returns how many
    ``DocumentRequest`` elements were renamed. Only the ``DocumentRequest`` under
    ``StudyRequest/SeriesRequest`` and its three identifier children are touched.
    """
    renamed = 0
    for doc_request in request.iterfind(_RAD75_DOCUMENT_REQUEST_PATH):
        doc_request.tag = ns.q(ns.XDSB, "DocumentRequest")
        for child in doc_request:
            if not isinstance(child.tag, str):
                continue
            qname = etree.QName(child)
            if qname.namespace == ns.XDSI and qname.localname in _DOCUMENT_REQUEST_CHILDREN:
                child.tag = ns.q(ns.XDSB, qname.localname)
        renamed += 1
    return renamed


_XOP_INCLUDE = ns.q(ns.XOP, "Include")


def reconstruct_xop(doc: etree._Element) -> int:
    """Replace each ``xop:Include`` by empty base64 content, in place; return how many.

    XOP (W3C XOP 1.0 §3.2): the schema applies to the reconstructed infoset, where the optimised element
    holds base64 text; the attachment bytes themselves are not needed to check the structure.
    """
    includes = list(doc.iter(_XOP_INCLUDE))
    for inc in includes:
        parent = inc.getparent()
        if parent is not None:
            parent.remove(inc)
            parent.text = (parent.text or "") + (inc.tail or "")
    return len(includes)


def standalone_copy(element: etree._Element) -> etree._Element:
    """Copy ``element`` into a new document whose root declares every namespace in scope at it.

    Keeps the source line numbers. The original element and its tree are left untouched.
    """
    root = etree.Element(element.tag, attrib=dict(element.attrib), nsmap=element.nsmap)
    root.text = element.text
    if element.sourceline is not None:
        root.sourceline = element.sourceline
    for child in element:
        root.append(copy.deepcopy(child))
    return root


@dataclass
class _Compiled:
    schema: etree.XMLSchema
    lock: threading.Lock
    seconds: float


def _readable_path(tree: etree._ElementTree, path: str | None) -> str | None:
    """libxml2's node path (``/*/*[10]/*[3]`` for default-namespace elements) as local names.

    Gives e.g. ``/PRPA_IN201306UV02/controlActProcess/subject[2]/registrationEvent``; an index is shown
    only where siblings share the name. Falls back to libxml2's path if it cannot be evaluated.
    """
    if not path:
        return None
    prefixes: dict[str, str] = {}
    for el in tree.iter():
        if isinstance(el.tag, str):
            for prefix, uri in el.nsmap.items():
                if prefix is not None:
                    prefixes.setdefault(prefix, uri)
    try:
        found = tree.xpath(path, namespaces=prefixes)
    except etree.XPathError:
        return path
    if not isinstance(found, list) or len(found) != 1 or not isinstance(found[0], etree._Element):
        return path
    steps: list[str] = []
    node: etree._Element | None = found[0]
    while node is not None:
        name = etree.QName(node).localname
        parent = node.getparent()
        if parent is not None:
            same = [sib for sib in parent if sib.tag == node.tag]
            if len(same) > 1:
                name += f"[{same.index(node) + 1}]"
        steps.append(name)
        node = parent
    return "/" + "/".join(reversed(steps))


def _describe(tree: etree._ElementTree, entry: Any) -> str:
    where = f"line {entry.line}" if entry.line else "line ?"
    path = _readable_path(tree, entry.path)
    if path:
        where += f" at {path}"
    return f"{where}: {str(entry.message).strip().rstrip('.')}"


def _local(tag: object) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else repr(tag)


class SchemaSet:
    """The compiled XSDs for the SOAP body elements XIG sends and receives."""

    def __init__(self, schemas_root: Path | None = None, body_schemas: Mapping[str, str] = BODY_SCHEMAS):
        self._root = (schemas_root or resources.schemas_dir()).resolve()
        self._files: dict[str, str] = dict(body_schemas)
        self._compiled: dict[str, _Compiled] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def root(self) -> Path:
        return self._root

    @property
    def root_elements(self) -> frozenset[str]:
        """The body root elements (Clark notation) this set validates."""
        return frozenset(self._files)

    def supports(self, tag: str) -> bool:
        return tag in self._files

    def schema_file(self, tag: str) -> str:
        """The XSD (relative to the schemas directory) declaring ``tag``; KeyError if none."""
        return self._files[tag]

    # -- compilation ---------------------------------------------------------------------------------

    def _get(self, relative: str) -> _Compiled:
        compiled = self._compiled.get(relative)
        if compiled is not None:
            return compiled
        with self._guard:
            lock = self._locks.setdefault(relative, threading.Lock())
        with lock:
            compiled = self._compiled.get(relative)
            if compiled is None:
                started = time.perf_counter()
                schema = compile_schema(self._root / relative, self._root)
                compiled = _Compiled(schema, threading.Lock(), time.perf_counter() - started)
                log.debug("compiled XML schema %s in %.3f s", relative, compiled.seconds)
                self._compiled[relative] = compiled
        return compiled

    def warm(self) -> dict[str, float]:
        """Compile every schema now (start-up); returns seconds spent per XSD (0.0 if already compiled)."""
        timings: dict[str, float] = {}
        for relative in dict.fromkeys(self._files.values()):
            already = relative in self._compiled
            compiled = self._get(relative)
            timings[relative] = 0.0 if already else compiled.seconds
        return timings

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds each compiled XSD took to compile."""
        return {rel: c.seconds for rel, c in self._compiled.items()}

    # -- validation ----------------------------------------------------------------------------------

    def _prepare(self, element: etree._Element) -> etree._ElementTree:
        doc = standalone_copy(element)
        if doc.tag == _RAD75_REQUEST:
            normalise_rad75_document_requests(doc)
        reconstruct_xop(doc)
        return doc.getroottree()

    def _run(self, element: etree._Element) -> list[str]:
        """Validate; returns the libxml2 messages (empty when valid). Compile errors propagate."""
        compiled = self._get(self._files[element.tag])
        tree = self._prepare(element)
        with compiled.lock:
            try:
                valid = compiled.schema.validate(tree)
            except etree.XMLSchemaValidateError as exc:
                return [f"internal XML Schema validation error: {exc}"]
            if valid:
                return []
            entries = list(compiled.schema.error_log)
        messages = [_describe(tree, entry) for entry in entries]
        return messages or ["XML Schema validation failed without a message"]

    def errors(self, element: etree._Element) -> list[str]:
        """All validation problems of ``element`` as text (empty list = valid); never raises a fault.

        An element no schema is known for gives a one-message list. A schema that cannot be compiled
        raises :class:`SchemaCompileError` (a deployment bug, not a property of the message).
        """
        tag = element.tag
        if not isinstance(tag, str) or tag not in self._files:
            return [f"no XML schema for body element {tag}"]
        return self._run(element)

    def validate(self, element: etree._Element) -> None:
        """Raise a Sender :class:`~gateway.errors.SoapFault` (``xig:SchemaValidationFailed``) if invalid.

        The reason names the element and quotes the first three libxml2 messages with line and path.
        """
        tag = element.tag
        if not isinstance(tag, str) or tag not in self._files:
            raise sender_fault(
                XIG_SCHEMA_INVALID,
                f"unexpected body element {tag}: no XML schema is known for it",
            )
        try:
            messages = self._run(element)
        except SchemaCompileError as exc:
            log.error("XML schema for %s unavailable: %s", tag, exc)
            raise receiver_fault(XIG_INTERNAL, f"the XML schema for {_local(tag)} is unavailable") from None
        if not messages:
            return
        shown = "; ".join(messages[:MAX_REASON_ERRORS])
        more = len(messages) - MAX_REASON_ERRORS
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more > 0 else ""
        raise sender_fault(
            XIG_SCHEMA_INVALID,
            f"{_local(tag)} is not valid against {self._files[tag].rsplit('/', 1)[-1]}: {shown}{suffix}",
        )


@functools.cache
def default_schemas() -> SchemaSet:
    """The process-wide :class:`SchemaSet` over ``resources.schemas_dir()`` (call ``warm()`` at start-up)."""
    return SchemaSet()
