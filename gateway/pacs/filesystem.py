"""The embedded default PACS: a folder of DICOM Part 10 files indexed in the database.

Files live under the store folder as ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``;
the table ``pacs_instances`` (:mod:`gateway.store.tables`) holds one row per file with the
attributes the gateway queries on, so no query ever opens a file. Only ``retrieve`` reads files,
streaming them in 1 MiB chunks.

Importing (:meth:`FilesystemBackend.index_directory`, used by ``xig pacs import``) reads each file's
header only (``stop_before_pixels``), copies the file into place atomically (temporary file in the
destination folder, fsync, rename) while hashing it, then inserts the row. It is idempotent — an
SOP Instance UID already indexed is skipped and reported — and it never stops at a bad file: files
that are not DICOM Part 10, lack a UID or carry an unsafe one are reported with the reason and the
import goes on. Indexing the store folder itself (after a database loss) re-indexes in place.

Database work is synchronous SQLAlchemy; the async :class:`~gateway.pacs.base.PacsBackend` methods
run it in worker threads (``anyio.to_thread``), so the event loop never waits on SQLite or the disk.
The synchronous helpers (``index_directory``, ``list_patients``, ``list_studies``) are for the CLI.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import ColumnElement, Engine, and_, func, or_, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.dicom import values as dv
from gateway.files import atomic_write
from gateway.pacs.base import (
    InstanceInfo,
    InstanceRef,
    PacsError,
    PatientQuery,
    PatientRecord,
    RetrievedInstance,
    RetrieveFailure,
    SeriesInfo,
    StoreResult,
    StudyInfo,
)
from gateway.store.tables import pacs_instances

__all__ = ["CHUNK_SIZE", "BadFile", "FilesystemBackend", "ImportReport", "ImportedFile", "PatientSummary",
           "SkippedFile", "StudySummary", "is_safe_uid"]

CHUNK_SIZE = 1024 * 1024
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_LOOKUP_BATCH = 500
T = pacs_instances
_R = TypeVar("_R")


def is_safe_uid(value: str) -> bool:
    """Digits and dots, at most 64 characters: a DICOM UID that is also safe as a file name.

    Components with leading zeros (invalid, but written by some modalities) are tolerated: the point
    here is a safe path (no ``/``, ``..`` or other characters), not UID conformance.
    """
    return 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


# -------------------------------------------------------------------------------------------------
# Reports
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportedFile:
    source: Path
    SOPInstanceUID: str
    StudyInstanceUID: str
    size: int


@dataclass(frozen=True)
class SkippedFile:
    source: Path
    SOPInstanceUID: str
    reason: str


@dataclass(frozen=True)
class BadFile:
    source: Path
    reason: str


@dataclass
class ImportReport:
    """What :meth:`FilesystemBackend.index_directory` did with every file it found."""

    imported: list[ImportedFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    failed: list[BadFile] = field(default_factory=list)

    @property
    def bytes_imported(self) -> int:
        return sum(f.size for f in self.imported)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (f"{len(self.imported)} imported ({self.bytes_imported} bytes), {len(self.skipped)} skipped, "
                f"{len(self.failed)} failed")


@dataclass(frozen=True)
class PatientSummary:
    patient: PatientRecord
    studies: int
    instances: int


@dataclass(frozen=True)
class StudySummary:
    StudyInstanceUID: str
    PatientID: str
    IssuerOfPatientID: str | None
    PatientName: str
    StudyDate: str
    StudyDescription: str
    AccessionNumber: str
    modalities: tuple[str, ...]
    series: int
    instances: int
    size: int


class _BadFile(Exception):
    """Internal: this file cannot be indexed (the message is the reason)."""


# -------------------------------------------------------------------------------------------------
# Header extraction
# -------------------------------------------------------------------------------------------------

_COLUMN_LIMITS = {c.name: getattr(c.type, "length", None) for c in T.columns}






def _fit(row: dict[str, Any]) -> dict[str, Any]:
    """Truncate strings to their column length (SQLite would not care; PostgreSQL would refuse)."""
    for key, value in row.items():
        limit = _COLUMN_LIMITS.get(key)
        if isinstance(value, str) and limit and len(value) > limit:
            row[key] = value[:limit]
    return row


def accession_issuer(ds: Dataset) -> str | None:
    seq = ds.get("IssuerOfAccessionNumberSequence")
    if not seq:
        return None
    item = seq[0]
    return (dv.text(item, "UniversalEntityID") or dv.text(item, "LocalNamespaceEntityID")) or None


def _header_row(path: Path) -> dict[str, Any]:
    """The index row of a Part 10 file, from its header (pixel data is not read)."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise _BadFile(f"not a DICOM Part 10 file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise _BadFile(f"cannot read the file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt data
        raise _BadFile(f"corrupt DICOM header ({type(exc).__name__}: {exc})") from None
    meta = getattr(ds, "file_meta", None)
    ts = dv.text(meta, "TransferSyntaxUID") if meta is not None else ""
    if meta is not None and dv.text(meta, "MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
        raise _BadFile("a DICOMDIR (media index), not an instance")
    try:
        row: dict[str, Any] = {
            "sop_instance_uid": dv.text(ds, "SOPInstanceUID") or (dv.text(meta, "MediaStorageSOPInstanceUID")
                                                                  if meta is not None else ""),
            "sop_class_uid": dv.text(ds, "SOPClassUID") or (dv.text(meta, "MediaStorageSOPClassUID")
                                                           if meta is not None else ""),
            "study_instance_uid": dv.text(ds, "StudyInstanceUID"),
            "series_instance_uid": dv.text(ds, "SeriesInstanceUID"),
            "transfer_syntax_uid": ts,
            "patient_id": dv.text(ds, "PatientID"),
            "issuer_of_patient_id": dv.text(ds, "IssuerOfPatientID") or None,
            "patient_name": dv.text(ds, "PatientName"),
            "patient_birth_date": dv.text(ds, "PatientBirthDate"),
            "patient_sex": dv.text(ds, "PatientSex"),
            "study_date": dv.text(ds, "StudyDate"),
            "study_time": dv.text(ds, "StudyTime"),
            "accession_number": dv.text(ds, "AccessionNumber"),
            "accession_issuer": accession_issuer(ds),
            "study_id": dv.text(ds, "StudyID"),
            "study_description": dv.text(ds, "StudyDescription"),
            "referring_physician_name": dv.text(ds, "ReferringPhysicianName"),
            "series_number": dv.integer(ds, "SeriesNumber"),
            "series_description": dv.text(ds, "SeriesDescription"),
            "modality": dv.text(ds, "Modality"),
            "body_part_examined": dv.text(ds, "BodyPartExamined"),
            "instance_number": dv.integer(ds, "InstanceNumber"),
        }
    except Exception as exc:  # noqa: BLE001 - value decoding (character sets, VRs) of a corrupt file
        raise _BadFile(f"cannot decode the header ({type(exc).__name__}: {exc})") from None
    for key, name in (("sop_instance_uid", "SOP Instance UID"), ("sop_class_uid", "SOP Class UID"),
                      ("study_instance_uid", "Study Instance UID"), ("series_instance_uid", "Series Instance UID"),
                      ("transfer_syntax_uid", "Transfer Syntax UID (File Meta)")):
        if not row[key]:
            raise _BadFile(f"missing {name}")
        if not is_safe_uid(row[key]):
            raise _BadFile(f"invalid {name} {row[key][:80]!r}")
    return row


# -------------------------------------------------------------------------------------------------
# The backend
# -------------------------------------------------------------------------------------------------



def _like_prefix(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


class FilesystemBackend:
    """A folder of Part 10 files plus the ``pacs_instances`` index: the embedded PACS."""

    def __init__(self, root: Path | str, engine: Engine, source_id: str, *, name: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.engine = engine
        self.source_id = source_id
        self.name = name or f"filesystem:{self.root}"

    def __repr__(self) -> str:
        return f"FilesystemBackend({str(self.root)!r}, source_id={self.source_id!r})"

    # -- import (synchronous; the CLI calls it directly) ------------------------------------------
    def index_directory(self, directory: Path | str, *,
                        progress: Callable[[Path], None] | None = None) -> ImportReport:
        """Import every file under ``directory`` (or that one file); see the module docstring."""
        report = ImportReport()
        for path in self._walk(Path(directory)):
            if progress is not None:
                progress(path)
            self._index_one(path, report)
        return report

    def index_files(self, paths: Iterable[Path | str]) -> ImportReport:
        report = ImportReport()
        for path in paths:
            self._index_one(Path(path), report)
        return report

    @staticmethod
    def _walk(directory: Path) -> Iterator[Path]:
        if directory.is_file():
            yield directory
            return
        if not directory.is_dir():
            raise PacsError(f"{directory}: no such file or folder")
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):  # hidden files (our own temporaries included) are not instances
                    yield Path(dirpath) / name

    def _index_one(self, path: Path, report: ImportReport) -> None:
        try:
            row = _header_row(path)
        except _BadFile as exc:
            report.failed.append(BadFile(path, str(exc)))
            return
        sop = row["sop_instance_uid"]
        try:
            existing = self._existing_source(sop)
        except SQLAlchemyError as exc:
            report.failed.append(BadFile(path, f"database error: {exc}"))
            return
        if existing is not None:
            where = "" if existing == self.source_id else f" (by imaging source {existing})"
            report.skipped.append(SkippedFile(path, sop, f"SOP Instance UID already stored{where}"))
            return
        rel = Path(row["study_instance_uid"]) / row["series_instance_uid"] / f"{sop}.dcm"
        dest = self.root / rel
        created = False
        try:
            if path.resolve() == dest.resolve():
                size, digest = self._hash(dest)
            else:
                size, digest = self._copy_atomic(path, dest)
                created = True
        except OSError as exc:
            report.failed.append(BadFile(path, f"cannot copy into the store ({exc})"))
            return
        row.update(source_id=self.source_id, path=rel.as_posix(), size=size, sha256=digest,
                   indexed_at=dt.datetime.now(dt.UTC))
        try:
            with self.engine.begin() as conn:
                conn.execute(T.insert().values(**_fit(row)))
        except IntegrityError:
            # a concurrent import indexed the same instance first; its file is the same path
            report.skipped.append(SkippedFile(path, sop, "SOP Instance UID already stored"))
            return
        except SQLAlchemyError as exc:
            if created:
                with contextlib.suppress(OSError):
                    dest.unlink()
            report.failed.append(BadFile(path, f"database error: {exc}"))
            return
        report.imported.append(ImportedFile(path, sop, row["study_instance_uid"], size))

    def _existing_source(self, sop: str) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(T.c.source_id).where(T.c.sop_instance_uid == sop)).scalar_one_or_none()
        return None if value is None else str(value)

    @staticmethod
    def _hash(path: Path) -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    @staticmethod
    def _copy_atomic(src: Path, dest: Path) -> tuple[int, str]:
        """Copy ``src`` to ``dest`` atomically (temporary file + fsync + rename); ``(size, sha256)``."""
        h = hashlib.sha256()
        size = 0
        with src.open("rb") as fin, atomic_write(dest) as fout:
            while chunk := fin.read(CHUNK_SIZE):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    # -- listings for ``xig pacs ls`` (synchronous) -------------------------------------------------
    def list_patients(self) -> list[PatientSummary]:
        """Every patient in the store with study and instance counts, by patient ID."""
        q = (select(T.c.patient_id, T.c.issuer_of_patient_id, func.max(T.c.patient_name),
                    func.max(T.c.patient_birth_date), func.max(T.c.patient_sex),
                    func.count(func.distinct(T.c.study_instance_uid)), func.count())
             .where(T.c.source_id == self.source_id)
             .group_by(T.c.patient_id, T.c.issuer_of_patient_id)
             .order_by(T.c.patient_id, T.c.issuer_of_patient_id))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [PatientSummary(PatientRecord(r[0], r[1] or None, r[2] or "", r[3] or "", r[4] or ""),
                               int(r[5]), int(r[6])) for r in rows]

    def list_studies(self, patient_id: str | None = None) -> list[StudySummary]:
        """Every study (of one patient when ``patient_id`` is given), newest first."""
        cond = [T.c.source_id == self.source_id]
        if patient_id is not None:
            cond.append(T.c.patient_id == patient_id)
        q = (select(T.c.study_instance_uid, func.max(T.c.patient_id), func.max(T.c.issuer_of_patient_id),
                    func.max(T.c.patient_name), func.max(T.c.study_date), func.max(T.c.study_description),
                    func.max(T.c.accession_number), func.count(func.distinct(T.c.series_instance_uid)),
                    func.count(), func.sum(T.c.size))
             .where(*cond).group_by(T.c.study_instance_uid))
        mq = (select(T.c.study_instance_uid, T.c.modality, func.min(T.c.series_number))
              .where(*cond).group_by(T.c.study_instance_uid, T.c.modality))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
            mods: dict[str, list[tuple[int, str]]] = {}
            for study, modality, number in conn.execute(mq):
                if modality:
                    mods.setdefault(study, []).append((number if number is not None else 1 << 30, modality))
        out = [StudySummary(r[0], r[1], r[2] or None, r[3] or "", r[4] or "", r[5] or "", r[6] or "",
                            tuple(m for _, m in sorted(mods.get(r[0], []))), int(r[7]), int(r[8]), int(r[9] or 0))
               for r in rows]
        out.sort(key=lambda s: (s.StudyDate, s.StudyInstanceUID), reverse=True)
        return out

    # -- queries (synchronous cores) -------------------------------------------------------------
    def _find_patients_sync(self, query: PatientQuery) -> list[PatientRecord]:
        demo: list[ColumnElement[bool]] = []
        if query.family and query.family.strip():
            demo.append(func.lower(T.c.patient_name).like(_like_prefix(query.family.strip().lower()), escape="\\"))
        if query.birth_date_from:
            demo.append(T.c.patient_birth_date >= query.birth_date_from)
        if query.birth_date_to:
            demo.append(and_(T.c.patient_birth_date != "", T.c.patient_birth_date <= query.birth_date_to))
        alternatives: list[ColumnElement[bool]] = []
        if demo:
            alternatives.append(and_(*demo))
        if query.patient_ids:
            alternatives.append(T.c.patient_id.in_(list(query.patient_ids)))
        q = (select(T.c.patient_id, T.c.issuer_of_patient_id, T.c.patient_name, T.c.patient_birth_date,
                    T.c.patient_sex).distinct().where(T.c.source_id == self.source_id))
        if alternatives:
            q = q.where(or_(*alternatives))
        q = q.order_by(T.c.patient_id, T.c.issuer_of_patient_id)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        seen: dict[tuple[str, str | None], PatientRecord] = {}
        for pid, issuer, name, birth, sex in rows:
            seen.setdefault((pid, issuer or None), PatientRecord(pid, issuer or None, name or "", birth or "",
                                                                 sex or ""))
        return list(seen.values())

    def _study_rows(self, *conditions: Any) -> list[Any]:
        q = (select(T).where(T.c.source_id == self.source_id, *conditions)
             .order_by(T.c.study_date, T.c.study_instance_uid, T.c.series_number, T.c.series_instance_uid,
                       T.c.instance_number, T.c.sop_instance_uid))
        with self.engine.connect() as conn:
            return list(conn.execute(q).all())

    def _build(self, rows: Sequence[Any]) -> list[StudyInfo]:
        studies: dict[str, tuple[Any, dict[str, tuple[Any, list[InstanceInfo]]]]] = {}
        for r in rows:
            _, series = studies.setdefault(r.study_instance_uid, (r, {}))
            _, instances = series.setdefault(r.series_instance_uid, (r, []))
            instances.append(InstanceInfo(r.sop_class_uid, r.sop_instance_uid, r.instance_number,
                                          r.transfer_syntax_uid))
        out: list[StudyInfo] = []
        for first, series in studies.values():
            patient = PatientRecord(first.patient_id, first.issuer_of_patient_id or None, first.patient_name or "",
                                    first.patient_birth_date or "", first.patient_sex or "")
            out.append(StudyInfo(
                StudyInstanceUID=first.study_instance_uid, patient=patient, StudyDate=first.study_date or "",
                StudyTime=first.study_time or "", AccessionNumber=first.accession_number or "",
                AccessionNumberIssuer=first.accession_issuer or None, StudyID=first.study_id or "",
                StudyDescription=first.study_description or "",
                ReferringPhysicianName=first.referring_physician_name or "",
                series=tuple(SeriesInfo(s.series_instance_uid, s.modality or "", s.series_number,
                                        s.series_description or "", s.body_part_examined or "", tuple(insts))
                             for s, insts in series.values()),
                source_id=self.source_id))
        return out

    def _find_studies_sync(self, patient_id: str, issuer: str | None) -> list[StudyInfo]:
        cond = [T.c.patient_id == patient_id]
        if issuer:
            # an index row without issuer may still be this patient: over-return rather than miss it
            cond.append(or_(T.c.issuer_of_patient_id == issuer, T.c.issuer_of_patient_id.is_(None),
                            T.c.issuer_of_patient_id == ""))
        return self._build(self._study_rows(*cond))

    def _get_study_sync(self, study_instance_uid: str) -> StudyInfo | None:
        studies = self._build(self._study_rows(T.c.study_instance_uid == study_instance_uid))
        return studies[0] if studies else None

    def _lookup_sync(self, sops: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(sops), _LOOKUP_BATCH):
                batch = list(sops[i:i + _LOOKUP_BATCH])
                q = select(T.c.sop_instance_uid, T.c.study_instance_uid, T.c.series_instance_uid, T.c.sop_class_uid,
                           T.c.transfer_syntax_uid, T.c.path).where(T.c.source_id == self.source_id,
                                                                    T.c.sop_instance_uid.in_(batch))
                for r in conn.execute(q):
                    found[r.sop_instance_uid] = r
        return found

    def _path_of(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise PacsError(f"index entry points outside the store: {rel!r}")
        return path

    # -- PacsBackend ----------------------------------------------------------------------------
    async def ping(self) -> None:
        def check() -> None:
            if not self.root.is_dir():
                raise PacsError(f"store folder {self.root} does not exist")
            if not os.access(self.root, os.R_OK | os.X_OK):
                raise PacsError(f"store folder {self.root} is not readable")
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except SQLAlchemyError as exc:
                raise PacsError(f"index database unavailable: {exc}") from exc

        await anyio.to_thread.run_sync(check)

    async def _db(self, fn: Callable[..., _R], *args: Any) -> _R:
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except SQLAlchemyError as exc:
            raise PacsError(f"index database error: {exc}") from exc

    async def find_patients(self, query: PatientQuery) -> list[PatientRecord]:
        return await self._db(self._find_patients_sync, query)

    async def find_studies(self, patient_id: str, issuer: str | None = None) -> list[StudyInfo]:
        return await self._db(self._find_studies_sync, patient_id, issuer)

    async def get_study(self, study_instance_uid: str) -> StudyInfo | None:
        return await self._db(self._get_study_sync, study_instance_uid)

    async def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        if not refs:
            return
        try:
            rows = await self._db(self._lookup_sync, [r.SOPInstanceUID for r in refs])
        except PacsError as exc:
            for ref in refs:
                yield RetrieveFailure(ref, str(exc))
            return
        for ref in refs:
            row = rows.get(ref.SOPInstanceUID)
            if row is None:
                yield RetrieveFailure(ref, f"SOP instance {ref.SOPInstanceUID} is not in the store", missing=True)
                continue
            if row.study_instance_uid != ref.StudyInstanceUID or row.series_instance_uid != ref.SeriesInstanceUID:
                yield RetrieveFailure(ref, f"SOP instance {ref.SOPInstanceUID} is not part of study "
                                           f"{ref.StudyInstanceUID} / series {ref.SeriesInstanceUID}", missing=True)
                continue
            try:
                path = self._path_of(row.path)
                size = (await anyio.Path(path).stat()).st_size
            except (OSError, PacsError) as exc:
                yield RetrieveFailure(ref, f"file of SOP instance {ref.SOPInstanceUID} is missing from the "
                                           f"store ({exc})")
                continue
            yield RetrievedInstance(ref=ref, TransferSyntaxUID=row.transfer_syntax_uid, SOPClassUID=row.sop_class_uid,
                                    chunks=_read_chunks(path), size=size)

    async def store(self, files: Sequence[Path]) -> StoreResult:
        report = await anyio.to_thread.run_sync(self.index_files, list(files))
        result = StoreResult()
        for f in report.imported:
            result.stored.append(f.SOPInstanceUID)
        for s in report.skipped:
            result.stored.append(s.SOPInstanceUID)  # already there: storing is idempotent
        for b in report.failed:
            result.failed[str(b.source)] = b.reason
        return result

    async def aclose(self) -> None:
        return None


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    try:
        f = await anyio.open_file(path, "rb")
    except OSError as exc:
        raise PacsError(f"cannot open {path}: {exc}") from exc
    async with f:
        while True:
            try:
                chunk = await f.read(CHUNK_SIZE)
            except OSError as exc:
                raise PacsError(f"cannot read {path}: {exc}") from exc
            if not chunk:
                return
            yield chunk
