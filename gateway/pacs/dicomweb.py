"""DICOMweb adapter: QIDO-RS queries and STOW-RS (httpx), WADO-RS retrieve (streamed on asyncio) (PS3.18).

* ``find_patients`` — ``GET /studies?PatientName=FAMILY*&PatientBirthDate=from-to`` (the family name
  as given, upper case and capitalised), ``GET /studies?PatientID=...`` per requested ID, aggregated
  into distinct (PatientID, IssuerOfPatientID) patients.
* ``find_studies`` / ``get_study`` — ``GET /studies?PatientID=`` (or ``StudyInstanceUID=``), then
  ``/studies/{study}/series`` and ``/studies/{study}/series/{series}/instances`` for the tree. QIDO
  answers are paged with ``limit``/``offset`` so a server-side result cap cannot truncate a study.
* ``retrieve`` — per study, one series-level QIDO (``/studies/{study}/series`` with
  NumberOfSeriesRelatedInstances: cheap, where an instance-level query of a large series is not —
  Orthanc needs ~0.3 s for 400 instances); then per series WADO-RS with ``Accept:
  multipart/related; type="application/dicom"; transfer-syntax=*`` (the stored syntax, no
  transcoding): one whole-series request when at least half of the series is wanted (instances not
  asked for are skipped), else one request per instance. An instance the server answers 404 for, or
  leaves out of a complete whole-series response, or of a series it does not list, is *missing*.
  Only a server that does not give series sizes is asked for the series' instances first.
  The multipart response is parsed incrementally; each part becomes a :class:`RetrievedInstance` as
  soon as its File Meta is read (transfer syntax, SOP class and instance come from there) and its
  ``chunks`` are the network reads themselves (up to 1 MiB, passed on without joining) — memory
  stays at about one network chunk, not even one instance. Read an instance's chunks before asking
  for the next item; unread parts are skipped. WADO-RS runs on its own small asyncio protocol
  (HTTP/1.1, Content-Length / chunked / until-close framing, one kept-alive connection per retrieve,
  the transport receiving straight into the buffer a read returns) rather than httpx, whose 64 KiB
  reads through h11/httpcore/anyio cost the gateway about a third of its CPU, or asyncio streams,
  which copy every byte four times.
* ``store`` — STOW-RS ``POST /studies``, the files streamed as a ``multipart/related`` body.
* ``ping`` — ``GET /studies?limit=1``.

The server is reached directly (proxy environment variables are ignored); ``https`` servers are
verified against the default trust store (certifi, as httpx does). Transport errors and unexpected
HTTP statuses are :class:`PacsError` for queries; in ``retrieve`` they become
:class:`RetrieveFailure` for the instances concerned (and for every remaining one once the server is
unreachable). Only a connection lost in the middle of an instance's bytes surfaces as
:class:`PacsError` from that instance's ``chunks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import secrets
import ssl
import struct
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import anyio
import httpx
from pydicom.filereader import read_file_meta_info

import gateway
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
_MAX_RESPONSE_HEAD = 64 * 1024
_STOW_BATCH_FILES = 100
_STOW_BATCH_BYTES = 256 * 1024 * 1024

# DICOM JSON tags (PS3.18 F.2)
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
PATIENT_NAME, PATIENT_ID, ISSUER, BIRTH, SEX = "00100010", "00100020", "00100021", "00100030", "00100040"
STUDY_DATE, STUDY_TIME, ACCESSION, ACCESSION_ISSUER = "00080020", "00080030", "00080050", "00080051"
STUDY_ID, STUDY_DESC, REFERRING = "00200010", "00081030", "00080090"
MODALITY, SERIES_NUMBER, SERIES_DESC, BODY_PART = "00080060", "00200011", "0008103E", "00180015"
INSTANCE_NUMBER, RETRIEVE_AET, SERIES_COUNT = "00200013", "00080054", "00201209"
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


def parse_file_meta(head: bytes | bytearray | memoryview, *, final: bool = False) -> dict[int, str] | None:
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


def _piece(buf: bytes | bytearray, start: int, end: int) -> bytes | memoryview:
    """``buf[start:end]`` without a copy: ``buf`` itself when that is all of a ``bytes``, else a view."""
    if start == 0 and end == len(buf) and type(buf) is bytes:
        return buf
    return memoryview(buf)[start:end]


class MultipartReader:
    """Incremental ``multipart/related`` reader over an async byte stream.

    ``await next_part()`` returns the next part's headers (lower-case names) or ``None`` after the
    closing delimiter (then :attr:`complete` is true); ``await read()`` returns the next piece of the
    current part's body, ``None`` at its end. Moving to the next part skips what is left of the current
    one. CRLF and bare-LF framing and transport padding after delimiters are accepted.

    Body pieces are the input chunks themselves (``bytes``) or views of them (``memoryview``; never a
    copy); only the few bytes at the end of a chunk that could begin a delimiter are held back, and joined
    to the next chunk. Memory: one input chunk plus the delimiter length.

    A part with a ``Content-Length`` header (Orthanc sends one, PS3.18 allows it) is read by its length:
    no search through its body, no bytes held back, whole input chunks passed on as they are; the
    delimiter must then follow exactly, else the part is refused (:class:`PacsError`) — a server whose
    length and framing disagree is not trusted with either.
    """

    _PREAMBLE, _AFTER_DELIM, _BODY, _DONE = range(4)
    _HEADER_END = re.compile(rb"\r?\n\r?\n")

    def __init__(self, chunks: AsyncIterator[bytes | bytearray], boundary: str) -> None:
        if not boundary:
            raise PacsError("multipart response without boundary")
        self._chunks = chunks
        self._delim = b"\n--" + boundary.encode("latin-1")
        self._buf: bytes | bytearray = b"\n"  # a virtual line end lets "--boundary" at the very start match
        self._pos = 0  # what is before it in _buf was consumed
        self._state = self._PREAMBLE
        self._eof = False
        self.part_index = -1
        self._length: int | None = None  # body bytes still to come, for a part with a Content-Length
        self._crlf = True
        #: the closing delimiter was read: the server sent the whole message
        self.complete = False

    async def _fill(self) -> bool:
        """Append the next input chunk to what is left; ``False`` at the end of the input."""
        while not self._eof:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._eof = True
                break
            if chunk:
                rest = self._buf[self._pos:]
                self._buf = rest + chunk if rest else chunk
                self._pos = 0
                return True
        return False

    def _left(self) -> int:
        return len(self._buf) - self._pos

    async def next_part(self) -> dict[str, str] | None:
        while self._state == self._BODY:
            await self.read()
        if self._state == self._DONE:
            return None
        delim = self._delim
        if self._state == self._PREAMBLE:
            while (idx := self._buf.find(delim, self._pos)) < 0:
                self._pos = max(self._pos, len(self._buf) - len(delim))  # keep what could start a delimiter
                if not await self._fill():
                    raise PacsError("multipart response without any part")
            self._pos = idx + len(delim)
            self._state = self._AFTER_DELIM
        # after a delimiter: "--" closes the message, else transport padding up to the line end
        while self._left() < 2 and await self._fill():
            pass
        if self._buf.startswith(b"--", self._pos) or (self._eof and not self._buf[self._pos:].strip()):
            self.complete = self._buf.startswith(b"--", self._pos)
            self._state = self._DONE
            self._buf, self._pos = b"", 0
            return None
        while (nl := self._buf.find(b"\n", self._pos)) < 0:
            if self._left() > _MAX_PART_HEADER or not await self._fill():
                raise PacsError("malformed multipart delimiter line")
        self._pos = nl + 1
        while True:
            if self._buf.startswith(b"\n", self._pos) or self._buf.startswith(b"\r\n", self._pos):
                raw: bytes | bytearray = b""  # a part without headers
                crlf = self._buf[self._pos] != 0x0A
                self._pos += 2 if crlf else 1
                break
            if (m := self._HEADER_END.search(self._buf, self._pos)) is not None:
                raw = self._buf[self._pos:m.start()]
                crlf = m.group().endswith(b"\r\n")
                self._pos = m.end()
                break
            if self._left() > _MAX_PART_HEADER or not await self._fill():
                raise PacsError("truncated or oversized multipart part headers")
        headers: dict[str, str] = {}
        for line in raw.decode("latin-1").splitlines():
            name, sep, value = line.partition(":")
            if sep:
                headers.setdefault(name.strip().lower(), value.strip())
        length = headers.get("content-length", "")
        self._length = int(length) if length.isdigit() and len(length) < 19 else None
        self._crlf = crlf  # the line ends this part uses: the one before its closing delimiter too
        self._state = self._BODY
        self.part_index += 1
        return headers

    async def read(self) -> bytes | memoryview | None:
        if self._state != self._BODY:
            return None
        if self._length is not None:
            return await self._read_counted(self._length)
        delim = self._delim
        while True:
            buf, pos = self._buf, self._pos
            idx = buf.find(delim, pos)
            if idx >= 0:
                end = idx - 1 if idx > pos and buf[idx - 1] == 0x0D else idx
                self._pos = idx + len(delim)
                self._state = self._AFTER_DELIM
                return _piece(buf, pos, end)
            # no delimiter: everything but a tail that could be the start of one (its LF, and a CR before)
            n = len(buf)
            cut = buf.find(b"\n", max(pos, n - len(delim) + 1))
            if cut < 0:
                cut = n
            if cut > pos and buf[cut - 1] == 0x0D:
                cut -= 1
            if cut > pos:
                self._pos = cut
                return _piece(buf, pos, cut)
            if not await self._fill():
                raise PacsError("multipart response truncated in the middle of a part")

    async def _read_counted(self, remaining: int) -> bytes | memoryview | None:
        """The next piece of a body read by its Content-Length; at its end, check the delimiter and return None.

        A piece is the reader's buffer itself (an input chunk, or one joined to the few bytes before it at a
        part boundary) or a ``memoryview`` of part of it — never a copy of its own (the pieces go on to the
        partner's TLS stream, which takes any buffer)."""
        if remaining:
            while self._left() == 0:
                if not await self._fill():
                    raise PacsError("multipart response truncated in the middle of a part")
            buf, pos = self._buf, self._pos
            end = min(len(buf), pos + remaining)
            self._pos, self._length = end, remaining - (end - pos)
            return _piece(buf, pos, end)
        delim = b"\r" + self._delim if self._crlf else self._delim
        while self._left() < len(delim) and await self._fill():
            pass
        pos = self._pos
        if not self._buf.startswith(delim, pos):
            raise PacsError(f"multipart part {self.part_index + 1} does not end where its Content-Length says (no "
                            "delimiter there): the server's framing cannot be trusted")
        self._pos, self._length = pos + len(delim), None
        self._state = self._AFTER_DELIM
        return None


# -------------------------------------------------------------------------------------------------
# WADO-RS transport: streamed HTTP/1.1 GETs on a small asyncio protocol
# -------------------------------------------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) +(\d{3})")
_NOT_FORWARDED = {"host", "accept", "accept-encoding", "connection", "content-length", "transfer-encoding", "te"}


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or any(c in value for c in "\r\n"):
            raise ValueError(f"invalid HTTP header {name!r}")
    return dict(headers)


class _HttpResponse:
    """One streamed HTTP/1.1 response: status, headers, then the body piece by piece.

    The body framing is ``Transfer-Encoding: chunked``, ``Content-Length`` or "until the connection
    closes" (what Orthanc sends for WADO-RS). A response read to its end hands its connection back
    to the session when the server allows keep-alive; :meth:`close` drops it otherwise.
    """

    def __init__(self, session: _WadoSession, conn: _Connection,
                 minor: int, status: int, headers: dict[str, str]) -> None:
        self._session = session
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self._left = 0
        self._in_chunk = False
        self._done = False
        self._lost: str | None = None  # why the connection was lost mid-body
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in headers:
            length = headers["content-length"].strip()
            if not length.isdigit():
                raise PacsError(f"DICOMweb server {session.url}: invalid Content-Length {length[:40]!r}")
            self._framing, self._left = "length", int(length)
        else:
            self._framing = "close"
        self._reusable = (minor == 1 and self._framing != "close"
                          and "close" not in headers.get("connection", "").lower())

    async def read(self) -> bytes | bytearray:
        """The next piece of the body (at most :data:`CHUNK_SIZE` bytes); ``b""`` at its end."""
        if self._done:
            return b""
        if self._conn is None:
            if self._lost is not None:  # what ended it, again (not "closed") for the instances after
                raise _Unreachable(self._lost)
            raise PacsError("read from a closed WADO-RS response")
        try:  # a silent server: the connection's own watchdog raises TimeoutError (no timer per read)
            data = await self._read(self._conn)
        except (OSError, EOFError, asyncio.LimitOverrunError) as exc:  # TimeoutError and ssl errors included
            self.close()
            self._lost = (f"DICOMweb server {self._session.url}: connection lost or timed out while reading a "
                          f"response ({_why(exc)})")
            raise _Unreachable(self._lost) from exc
        if not data:
            self._done = True
            conn, self._conn = self._conn, None
            self._session.release(conn, self._reusable)
        return data

    async def _read(self, r: _Connection) -> bytes | bytearray:
        if self._framing == "close":
            return await r.read_up_to(CHUNK_SIZE)
        if self._framing == "length":
            if self._left == 0:
                return b""
            data = await r.read_up_to(min(self._left, CHUNK_SIZE))
            if not data:
                raise EOFError(f"connection closed {self._left} bytes before the end of the body")
            self._left -= len(data)
            return data
        if self._left == 0:  # chunked: the next chunk's size line (after the CRLF that ends the previous chunk)
            if self._in_chunk and (await r.readline()).strip():
                raise PacsError(f"DICOMweb server {self._session.url}: malformed chunked response body")
            line = await r.readline()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise PacsError(f"DICOMweb server {self._session.url}: malformed chunk size {line[:40]!r}") from None
            if size == 0:
                for _ in range(100):  # trailer fields, then the empty line
                    if not (await r.readline()).strip():
                        return b""
                raise PacsError(f"DICOMweb server {self._session.url}: too many trailer fields")
            self._left, self._in_chunk = size, True
        data = await r.read_up_to(min(self._left, CHUNK_SIZE))
        if not data:
            raise EOFError("connection closed in the middle of a chunk")
        self._left -= len(data)
        return data

    def __aiter__(self) -> _HttpResponse:
        return self

    async def __anext__(self) -> bytes | bytearray:
        if data := await self.read():
            return data
        raise StopAsyncIteration

    async def text(self, limit: int) -> str:
        """Up to ``limit`` bytes of the body as text (error messages); the rest is not read."""
        out = b""
        with contextlib.suppress(PacsError):
            while len(out) < limit and (data := await self.read()):
                out += data[:limit - len(out)]
        return out.decode("utf-8", "replace")

    async def discard(self, limit: int) -> None:
        """Read what is left of the body when it is small (so the connection can be reused)."""
        seen = 0
        while seen <= limit and (data := await self.read()):
            seen += len(data)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


#: a read that has part of what it waits for returns it after the server has been silent this long (seconds)
_IDLE_FLUSH = 0.05
#: receive buffers one WADO-RS connection keeps for reuse (each ``CHUNK_SIZE`` at most)
_POOLED_BUFFERS = 4
_probe = [bytearray()]
#: ``sys.getrefcount`` of a pooled buffer that only its pool refers to (measured, not assumed)
_UNSHARED = sys.getrefcount(_probe[0])
del _probe


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection to the DICOMweb server, read without a copy in Python.

    An ``asyncio.StreamReader`` copies each byte four times on its way to a 1 MiB ``readexactly``: the
    loop's read into a new ``bytes``, that appended to the reader's ``bytearray`` (which grows and
    shrinks by ``realloc``), a slice of it, and ``bytes`` of the slice — about an eighth of the gateway's
    CPU on a RAD-75 (``perf`` on ``xig serve``). Here a waiting :meth:`read_up_to` has the transport
    receive straight into a buffer that it then hands on as it is: one of a few kept per connection
    that nothing refers to any more — checked by reference count, so no piece handed on earlier can
    change under its holder — or a new one when all are still held (a spool, a slow consumer).
    What arrives while no read waits (the HTTP head, chunk-size lines, the start of the next piece)
    lands in a fixed spare buffer; reading pauses when half of it is unread.
    """

    _SPARE = 256 * 1024

    def __init__(self, timeout: float = 60.0) -> None:
        self.transport: asyncio.Transport | None = None
        #: seconds a read may wait without a byte arriving (then TimeoutError), see :meth:`_watch`
        self.timeout = timeout
        self._activity = 0.0  # loop time of the last bytes received or of the start of the last wait
        self._watchdog: asyncio.TimerHandle | None = None
        self._spare = bytearray(self._SPARE)
        self._s0 = self._s1 = 0  # the unread bytes are _spare[_s0:_s1]
        self._pool: list[bytearray] = []  # receive buffers for reuse, see _receive_buffer
        self._target: memoryview | None = None  # the waiting read's part of it, filled by the transport
        self._got = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._paused = False

    # -- the transport's side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._target = None
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._target = None
        self._wake()
        return False  # the server sent everything: close

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._got:]
        if self._s0 == self._s1:
            self._s0 = self._s1 = 0
        elif self._s1 > self._SPARE // 2:  # move the unread bytes (less than half) to the front
            n = self._s1 - self._s0
            self._spare[:n] = self._spare[self._s0:self._s1]
            self._s0, self._s1 = 0, n
        if self._s1 == len(self._spare):  # full: only when a transport reads on while paused
            self._spare = self._spare + bytearray(self._SPARE)  # a new buffer: the old one may still be viewed
        return memoryview(self._spare)[self._s1:]

    def buffer_updated(self, nbytes: int) -> None:
        self._activity = self._loop.time()
        if self._target is not None:
            self._got += nbytes
            if self._got == len(self._target):
                self._target = None  # complete: anything more goes to the spare buffer
                self._wake()
            return
        self._s1 += nbytes
        if self._s1 - self._s0 >= self._SPARE // 2 and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the reader's side ----------------------------------------------------------------------

    async def _wait(self) -> None:
        if self._paused and self.transport is not None and self._s1 - self._s0 < self._SPARE // 2:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._activity = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._activity + _IDLE_FLUSH, self._watch)
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _watch(self) -> None:
        """While a read waits, every :data:`_IDLE_FLUSH` s: a read that has part of what it waits for returns
        that part once the server has been silent that long (a slow or stalled server's bytes are passed on,
        not held back — or lost when the connection then times out); a read silent for :attr:`timeout`
        fails with ``TimeoutError``. One timer per connection, not one per read."""
        self._watchdog = None
        if self._waiter is None or self._waiter.done():
            return  # nobody waits: the next wait re-arms it
        now = self._loop.time()
        silent = now - self._activity
        if self._target is not None and self._got and silent >= _IDLE_FLUSH:
            self._target = None  # read_up_to returns what it got
            self._wake()
        elif silent >= self.timeout:
            self._error = TimeoutError(f"no data for {self.timeout:g} s")
            self._target = None
            self._wake()
        else:
            self._watchdog = self._loop.call_at(max(self._activity, now) + _IDLE_FLUSH, self._watch)

    def _take(self, n: int) -> bytes:
        with memoryview(self._spare) as view:
            out = bytes(view[self._s0:self._s0 + n])
        self._s0 += n
        return out

    async def readline(self) -> bytes:
        """The next line, its LF included; :class:`EOFError` when the connection ends first,
        :class:`asyncio.LimitOverrunError` for a line longer than half the spare buffer."""
        while (i := self._spare.find(b"\n", self._s0, self._s1)) < 0:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise EOFError("connection closed in the middle of a line")
            if self._s1 - self._s0 >= self._SPARE // 2:
                raise asyncio.LimitOverrunError("line too long", self._s1 - self._s0)
            await self._wait()
        return self._take(i + 1 - self._s0)

    async def read_up_to(self, n: int) -> bytes | bytearray:
        """``n`` bytes, fewer where the connection ends (then what it left, maybe ``b""``) or the server falls
        silent with part of them sent (:meth:`_watch`).

        Waiting for whole pieces rather than taking what happened to arrive (~128 KiB) halves the
        pieces an instance is passed on in, and the per-piece work of every layer above. A piece that
        was received directly is a ``bytearray`` the caller owns from then on (this connection reuses it
        only once nothing refers to it); never modify it.
        """
        have = self._s1 - self._s0
        if have >= n:
            return self._take(n)
        if self._error is not None:
            raise self._error
        if self._eof:
            return self._take(have)
        buf = self._receive_buffer(n)
        with memoryview(buf) as target, memoryview(self._spare) as view:
            target[:have] = view[self._s0:self._s1]
        self._s0 = self._s1 = 0
        self._target, self._got = memoryview(buf), have
        try:
            while self._target is not None:
                await self._wait()
        finally:
            self._target = None
        if self._error is not None:
            raise self._error
        if self._got < n:  # the connection ended first, or the server fell silent (see _watch)
            try:
                del buf[self._got:]
            except BufferError:  # still viewed by the transport (it should not be): hand on a copy
                return bytes(memoryview(buf)[:self._got])
        return buf

    def _receive_buffer(self, n: int) -> bytearray:
        """An ``n``-byte buffer to receive into and hand on: a pooled one that only the pool refers to
        (no piece, view or variable anywhere can see it change), else a new one, pooled while there is room."""
        pool = self._pool
        for i in range(len(pool)):
            if sys.getrefcount(pool[i]) == _UNSHARED:
                buf = pool[i]
                if len(buf) > n:
                    del buf[n:]
                elif len(buf) < n:
                    buf.extend(bytes(n - len(buf)))
                return buf
        buf = bytearray(n)
        if len(pool) < _POOLED_BUFFERS:
            pool.append(buf)
        return buf

    def at_eof(self) -> bool:
        return self._eof and self._s0 == self._s1

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _WadoSession:
    """Streamed GETs to one DICOMweb server for one retrieve, keeping at most one connection alive.

    httpx reads 64 KiB at a time through several layers (h11, httpcore, anyio, a cancel scope per
    read) and cost the gateway about a third of its CPU on a RAD-75; this reads up to
    :data:`CHUNK_SIZE` per call from a :class:`_Connection`. Like the httpx client for QIDO-RS, it connects
    directly (no proxy) and verifies ``https`` servers against the default trust store.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._ssl_context = ssl_context
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"DICOMweb URL {url!r} is not an http(s) URL")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._base = parts.path.rstrip("/")
        extra = {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}
        if not any(k.lower() == "user-agent" for k in extra):
            extra["User-Agent"] = f"xig/{gateway.__version__}"
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        self._idle: _Connection | None = None

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.timeout):
                transport, conn = await asyncio.get_running_loop().create_connection(
                    lambda: _Connection(self.timeout), self._host, self._port,
                    ssl=(self._ssl_context or _default_ssl_context()) if self._tls else None,
                    server_hostname=self._host if self._tls else None)
                conn.transport = transport  # uvloop may call connection_made only after this returns
                return conn
        except OSError as exc:  # refused, unreachable, timed out, TLS failure
            raise _Unreachable(f"DICOMweb server {self.url} unreachable: {_why(exc)}") from exc

    async def get(self, path: str, accept: str) -> _HttpResponse:
        request = (f"GET {self._base}/{path} HTTP/1.1\r\nHost: {self._host_header}\r\nAccept: {accept}\r\n"
                   f"Accept-Encoding: identity\r\n{self._extra}\r\n"
                   ).encode("latin-1")
        while True:
            conn, self._idle = self._idle, None
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                async with asyncio.timeout(self.timeout):
                    conn.write(request)
                    minor, status, headers = await self._head(conn)
                return _HttpResponse(self, conn, minor, status, headers)
            except (OSError, EOFError, asyncio.LimitOverrunError) as exc:
                conn.close()
                if reused:  # the server closed the kept-alive connection meanwhile: once more on a new one
                    continue
                raise _Unreachable(f"DICOMweb server {self.url}: no valid answer ({_why(exc)})") from exc
            except BaseException:
                conn.close()
                raise

    async def _head(self, r: _Connection) -> tuple[int, int, dict[str, str]]:
        size = 0
        while True:
            line = await r.readline()
            if (m := _STATUS_LINE.match(line)) is None:
                raise PacsError(f"DICOMweb server {self.url}: not an HTTP/1.x response ({line[:40]!r})")
            headers: dict[str, str] = {}
            while (line := await r.readline()).strip():
                size += len(line)
                name, sep, value = line.decode("latin-1").partition(":")
                if not sep or size > _MAX_RESPONSE_HEAD:
                    raise PacsError(f"DICOMweb server {self.url}: malformed or oversized response headers")
                key, value = name.strip().lower(), value.strip()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            status = int(m.group(2))
            if not 100 <= status < 200:  # skip interim responses
                return int(m.group(1)), status, headers

    def release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and self._idle is None and not conn.at_eof():
            self._idle = conn
        else:
            conn.close()

    def close(self) -> None:
        conn, self._idle = self._idle, None
        if conn is not None:
            conn.close()


