"""DICOMweb adapter (httpx): QIDO-RS queries, WADO-RS retrieve, STOW-RS store (PS3.18).

* ``find_patients`` — ``GET /studies?PatientName=FAMILY*&PatientBirthDate=from-to`` (the family name
  as given, upper case and capitalised), ``GET /studies?PatientID=...`` per requested ID, aggregated
  into distinct (PatientID, IssuerOfPatientID) patients.
* ``find_studies`` / ``get_study`` — ``GET /studies?PatientID=`` (or ``StudyInstanceUID=``), then
  ``/studies/{study}/series`` and ``/studies/{study}/series/{series}/instances`` for the tree. QIDO
  answers are paged with ``limit``/``offset`` so a server-side result cap cannot truncate a study.
* ``retrieve`` — per series: a QIDO instance query tells which requested instances exist (the others
  fail at once); then WADO-RS with ``Accept: multipart/related; type="application/dicom";
  transfer-syntax=*`` (the stored syntax, no transcoding): one whole-series request when at least
  half of the series is wanted (instances not asked for are skipped), else one request per instance.
  The multipart response is parsed incrementally; each part becomes a :class:`RetrievedInstance` as
  soon as its File Meta is read (transfer syntax, SOP class and instance come from there) and its
  ``chunks`` read straight from the HTTP stream — memory stays at one network chunk, not even one
  instance. Read an instance's chunks before asking for the next item; unread parts are skipped.
* ``store`` — STOW-RS ``POST /studies``, the files streamed as a ``multipart/related`` body.
* ``ping`` — ``GET /studies?limit=1``.

Transport errors and unexpected HTTP statuses are :class:`PacsError` for queries; in ``retrieve``
they become :class:`RetrieveFailure` for the instances concerned (and for every remaining one once
the server is unreachable). Only a connection lost in the middle of an instance's bytes surfaces as
:class:`PacsError` from that instance's ``chunks``.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import anyio
import httpx
from pydicom.filereader import read_file_meta_info

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
from gateway.pacs.filesystem import is_safe_uid

__all__ = ["WADO_ACCEPT", "DicomwebBackend", "MultipartReader", "parse_file_meta"]

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK_SIZE = 1024 * 1024
_MAX_PART_HEADER = 16 * 1024
_MAX_FILE_META = 64 * 1024
_STOW_BATCH_FILES = 100
_STOW_BATCH_BYTES = 256 * 1024 * 1024

# DICOM JSON tags (PS3.18 F.2)
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
PATIENT_NAME, PATIENT_ID, ISSUER, BIRTH, SEX = "00100010", "00100020", "00100021", "00100030", "00100040"
STUDY_DATE, STUDY_TIME, ACCESSION, ACCESSION_ISSUER = "00080020", "00080030", "00080050", "00080051"
STUDY_ID, STUDY_DESC, REFERRING = "00200010", "00081030", "00080090"
MODALITY, SERIES_NUMBER, SERIES_DESC, BODY_PART = "00080060", "00200011", "0008103E", "00180015"
INSTANCE_NUMBER, RETRIEVE_AET = "00200013", "00080054"
_STUDY_FIELDS = (ISSUER, STUDY_DESC, ACCESSION_ISSUER, STUDY_ID, REFERRING, BIRTH, SEX, STUDY_TIME)
_SERIES_FIELDS = (SERIES_DESC, BODY_PART, SERIES_NUMBER)
_INSTANCE_FIELDS = (INSTANCE_NUMBER, SOP_CLASS)


# -------------------------------------------------------------------------------------------------
# DICOM JSON helpers
# -------------------------------------------------------------------------------------------------

def _values(item: dict[str, Any], tag: str) -> list[Any]:
    attr = item.get(tag)
    if not isinstance(attr, dict):
        return []
    values = attr.get("Value")
    return values if isinstance(values, list) else []


def _str(item: dict[str, Any], tag: str) -> str:
    values = _values(item, tag)
    if not values:
        return ""
    out = []
    for v in values:
        if isinstance(v, dict):  # PN: {"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...}
            groups = [v.get("Alphabetic", ""), v.get("Ideographic", ""), v.get("Phonetic", "")]
            while groups and not groups[-1]:
                groups.pop()
            out.append("=".join(str(g) for g in groups))
        elif v is not None:
            out.append(str(v))
    return "\\".join(out).strip()


def _int(item: dict[str, Any], tag: str) -> int | None:
    values = _values(item, tag)
    try:
        return int(values[0]) if values and values[0] not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _accession_issuer(item: dict[str, Any]) -> str | None:
    seq = _values(item, ACCESSION_ISSUER)
    if not seq or not isinstance(seq[0], dict):
        return None
    return (_str(seq[0], "00400032") or _str(seq[0], "00400031")) or None


def _patient(item: dict[str, Any]) -> PatientRecord:
    return PatientRecord(_str(item, PATIENT_ID), _str(item, ISSUER) or None, _str(item, PATIENT_NAME),
                         _str(item, BIRTH), _str(item, SEX))


def _family_variants(family: str) -> list[str]:
    clean = "".join(c for c in family.strip() if c not in "*?\\^=,")
    if not clean:
        return []
    return list(dict.fromkeys([clean, clean.upper(), clean.capitalize()]))


# -------------------------------------------------------------------------------------------------
# File Meta and multipart parsing
# -------------------------------------------------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def parse_file_meta(head: bytes | bytearray, *, final: bool = False) -> dict[int, str] | None:
    """UI elements of a Part 10 File Meta group, keyed by element number (``0x0010`` = Transfer Syntax).

    ``head`` is the start of the file; ``None`` means "need more bytes" (unless ``final``, when the
    bytes are all there is). Raises ``ValueError`` when this is not a Part 10 file.
    """
    if len(head) < 132:
        if final:
            raise ValueError("shorter than a DICOM preamble")
        return None
    if head[128:132] != b"DICM":
        raise ValueError("no 'DICM' prefix after the preamble (not a DICOM Part 10 object)")
    pos = 132
    out: dict[int, str] = {}
    while True:
        if len(head) < pos + 8:
            return out if final else None
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return out
        vr = bytes(head[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return out if final else None
            length = struct.unpack_from("<I", head, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", head, pos + 6)[0]
            start = pos + 8
        end = start + length
        if len(head) < end:
            if final:
                raise ValueError("truncated File Meta Information")
            return None
        if vr == b"UI":
            out[element] = bytes(head[start:end]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = end


class MultipartReader:
    """Incremental ``multipart/related`` reader over an async byte stream.

    ``await next_part()`` returns the next part's headers (lower-case names) or ``None`` after the
    closing delimiter; ``await read()`` returns the next piece of the current part's body, ``None``
    at its end. Moving to the next part skips what is left of the current one. CRLF and bare-LF
    framing and transport padding after delimiters are accepted. Memory: one input chunk plus the
    delimiter length.
    """

    _PREAMBLE, _AFTER_DELIM, _HEADERS, _BODY, _DONE = range(5)
    _HEADER_END = re.compile(rb"\r?\n\r?\n")

    def __init__(self, chunks: AsyncIterator[bytes], boundary: str) -> None:
        if not boundary:
            raise PacsError("multipart response without boundary")
        self._chunks = chunks
        self._delim = b"\n--" + boundary.encode("latin-1")
        self._buf = bytearray(b"\n")  # a virtual line end lets "--boundary" at the very start match
        self._state = self._PREAMBLE
        self._eof = False
        self.part_index = -1

    async def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return False
        self._buf += chunk
        return True

    async def next_part(self) -> dict[str, str] | None:
        while self._state == self._BODY:
            await self.read()
        if self._state == self._DONE:
            return None
        if self._state == self._PREAMBLE:
            while (idx := self._buf.find(self._delim)) < 0:
                if len(self._buf) > _MAX_PART_HEADER:
                    del self._buf[:len(self._buf) - len(self._delim)]
                if not await self._fill():
                    raise PacsError("multipart response without any part")
            del self._buf[:idx + len(self._delim)]
            self._state = self._AFTER_DELIM
        # after a delimiter: "--" closes the message, else padding up to the line end
        while len(self._buf) < 2 and await self._fill():
            pass
        if self._buf[:2] == b"--" or (self._eof and not self._buf.strip()):
            self._state = self._DONE
            self._buf.clear()
            return None
        while (nl := self._buf.find(b"\n")) < 0:
            if len(self._buf) > _MAX_PART_HEADER or not await self._fill():
                raise PacsError("malformed multipart delimiter line")
        del self._buf[:nl + 1]
        while (m := self._HEADER_END.search(self._buf)) is None:
            if self._buf[:1] == b"\n" or self._buf[:2] == b"\r\n":  # a part without headers
                break
            if len(self._buf) > _MAX_PART_HEADER or not await self._fill():
                raise PacsError("truncated or oversized multipart part headers")
        if m is None:
            raw, cut = b"", (1 if self._buf[:1] == b"\n" else 2)
        else:
            raw, cut = bytes(self._buf[:m.start()]), m.end()
        del self._buf[:cut]
        headers: dict[str, str] = {}
        for line in raw.decode("latin-1").splitlines():
            name, sep, value = line.partition(":")
            if sep:
                headers.setdefault(name.strip().lower(), value.strip())
        self._state = self._BODY
        self.part_index += 1
        return headers

    async def read(self) -> bytes | None:
        if self._state != self._BODY:
            return None
        keep = len(self._delim)
        while True:
            idx = self._buf.find(self._delim)
            if idx >= 0:
                end = idx - 1 if idx > 0 and self._buf[idx - 1] == 0x0D else idx
                data = bytes(self._buf[:end])
                del self._buf[:idx + len(self._delim)]
                self._state = self._AFTER_DELIM
                return data
            if len(self._buf) > keep:
                n = len(self._buf) - keep
                data = bytes(self._buf[:n])
                del self._buf[:n]
                return data
            if not await self._fill():
                raise PacsError("multipart response truncated in the middle of a part")


# -------------------------------------------------------------------------------------------------
# The backend
# -------------------------------------------------------------------------------------------------

class _Unreachable(PacsError):
    """The server cannot be reached at all (every further request would fail too)."""


class DicomwebBackend:
    """A PACS reached over DICOMweb (QIDO-RS / WADO-RS / STOW-RS)."""

    def __init__(self, url: str, *, source_id: str, client: httpx.AsyncClient | None = None,
                 timeout: float = 30.0, headers: dict[str, str] | None = None, page_size: int = 1000,
                 name: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.source_id = source_id
        self.page_size = page_size
        self.name = name or f"dicomweb:{self.url}"
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            base_url=self.url + "/", timeout=httpx.Timeout(timeout), headers=headers or {},
            follow_redirects=False)

    def __repr__(self) -> str:
        return f"DicomwebBackend({self.url!r}, source_id={self.source_id!r})"

    # -- HTTP ------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        for p in parts:
            if not is_safe_uid(p):
                raise PacsError(f"invalid UID {p[:80]!r}")
        return "/".join(p for pair in zip(("studies", "series", "instances"), parts, strict=False) for p in pair)

    async def _get_json(self, path: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        try:
            # "*" and "," stay literal: some servers (Orthanc) do not decode %2A back into a wildcard
            query = urlencode(list(params), safe="*,^", quote_via=quote)
            rsp = await self._client.get(f"{path}?{query}" if query else path,
                                         headers={"Accept": "application/dicom+json"})
        except httpx.TransportError as exc:
            raise _Unreachable(f"DICOMweb server {self.url} unreachable: {exc!s} ({type(exc).__name__})") from exc
        if rsp.status_code == 204 or (rsp.status_code == 404 and path != "studies"):
            return []
        if rsp.status_code != 200:
            raise PacsError(f"QIDO-RS {path} failed: HTTP {rsp.status_code} {rsp.text[:200]}")
        try:
            body = rsp.json()
        except ValueError as exc:
            raise PacsError(f"QIDO-RS {path}: response is not JSON ({exc})") from exc
        if not isinstance(body, list):
            raise PacsError(f"QIDO-RS {path}: expected a JSON array")
        return [item for item in body if isinstance(item, dict)]

    async def _qido(self, path: str, match: dict[str, str], fields: Sequence[str] = ()) -> list[dict[str, Any]]:
        """All results of a QIDO-RS query, fetched in pages of ``page_size``."""
        base = [(k, v) for k, v in match.items() if v] + [("includefield", f) for f in fields]
        out: list[dict[str, Any]] = []
        offset = 0
        previous_first: dict[str, Any] | None = None
        while True:
            page = await self._get_json(path, [*base, ("limit", str(self.page_size)), ("offset", str(offset))])
            if page and offset and page[0] == previous_first:
                return out  # the server ignores ``offset``: it sent the first page again
            out += page
            if len(page) < self.page_size or len(page) > self.page_size:  # last page, or ``limit`` ignored
                return out
            previous_first = page[0]
            offset += len(page)

    async def ping(self) -> None:
        await self._get_json("studies", [("limit", "1")])

    # -- queries ---------------------------------------------------------------------------------
    async def find_patients(self, query: PatientQuery) -> list[PatientRecord]:
        dates = (f"{query.birth_date_from or ''}-{query.birth_date_to or ''}"
                 if (query.birth_date_from or query.birth_date_to) else "")
        searches: list[dict[str, str]] = []
        names = _family_variants(query.family or "")
        if names:
            searches += [{"PatientName": f"{n}*", "PatientBirthDate": dates} for n in names]
        elif dates:
            searches.append({"PatientBirthDate": dates})
        searches += [{"PatientID": pid} for pid in query.patient_ids if pid]
        if not searches:
            searches.append({})
        found: dict[tuple[str, str | None], PatientRecord] = {}
        for match in searches:
            for item in await self._qido("studies", match, (ISSUER, BIRTH, SEX)):
                rec = _patient(item)
                if rec.PatientID:
                    found.setdefault((rec.PatientID, rec.IssuerOfPatientID), rec)
        return list(found.values())

    async def _tree(self, study: dict[str, Any]) -> StudyInfo:
        uid = _str(study, STUDY_UID)
        series: list[SeriesInfo] = []
        for s in await self._qido(self._path(uid) + "/series", {}, _SERIES_FIELDS):
            series_uid = _str(s, SERIES_UID)
            if not is_safe_uid(series_uid):
                continue
            instances = sorted(
                (InstanceInfo(_str(i, SOP_CLASS), _str(i, SOP_UID), _int(i, INSTANCE_NUMBER))
                 for i in await self._qido(self._path(uid, series_uid) + "/instances", {}, _INSTANCE_FIELDS)
                 if _str(i, SOP_UID)),
                key=lambda i: (i.InstanceNumber if i.InstanceNumber is not None else 1 << 30, i.SOPInstanceUID))
            series.append(SeriesInfo(series_uid, _str(s, MODALITY), _int(s, SERIES_NUMBER), _str(s, SERIES_DESC),
                                     _str(s, BODY_PART), tuple(instances)))
        series.sort(key=lambda s: (s.SeriesNumber if s.SeriesNumber is not None else 1 << 30, s.SeriesInstanceUID))
        return StudyInfo(
            StudyInstanceUID=uid, patient=_patient(study), StudyDate=_str(study, STUDY_DATE),
            StudyTime=_str(study, STUDY_TIME), AccessionNumber=_str(study, ACCESSION),
            AccessionNumberIssuer=_accession_issuer(study), StudyID=_str(study, STUDY_ID),
            StudyDescription=_str(study, STUDY_DESC), ReferringPhysicianName=_str(study, REFERRING),
            series=tuple(series), source_id=self.source_id)

    async def find_studies(self, patient_id: str, issuer: str | None = None) -> list[StudyInfo]:
        if not patient_id:
            return []
        out: list[StudyInfo] = []
        studies = await self._qido("studies", {"PatientID": patient_id}, _STUDY_FIELDS)
        for study in sorted(studies, key=lambda s: (_str(s, STUDY_DATE), _str(s, STUDY_UID))):
            if _str(study, PATIENT_ID) and _str(study, PATIENT_ID) != patient_id:
                continue
            study_issuer = _str(study, ISSUER)
            if issuer and study_issuer and study_issuer != issuer:
                continue
            if is_safe_uid(_str(study, STUDY_UID)):
                out.append(await self._tree(study))
        return out

    async def get_study(self, study_instance_uid: str) -> StudyInfo | None:
        if not is_safe_uid(study_instance_uid):
            return None
        studies = [s for s in await self._qido("studies", {"StudyInstanceUID": study_instance_uid}, _STUDY_FIELDS)
                   if _str(s, STUDY_UID) == study_instance_uid]
        return await self._tree(studies[0]) if studies else None

    # -- retrieve ----------------------------------------------------------------------------------
    async def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        groups: dict[tuple[str, str], dict[str, list[InstanceRef]]] = {}
        for ref in refs:
            groups.setdefault((ref.StudyInstanceUID, ref.SeriesInstanceUID), {}).setdefault(
                ref.SOPInstanceUID, []).append(ref)
        dead: str | None = None
        for (study, series), waiting in groups.items():
            if dead is not None:
                for ref in (r for rs in waiting.values() for r in rs):
                    yield RetrieveFailure(ref, dead)
                continue
            try:
                if not is_safe_uid(study) or not is_safe_uid(series):
                    raise PacsError(f"invalid study/series UID {study[:70]!r} / {series[:70]!r}")
                present = {_str(i, SOP_UID) for i in await self._qido(self._path(study, series) + "/instances", {})}
            except PacsError as exc:
                if isinstance(exc, _Unreachable):
                    dead = str(exc)
                for ref in (r for rs in waiting.values() for r in rs):
                    yield RetrieveFailure(ref, str(exc))
                continue
            for sop in [s for s in waiting if s not in present]:
                for ref in waiting.pop(sop):
                    yield RetrieveFailure(ref, f"not found on the DICOMweb server in study {study} / series {series}",
                                         missing=True)
            if not waiting:
                continue
            if len(waiting) >= 2 and 2 * len(waiting) >= len(present):
                requests = [(self._path(study, series), list(waiting))]
            else:
                requests = [(self._path(study, series, sop), [sop]) for sop in waiting]
            for path, sops in requests:
                if dead is not None:
                    reason = dead
                else:
                    try:
                        async with contextlib.aclosing(self._wado(path, waiting)) as stream:
                            async for item in stream:
                                yield item
                        reason = "not in the WADO-RS response"
                    except _Unreachable as exc:
                        dead = reason = str(exc)
                    except PacsError as exc:
                        reason = str(exc)
                for sop in sops:
                    for ref in waiting.pop(sop, []):
                        yield RetrieveFailure(ref, reason)

    async def _wado(self, path: str,
                    waiting: dict[str, list[InstanceRef]]) -> AsyncGenerator[RetrievedInstance, None]:
        """Stream one WADO-RS request, yielding the instances in ``waiting`` (removed from it as they come)."""
        try:
            async with self._client.stream("GET", path, headers={"Accept": WADO_ACCEPT}) as rsp:
                if rsp.status_code not in (200, 206):
                    body = (await rsp.aread())[:200].decode("utf-8", "replace")
                    if rsp.status_code == 404:
                        raise PacsError(f"WADO-RS {path}: not found (HTTP 404)")
                    if rsp.status_code == 406:
                        raise PacsError(f"WADO-RS {path}: the server cannot send it in its stored transfer syntax "
                                        f"(HTTP 406 {body})")
                    raise PacsError(f"WADO-RS {path} failed: HTTP {rsp.status_code} {body}")
                ctype = rsp.headers.get("content-type", "")
                m = re.search(r'boundary="?([^";]+)"?', ctype, re.IGNORECASE)
                if not ctype.lower().startswith("multipart/related") or m is None:
                    raise PacsError(f"WADO-RS {path}: expected multipart/related, got {ctype!r}")
                reader = MultipartReader(rsp.aiter_bytes(), m.group(1).strip())
                while (headers := await reader.next_part()) is not None:
                    item = await self._instance(reader, headers, waiting, path)
                    for inst in item:
                        yield inst
        except httpx.TransportError as exc:
            raise _Unreachable(f"DICOMweb server {self.url} unreachable or connection lost: {exc!s} "
                               f"({type(exc).__name__})") from exc

    async def _instance(self, reader: MultipartReader, headers: dict[str, str],
                        waiting: dict[str, list[InstanceRef]], path: str) -> list[RetrievedInstance]:
        head = bytearray()
        meta: dict[int, str] | None = None
        while meta is None:
            piece = await reader.read()
            if piece is not None:
                head += piece
            try:
                meta = parse_file_meta(head, final=piece is None)
            except ValueError as exc:
                raise PacsError(f"WADO-RS {path}: {exc}") from exc
            if piece is None and meta is None:
                raise PacsError(f"WADO-RS {path}: part ends inside its File Meta Information")
            if meta is None and len(head) > _MAX_FILE_META:
                raise PacsError(f"WADO-RS {path}: File Meta Information larger than {_MAX_FILE_META} bytes")
        sop = meta.get(0x0003, "")
        refs = waiting.pop(sop, None)
        if not refs:
            return []  # an instance of the series we did not ask for: skipped by the next next_part()
        size: int | None = None
        with_length = headers.get("content-length", "")
        if with_length.isdigit():
            size = int(with_length)
        index = reader.part_index
        first = bytes(head)
        del head
        ts, sop_class = meta.get(0x0010, ""), meta.get(0x0002, "")
        if len(refs) == 1:
            return [RetrievedInstance(ref=refs[0], TransferSyntaxUID=ts, SOPClassUID=sop_class,
                                      chunks=self._part_chunks(reader, index, first, path), size=size)]
        # the same instance asked twice: buffer it once (rare) so each ref gets its own iterator
        data = [first]
        while (piece := await reader.read()) is not None:
            data.append(piece)
        blob = b"".join(data)
        return [RetrievedInstance(ref=r, TransferSyntaxUID=ts, SOPClassUID=sop_class, chunks=_from_bytes(blob),
                                  size=len(blob)) for r in refs]

    async def _part_chunks(self, reader: MultipartReader, index: int, first: bytes, path: str) -> AsyncIterator[bytes]:
        yield first
        pending = bytearray()
        while True:
            if reader.part_index != index:
                raise PacsError("instance chunks read after the next item was taken from retrieve()")
            try:
                piece = await reader.read()
            except httpx.TransportError as exc:
                raise PacsError(f"WADO-RS {path}: connection lost in the middle of an instance ({exc})") from exc
            if piece is None:
                break
            pending += piece
            if len(pending) >= CHUNK_SIZE:
                yield bytes(pending)
                pending.clear()
        if pending:
            yield bytes(pending)

    # -- store -----------------------------------------------------------------------------------------
    async def store(self, files: Sequence[Path]) -> StoreResult:
        result = StoreResult()
        planned: list[tuple[Path, str, int]] = []
        for path in files:
            try:
                meta = await anyio.to_thread.run_sync(read_file_meta_info, path)
                planned.append((Path(path), str(meta.get("MediaStorageSOPInstanceUID", "")), Path(path).stat().st_size))
            except Exception as exc:  # noqa: BLE001 - unreadable file: report and go on
                result.failed[str(path)] = f"not a DICOM Part 10 file ({exc})"
        batch: list[tuple[Path, str, int]] = []
        size = 0
        for item in planned:
            if batch and (len(batch) >= _STOW_BATCH_FILES or size + item[2] > _STOW_BATCH_BYTES):
                await self._stow(batch, result)
                batch, size = [], 0
            batch.append(item)
            size += item[2]
        if batch:
            await self._stow(batch, result)
        return result

    async def _stow(self, batch: list[tuple[Path, str, int]], result: StoreResult) -> None:
        boundary = f"xig-stow-{secrets.token_hex(16)}"

        part_head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        tail = f"--{boundary}--\r\n".encode("ascii")
        # a known Content-Length (not every server accepts a chunked request body), bytes still streamed
        length = sum(len(part_head) + size + 2 for _p, _s, size in batch) + len(tail)

        async def body() -> AsyncIterator[bytes]:
            for path, _sop, size in batch:
                yield part_head
                sent = 0
                async with await anyio.open_file(path, "rb") as f:
                    while sent < size and (chunk := await f.read(min(CHUNK_SIZE, size - sent))):
                        sent += len(chunk)
                        yield chunk
                if sent != size:
                    raise PacsError(f"{path} changed size while being sent")
                yield b"\r\n"
            yield tail

        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json", "Content-Length": str(length)}
        try:
            rsp = await self._client.post("studies", content=body(), headers=headers)
        except httpx.TransportError as exc:
            raise PacsError(f"STOW-RS to {self.url} failed: {exc!s} ({type(exc).__name__})") from exc
        stored: set[str] = set()
        failed: dict[str, str] = {}
        try:
            answer = rsp.json() if rsp.content else {}
        except ValueError:
            answer = {}
        if isinstance(answer, list):
            answer = answer[0] if answer and isinstance(answer[0], dict) else {}
        if isinstance(answer, dict):
            for item in _values(answer, "00081199"):
                if isinstance(item, dict):
                    stored.add(_str(item, "00081155"))
            for item in _values(answer, "00081198"):
                if isinstance(item, dict):
                    failed[_str(item, "00081155")] = f"STOW-RS failure reason {_int(item, '00081197')}"
        for _path, sop, _size in batch:
            if sop in failed:
                result.failed[sop] = failed[sop]
            elif sop in stored or (rsp.status_code == 200 and not stored):
                result.stored.append(sop)
            else:
                result.failed[sop] = f"STOW-RS HTTP {rsp.status_code}: not acknowledged"

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()


async def _from_bytes(blob: bytes) -> AsyncIterator[bytes]:
    view = memoryview(blob)
    for start in range(0, len(blob), CHUNK_SIZE):
        yield bytes(view[start:start + CHUNK_SIZE])
