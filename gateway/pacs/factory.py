"""Build the PACS backends a configuration names (one per ``[pacs]`` / ``[[pacs]]`` entry).

Each backend serves one RAD-75 RepositoryUniqueId: the entry's ``imaging_source_id``, or the
gateway's ``[gateway] imaging_source_id`` when the entry has none. Two entries may not end up with
the same source id (a RAD-75 request could not be routed).

C-MOVE needs the port of our Storage SCP (``move_port``, bound on ``move_host``) — the PACS must know
``calling_ae`` at that address. Without it a ``retrieve = "c-move"`` backend reports every instance
of every retrieve as failed, with a message saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from gateway.config import Config, ConfigError, DicomwebPacs, DimsePacs, FilesystemPacs, normalize_oid
from gateway.pacs.base import PacsBackend
from gateway.pacs.dicomweb import DicomwebBackend
from gateway.pacs.dimse import DimseBackend
from gateway.pacs.filesystem import FilesystemBackend

if TYPE_CHECKING:
    from gateway.audit.auditor import Auditor

__all__ = ["backend_for_source", "open_backend", "open_backends", "pacs_label"]


def pacs_label(entry: DimsePacs | DicomwebPacs | FilesystemPacs) -> str:
    """How the PACS is named in audit messages and logs: AE title and address, URL or folder."""
    if isinstance(entry, DimsePacs):
        return f"{entry.called_ae}@{entry.host}:{entry.port}"
    if isinstance(entry, DicomwebPacs):
        return entry.url
    return str(entry.path)


def open_backend(entry: DimsePacs | DicomwebPacs | FilesystemPacs, *, source_id: str, engine: Engine,
                 ) -> PacsBackend:
    """One backend for one ``[pacs]`` entry."""
    if isinstance(entry, DimsePacs):
        return DimseBackend(host=entry.host, port=entry.port, source_id=source_id, called_ae=entry.called_ae,
                            calling_ae=entry.calling_ae, retrieve=entry.retrieve,
                            move_port=entry.move_port, move_host=entry.move_host, name=entry.name)
    if isinstance(entry, DicomwebPacs):
        return DicomwebBackend(entry.url, source_id=source_id, name=entry.name)
    if isinstance(entry, FilesystemPacs):
        entry.path.mkdir(parents=True, exist_ok=True)
        return FilesystemBackend(entry.path, engine, source_id, name=entry.name)
    raise TypeError(f"unknown PACS entry {entry!r}")


def open_backends(config: Config, engine: Engine, *, auditor: Auditor | None = None) -> list[PacsBackend]:
    """One backend per ``[pacs]`` entry, in configuration order; :class:`ConfigError` on duplicate source ids.

    With ``auditor`` every backend is wrapped so its calls are audited (:class:`~gateway.pacs.audited.AuditedPacs`).
    """
    problems: list[str] = []
    seen: dict[str, int] = {}
    plan: list[tuple[DimsePacs | DicomwebPacs | FilesystemPacs, str]] = []
    for index, entry in enumerate(config.pacs):
        source_id = entry.imaging_source_id or config.gateway.imaging_source_id
        try:
            source_id = normalize_oid(source_id)
        except ValueError as exc:
            problems.append(f"pacs[{index}].imaging_source_id: {exc}")
            continue
        if source_id in seen:
            problems.append(f"pacs[{index}].imaging_source_id: {source_id} is already served by pacs[{seen[source_id]}]"
                            " (give each PACS its own imaging_source_id)")
            continue
        seen[source_id] = index
        plan.append((entry, source_id))
    if problems:
        raise ConfigError("pacs", problems)
    backends = [open_backend(entry, source_id=source_id, engine=engine) for entry, source_id in plan]
    if auditor is None:
        return backends
    from gateway.pacs.audited import AuditedPacs

    return [AuditedPacs(b, auditor, pacs_label(entry)) for b, (entry, _) in zip(backends, plan, strict=True)]


def backend_for_source(backends: Sequence[PacsBackend], source_id: str) -> PacsBackend | None:
    """The backend serving RAD-75 RepositoryUniqueId ``source_id`` (``urn:oid:`` prefix tolerated), or ``None``."""
    wanted = source_id.strip()
    if wanted.lower().startswith("urn:oid:"):
        wanted = wanted[8:]
    for backend in backends:
        if backend.source_id == wanted:
            return backend
    return None