def _why(exc: BaseException) -> str:
    return f"{exc} ({type(exc).__name__})" if str(exc) else type(exc).__name__


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """What httpx verifies ``https`` servers with by default (certifi's CA bundle)."""
    return httpx.create_ssl_context()


# -------------------------------------------------------------------------------------------------
# The backend
# -------------------------------------------------------------------------------------------------

class _Unreachable(PacsError):
    """The server cannot be reached at all (every further request would fail too)."""


#: default of :attr:`DicomwebBackend.series_sizes_ttl`
SERIES_SIZES_TTL = 30.0
_SIZES_KEPT = 256  # studies whose series sizes a backend remembers


class DicomwebBackend:
    """A PACS reached over DICOMweb (QIDO-RS / WADO-RS / STOW-RS)."""

    def __init__(self, url: str, *, source_id: str, client: httpx.AsyncClient | None = None,
                 timeout: float = 30.0, headers: dict[str, str] | None = None, page_size: int = 1000,
                 name: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context`` verifies an ``https`` server (default: certifi's CA bundle, as httpx does)."""
        self.url = url.rstrip("/")
        self._ssl_context = ssl_context
        self.source_id = source_id
        self.page_size = page_size
        self.name = name or f"dicomweb:{self.url}"
        self.timeout = timeout
        self._headers = _check_headers(headers or {})
        self._own_client = client is None
        #: seconds a study's series sizes, as last seen, stand in for a new series query (see _series_counts)
        self.series_sizes_ttl = SERIES_SIZES_TTL
        self._sizes: dict[str, tuple[float, dict[str, int | None]]] = {}  # study → (when seen, series → size)
        self._client = client or httpx.AsyncClient(
            base_url=self.url + "/", timeout=httpx.Timeout(timeout), headers=self._headers,
            follow_redirects=False, trust_env=False, verify=ssl_context or True)

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
        self._remember_sizes(uid, {s.SeriesInstanceUID: len(s.instances) for s in series})
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
        groups: dict[str, dict[str, dict[str, list[InstanceRef]]]] = {}
        for ref in refs:
            groups.setdefault(ref.StudyInstanceUID, {}).setdefault(ref.SeriesInstanceUID, {}).setdefault(
                ref.SOPInstanceUID, []).append(ref)
        try:
            session = _WadoSession(self.url, self._headers, self.timeout, self._ssl_context)
        except ValueError as exc:
            for ref in refs:
                yield RetrieveFailure(ref, str(exc))
            return
        dead: str | None = None
        try:
            for study, by_series in groups.items():
                counts: dict[str, int | None] = {}
                if dead is None:
                    try:
                        counts = await self._series_counts(study, by_series)
                    except PacsError as exc:
                        if isinstance(exc, _Unreachable):
                            dead = str(exc)
                        for ref in (r for w in by_series.values() for rs in w.values() for r in rs):
                            yield RetrieveFailure(ref, str(exc))
                        continue
                for series, waiting in by_series.items():
                    where = f"study {study} / series {series}"
                    requests: list[tuple[str, list[str]]] = []
                    reason = dead
                    if dead is None:
                        try:
                            requests, absent = await self._requests(study, series, waiting, counts)
                        except PacsError as exc:
                            if isinstance(exc, _Unreachable):
                                dead = str(exc)
                            reason = str(exc)
                        else:
                            for sop in absent:
                                for ref in waiting.pop(sop):
                                    yield RetrieveFailure(ref, f"not found on the DICOMweb server in {where}",
                                                          missing=True)
                    for path, sops in requests:
                        if dead is not None:
                            reason = dead
                        else:
                            try:
                                async with contextlib.aclosing(self._wado(session, path, waiting, sops, where)) as s:
                                    async for item in s:
                                        yield item
                                reason = "the WADO-RS response ended before this instance"
                            except _Unreachable as exc:
                                dead = reason = str(exc)
                            except PacsError as exc:
                                reason = str(exc)
                        for sop in sops:
                            for ref in waiting.pop(sop, []):
                                yield RetrieveFailure(ref, reason or "not retrieved")
                    for ref in (r for rs in waiting.values() for r in rs):  # the series could not be asked for
                        yield RetrieveFailure(ref, reason or "not retrieved")
                    waiting.clear()
        finally:
            session.close()

    async def _series_counts(self, study: str, wanted: Iterable[str]) -> dict[str, int | None]:
        """The study's series on the server, with their instance counts when the server gives them.

        Sizes seen in the last :attr:`series_sizes_ttl` seconds (by a retrieve, or the study tree a manifest was
        built from) stand in for a new query when they cover every ``wanted`` series: they only choose between
        series- and instance-level requests, so a stale size costs a less efficient request, never an
        instance — and a series they do not know is asked for again, not reported missing.
        """
        seen = self._sizes.get(study)
        if seen is not None and time.monotonic() - seen[0] < self.series_sizes_ttl \
                and all(uid in seen[1] for uid in wanted):
            return seen[1]
        found = await self._qido(self._path(study) + "/series", {}, (SERIES_COUNT,))
        counts = {uid: _int(s, SERIES_COUNT) for s in found if (uid := _str(s, SERIES_UID))}
        self._remember_sizes(study, counts)
        return counts

    def _remember_sizes(self, study: str, counts: dict[str, int | None]) -> None:
        self._sizes.pop(study, None)
        self._sizes[study] = (time.monotonic(), counts)
        while len(self._sizes) > _SIZES_KEPT:  # the oldest first
            self._sizes.pop(next(iter(self._sizes)))

    async def _requests(self, study: str, series: str, waiting: dict[str, list[InstanceRef]],
                        counts: dict[str, int | None]) -> tuple[list[tuple[str, list[str]]], list[str]]:
        """The WADO-RS requests for the wanted instances of one series, and the instances known to be absent.

        One whole-series request when at least half of the series is wanted (instances not asked for
        are skipped), else one request per instance. The series size comes from the study's series
        query; only a server that does not give it is asked for the series' instances.
        """
        if not is_safe_uid(series):
            raise PacsError(f"invalid series UID {series[:70]!r}")
        if series not in counts:
            return [], list(waiting)
        count = counts[series]
        absent: list[str] = []
        if count is None:
            present = {_str(i, SOP_UID) for i in await self._qido(self._path(study, series) + "/instances", {})}
            absent = [sop for sop in waiting if sop not in present]
            count = len(present)
        wanted = [sop for sop in waiting if sop not in absent]
        if len(wanted) >= 2 and 2 * len(wanted) >= count:
            return [(self._path(study, series), wanted)], absent
        return [(self._path(study, series, sop), [sop]) for sop in wanted], absent

    async def _wado(self, session: _WadoSession, path: str, waiting: dict[str, list[InstanceRef]], sops: list[str],
                    where: str) -> AsyncGenerator[RetrievedInstance | RetrieveFailure, None]:
        """Stream one WADO-RS request, yielding the instances in ``waiting`` (removed from it as they come).

        Instances of ``sops`` the server answers 404 for, or leaves out of a complete response, are
        reported as missing; the caller reports what is left in ``waiting`` otherwise.
        """
        rsp = await session.get(path, WADO_ACCEPT)
        try:
            if rsp.status == 404:
                with contextlib.suppress(PacsError):
                    await rsp.discard(64 * 1024)  # a short body: the connection serves the next request
                for sop in sops:
                    for ref in waiting.pop(sop, []):
                        yield RetrieveFailure(ref, f"not found on the DICOMweb server in {where} (WADO-RS HTTP 404)",
                                              missing=True)
                return
            if rsp.status not in (200, 206):
                body = await rsp.text(200)
                if rsp.status == 406:
                    raise PacsError(f"WADO-RS {path}: the server cannot send it in its stored transfer syntax "
                                    f"(HTTP 406 {body})")
                raise PacsError(f"WADO-RS {path} failed: HTTP {rsp.status} {body}")
            ctype = rsp.headers.get("content-type", "")
            m = re.search(r'boundary="?([^";]+)"?', ctype, re.IGNORECASE)
            if not ctype.lower().startswith("multipart/related") or m is None:
                raise PacsError(f"WADO-RS {path}: expected multipart/related, got {ctype!r}")
            encoding = rsp.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("identity", ""):
                raise PacsError(f"WADO-RS {path}: unsupported Content-Encoding {encoding!r}")
            reader = MultipartReader(rsp, m.group(1).strip())
            while (headers := await reader.next_part()) is not None:
                for inst in await self._instance(reader, headers, waiting, path):
                    yield inst
            if reader.complete:
                await rsp.discard(64 * 1024)
                for sop in sops:
                    for ref in waiting.pop(sop, []):
                        yield RetrieveFailure(ref, f"not found on the DICOMweb server in {where}", missing=True)
        finally:
            rsp.close()

    async def _instance(self, reader: MultipartReader, headers: dict[str, str],
                        waiting: dict[str, list[InstanceRef]], path: str) -> list[RetrievedInstance]:
        pieces: list[bytes | memoryview] = []
        head: bytes | memoryview = b""
        meta: dict[int, str] | None = None
        while meta is None:
            piece = await reader.read()
            if piece is not None:
                pieces.append(piece)
                head = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            try:
                meta = parse_file_meta(head, final=piece is None)
            except ValueError as exc:
                raise PacsError(f"WADO-RS {path}: {exc}") from exc
            if piece is None and meta is None:
                raise PacsError(f"WADO-RS {path}: part ends inside its File Meta Information")
            if meta is None and len(head) > _MAX_FILE_META:
                raise PacsError(f"WADO-RS {path}: File Meta Information larger than {_MAX_FILE_META} bytes")
        del pieces
        sop = meta.get(0x0003, "")
        refs = waiting.pop(sop, None)
        if not refs:
            return []  # an instance of the series we did not ask for: skipped by the next next_part()
        size: int | None = None
        with_length = headers.get("content-length", "")
        if with_length.isdigit():
            size = int(with_length)
        index = reader.part_index
        ts, sop_class = meta.get(0x0010, ""), meta.get(0x0002, "")
        if len(refs) == 1:
            return [RetrievedInstance(ref=refs[0], TransferSyntaxUID=ts, SOPClassUID=sop_class,
                                      chunks=_part_chunks(reader, index, head, path), size=size)]
        # the same instance asked twice: buffer it once (rare) so each ref gets its own iterator
        data: list[bytes | memoryview] = [head]
        while (piece := await reader.read()) is not None:
            data.append(piece)
        blob = b"".join(data)
        return [RetrievedInstance(ref=r, TransferSyntaxUID=ts, SOPClassUID=sop_class, chunks=_from_bytes(blob),
                                  size=len(blob)) for r in refs]

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


async def _part_chunks(reader: MultipartReader, index: int, first: bytes | memoryview, path: str,
                       ) -> AsyncIterator[bytes | memoryview]:
    """One instance's bytes, as they come (no re-chunking: each piece is a network read or a slice of one)."""
    if first:
        yield first
    while True:
        if reader.part_index != index:
            raise PacsError("instance chunks read after the next item was taken from retrieve()")
        try:
            piece = await reader.read()
        except _Unreachable as exc:
            raise PacsError(f"WADO-RS {path}: connection lost in the middle of an instance ({exc})") from exc
        if piece is None:
            return
        if piece:
            yield piece
