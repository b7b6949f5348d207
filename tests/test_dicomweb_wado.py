"""The DICOMweb backend's own WADO-RS HTTP/1.1 streaming against a scripted server: every framing, reuse,
failures, https, on both event loops; its connection's reads and bounded buffering; and the multipart
reader split at every offset."""
from __future__ import annotations

import asyncio
import json
import os
import ssl

import pytest

from gateway.dicom.synth import derive_uid, make_instance
from gateway.pacs.base import InstanceRef, PacsError, RetrievedInstance, RetrieveFailure
from gateway.pacs.dicomweb import DicomwebBackend, MultipartReader, _Connection
from gateway.security.certs import CertSet
from gateway.security.tls import client_context, server_context
from gateway.web import loop as event_loop

ST, SE = derive_uid("h7-study"), derive_uid("h7-series")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("inst")
    out = {}
    for i in range(5):
        inst = make_instance(d / f"{i}.dcm", study_uid=ST, series_uid=SE, sop_uid=derive_uid("h7-sop", i),
                             rows=128 + i, cols=128, instance_number=i + 1, seed=i)
        out[inst.SOPInstanceUID] = inst.path.read_bytes()
    return out


class Server:
    """Scripted DICOMweb server: QIDO series JSON + WADO multipart with a chosen framing."""

    def __init__(self, files: dict[str, bytes], framing: str, *, lf: bool = False, chunk: int = 7777,
                 count: int | None = None, keepalive: bool = True, interim: bool = False, http10: bool = False,
                 drop: set[str] = frozenset(), cut_after: int | None = None, close_idle: bool = False,
                 part_length: bool = False, stall_after: int | None = None) -> None:
        """``part_length``: each part carries a Content-Length header, as Orthanc's do; ``stall_after``: the
        multipart body stops after that many bytes, the connection stays open until :attr:`released` is set."""
        self.files, self.framing, self.lf, self.chunk = files, framing, lf, chunk
        self.part_length = part_length
        self.count = len(files) if count is None else count
        self.keepalive, self.interim, self.http10, self.drop = keepalive, interim, http10, drop
        self.cut_after, self.close_idle = cut_after, close_idle
        self.stall_after = stall_after
        self.released = asyncio.Event()
        self.connections = 0
        self.requests: list[str] = []

    def multipart(self, sops: list[str]) -> bytes:
        nl = b"\n" if self.lf else b"\r\n"
        out = b"preamble" + nl
        for sop in sops:
            length = b"Content-Length: %d" % len(self.files[sop]) + nl if self.part_length else b""
            out += b"--BOUND" + nl + b"Content-Type: application/dicom" + nl + length + nl + self.files[sop] + nl
        return out + b"--BOUND--" + nl + b"epilogue"

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                path = line.split(" ")[1]
                self.requests.append(path)
                status, ctype, body = 200, "", b""
                if path.endswith("/series") or "/series?" in path:
                    ctype = "application/dicom+json"
                    item = {"0020000E": {"vr": "UI", "Value": [SE]}}
                    if self.count >= 0:
                        item["00201209"] = {"vr": "IS", "Value": [self.count]}
                    body = json.dumps([item]).encode()
                elif "/instances?" in path:
                    ctype = "application/dicom+json"
                    body = json.dumps([{"00080018": {"vr": "UI", "Value": [s]}} for s in self.files]).encode()
                else:
                    parts = path.split("?")[0].split("/")
                    if "instances" in parts:
                        sop = parts[parts.index("instances") + 1]
                        sops = [sop] if sop in self.files and sop not in self.drop else []
                        if not sops:
                            status, body = 404, b"no such instance"
                    else:
                        sops = [s for s in self.files if s not in self.drop]
                    if status == 200:
                        ctype = 'multipart/related; type="application/dicom"; boundary=BOUND'
                        body = self.multipart(sops)
                ver = b"HTTP/1.0" if self.http10 else b"HTTP/1.1"
                if self.interim:
                    w.write(ver + b" 100 Continue\r\n\r\n")
                hdr = ver + b" %d X\r\n" % status + (f"Content-Type: {ctype}\r\n".encode() if ctype else b"")
                framing = self.framing if ctype.startswith("multipart") else "length"
                if self.cut_after is not None and ctype.startswith("multipart"):
                    body = body[:self.cut_after]
                    framing = "close"
                if self.stall_after is not None and ctype.startswith("multipart"):
                    w.write(hdr + b"\r\n" + body[:self.stall_after])
                    await w.drain()
                    await self.released.wait()  # silent, connection open
                    w.close()
                    return
                if framing == "length":
                    w.write(hdr + b"Content-Length: %d\r\n" % len(body)
                            + (b"" if self.keepalive else b"Connection: close\r\n") + b"\r\n" + body)
                elif framing == "chunked":
                    w.write(hdr + b"Transfer-Encoding: chunked\r\n\r\n")
                    for i in range(0, len(body), self.chunk):
                        piece = body[i:i + self.chunk]
                        w.write(b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n")
                        await w.drain()
                    w.write(b"0\r\nX-Trailer: 1\r\n\r\n")
                else:  # until close
                    w.write(hdr + b"\r\n")
                    for i in range(0, len(body), self.chunk):
                        w.write(body[i:i + self.chunk])
                        await w.drain()
                    await w.drain()
                    w.close()
                    return
                await w.drain()
                if not self.keepalive or self.http10 or self.close_idle:
                    w.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()


async def run(server: Server, refs: list[InstanceRef], ssl_ctx: ssl.SSLContext | None = None,
              scheme: str = "http") -> tuple[dict[str, bytes], dict[str, tuple[str, bool]]]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=ssl_ctx)
    port = srv.sockets[0].getsockname()[1]
    b = DicomwebBackend(f"{scheme}://localhost:{port}/dicom-web", source_id="1.2", timeout=5)
    got: dict[str, bytes] = {}
    failed: dict[str, tuple[str, bool]] = {}
    try:
        async for item in b.retrieve(refs):
            if isinstance(item, RetrievedInstance):
                got[item.ref.SOPInstanceUID] = b"".join([c async for c in item.chunks])
            else:
                failed[item.ref.SOPInstanceUID] = (item.reason, item.missing)
    finally:
        await b.aclose()
        srv.close()
    return got, failed


def refs(files: dict[str, bytes], n: int | None = None) -> list[InstanceRef]:
    return [InstanceRef(ST, SE, s) for s in list(files)[:n]]


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("lf", [False, True])
@pytest.mark.parametrize("chunk", [1, 13, 7777, 1 << 20])
@pytest.mark.parametrize("part_length", [False, True])
async def test_framings(files: dict[str, bytes], framing: str, lf: bool, chunk: int, part_length: bool) -> None:
    s = Server(files, framing, lf=lf, chunk=chunk, part_length=part_length)
    got, failed = await run(s, refs(files))
    assert failed == {} and got == files


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("chunk", [1, 7777, 1 << 20])
@pytest.mark.parametrize("part_length", [False, True])
def test_framings_on_uvloop(files: dict[str, bytes], framing: str, chunk: int, part_length: bool) -> None:
    """The gateway serves on uvloop: its transports drive the connection's buffered reads differently."""
    got, failed = event_loop.run(run(Server(files, framing, chunk=chunk, part_length=part_length), refs(files)),
                                 "uvloop")
    assert failed == {} and got == files


async def test_keepalive_reuse_per_instance(files: dict[str, bytes]) -> None:
    s = Server(files, "length", count=100)  # sparse: one request per instance
    got, failed = await run(s, refs(files, 3))
    assert failed == {} and set(got) == set(list(files)[:3])
    assert s.connections == 2, s.requests  # series QIDO through httpx; the WADO-RS GETs share one connection
    assert sum("/instances/" in p for p in s.requests) == 3


async def test_chunked_reuse_and_404(files: dict[str, bytes]) -> None:
    sops = list(files)
    s = Server(files, "chunked", count=100, drop={sops[1]})
    got, failed = await run(s, refs(files, 3))
    assert set(got) == {sops[0], sops[2]} and failed[sops[1]][1] is True and "not found" in failed[sops[1]][0]
    assert s.connections == 2  # httpx for the QIDO, one kept-alive connection for the three WADO-RS GETs


async def test_server_closes_idle_connection(files: dict[str, bytes]) -> None:
    s = Server(files, "length", count=100, close_idle=True)
    got, failed = await run(s, refs(files, 3))
    assert failed == {} and len(got) == 3


async def test_interim_and_http10(files: dict[str, bytes]) -> None:
    got, failed = await run(Server(files, "length", interim=True), refs(files))
    assert got == files and not failed
    got, failed = await run(Server(files, "close", http10=True), refs(files))
    assert got == files and not failed


async def test_missing_in_complete_series_response(files: dict[str, bytes]) -> None:
    sops = list(files)
    extra = InstanceRef(ST, SE, derive_uid("h7-nope"))
    got, failed = await run(Server(files, "chunked", drop={sops[4]}), [*refs(files), extra])
    assert set(got) == set(sops[:4])
    assert failed[sops[4]][1] is True and failed[extra.SOPInstanceUID][1] is True


async def test_no_series_count_falls_back_to_instance_query(files: dict[str, bytes]) -> None:
    s = Server(files, "length", count=-1)
    extra = InstanceRef(ST, SE, derive_uid("h7-nope2"))
    got, failed = await run(s, [*refs(files), extra])
    assert got == files and failed == {extra.SOPInstanceUID: (failed[extra.SOPInstanceUID][0], True)}
    assert any("/instances?" in p for p in s.requests)


async def test_unknown_series_missing(files: dict[str, bytes]) -> None:
    other = InstanceRef(ST, derive_uid("h7-other-series"), derive_uid("x"))
    got, failed = await run(Server(files, "length"), [other])
    assert got == {} and failed[other.SOPInstanceUID][1] is True


async def test_truncated_response(files: dict[str, bytes]) -> None:
    await _truncated_response(files)


def test_truncated_response_on_uvloop(files: dict[str, bytes]) -> None:
    event_loop.run(_truncated_response(files), "uvloop")


async def _truncated_response(files: dict[str, bytes]) -> None:
    one = len(files[next(iter(files))])
    s = Server(files, "close", cut_after=one + one // 2)
    got: dict[str, bytes] = {}
    errors = []
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    b = DicomwebBackend(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", source_id="1.2", timeout=5)
    results = []
    try:
        async for item in b.retrieve(refs(files)):
            results.append(item)
            if isinstance(item, RetrievedInstance):
                try:
                    got[item.ref.SOPInstanceUID] = b"".join([c async for c in item.chunks])
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
    finally:
        await b.aclose()
        srv.close()
    assert len(results) == len(files)
    first = next(iter(files))
    assert got.get(first) == files[first]
    assert len(errors) == 1 and "truncated" in str(errors[0])
    fails = [r for r in results if isinstance(r, RetrieveFailure)]
    assert len(fails) == 3 and not any(f.missing for f in fails)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_server_falling_silent_mid_instance_times_out(files: dict[str, bytes],
                                                        loop_kind: event_loop.EventLoopKind) -> None:
    """The PACS stops sending in the middle of the second instance and keeps the connection open: that instance
    breaks off with a timeout, the ones after it are reported failed, the one before was delivered whole
    (its bytes arrived with the second's first half, in a read still waiting for a whole 1 MiB)."""
    event_loop.run(_falling_silent(files), loop_kind)


async def _falling_silent(files: dict[str, bytes]) -> None:
    one = len(files[next(iter(files))])
    s = Server(files, "close", part_length=True, stall_after=one + one // 2)
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    b = DicomwebBackend(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", source_id="1.2", timeout=0.5)
    got: dict[str, bytes] = {}
    errors: list[Exception] = []
    fails: list[RetrieveFailure] = []
    try:
        async for item in b.retrieve(refs(files)):
            if isinstance(item, RetrievedInstance):
                try:
                    got[item.ref.SOPInstanceUID] = b"".join([c async for c in item.chunks])
                except PacsError as exc:
                    errors.append(exc)
            else:
                fails.append(item)
    finally:
        s.released.set()
        await b.aclose()
        srv.close()
    first = next(iter(files))
    assert got == {first: files[first]}
    assert len(errors) == 1 and "timed out" in str(errors[0])
    assert len(fails) == len(files) - 2 and not any(f.missing for f in fails)
    assert all("timed out" in f.reason for f in fails)


async def test_series_sizes_seen_recently_stand_in_for_a_series_query(files: dict[str, bytes]) -> None:
    """The series sizes choose series- or instance-level requests; a retrieve of the same study soon after reuses
    them — unless it wants a series they do not list (asked again: a new series is not reported missing), or
    they are older than ``series_sizes_ttl``."""
    s = Server(files, "length")
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    b = DicomwebBackend(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", source_id="1.2", timeout=5)
    other = InstanceRef(ST, derive_uid("h7-later-series"), derive_uid("h7-later"))

    async def retrieve(wanted: list[InstanceRef]) -> tuple[set[str], set[str]]:
        got, missing = set(), set()
        async for item in b.retrieve(wanted):
            if isinstance(item, RetrievedInstance):
                assert b"".join([c async for c in item.chunks]) == files[item.ref.SOPInstanceUID]
                got.add(item.ref.SOPInstanceUID)
            elif item.missing:
                missing.add(item.ref.SOPInstanceUID)
        return got, missing

    def series_queries() -> int:
        return sum(1 for p in s.requests if p.split("?")[0].endswith("/series"))

    try:
        assert await retrieve(refs(files)) == (set(files), set()) and series_queries() == 1
        assert await retrieve(refs(files, 3)) == (set(list(files)[:3]), set()) and series_queries() == 1
        assert await retrieve([other]) == (set(), {other.SOPInstanceUID}) and series_queries() == 2
        b.series_sizes_ttl = 0
        assert await retrieve(refs(files)) == (set(files), set()) and series_queries() == 3
        assert sum(1 for p in s.requests if p.endswith(f"/series/{SE}")) == 3  # whole-series requests all along
    finally:
        await b.aclose()
        srv.close()


async def test_unreachable(files: dict[str, bytes]) -> None:
    b = DicomwebBackend("http://127.0.0.1:9", source_id="1.2", timeout=2)
    out = [i async for i in b.retrieve(refs(files))]
    await b.aclose()
    assert all(isinstance(i, RetrieveFailure) and not i.missing for i in out) and len(out) == len(files)


async def test_https(files: dict[str, bytes], pki: CertSet) -> None:
    await _https(files, pki)


def test_https_on_uvloop(files: dict[str, bytes], pki: CertSet) -> None:
    event_loop.run(_https(files, pki), "uvloop")


async def _https(files: dict[str, bytes], c: CertSet) -> None:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(c.gateway_cert, c.gateway_key)
    cctx = ssl.create_default_context(cafile=str(c.ca_cert))
    s = Server(files, "chunked")
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0, ssl=sctx)
    b = DicomwebBackend(f"https://localhost:{srv.sockets[0].getsockname()[1]}/dicom-web", source_id="1.2",
                        timeout=5, ssl_context=cctx)
    try:
        got = {}
        async for item in b.retrieve(refs(files)):
            assert isinstance(item, RetrievedInstance)
            got[item.ref.SOPInstanceUID] = b"".join([c async for c in item.chunks])
    finally:
        await b.aclose()
        srv.close()
    assert got == files
    # without the CA: the server is not trusted, every instance fails (not "missing")
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0, ssl=sctx)
    b = DicomwebBackend(f"https://localhost:{srv.sockets[0].getsockname()[1]}/dicom-web", source_id="1.2", timeout=5)
    try:
        out = [i async for i in b.retrieve(refs(files))]
    finally:
        await b.aclose()
        srv.close()
    assert all(isinstance(i, RetrieveFailure) and not i.missing and "CERTIFICATE" in i.reason.upper() for i in out)


@pytest.mark.parametrize("part_length", [False, True])
@pytest.mark.parametrize("lf", [False, True])
async def test_multipart_reader_splits_everywhere(files: dict[str, bytes], part_length: bool, lf: bool) -> None:
    body = Server(files, "length", lf=lf, part_length=part_length).multipart(list(files))
    for step in (1, 2, 3, 47, 48, 49, 50, 1000):
        async def gen():  # type: ignore[no-untyped-def]
            for i in range(0, len(body), step):
                yield body[i:i + step]
        r = MultipartReader(gen(), "BOUND")
        out = []
        while (h := await r.next_part()) is not None:
            assert h["content-type"] == "application/dicom"
            assert h.get("content-length") == (str(len(files[list(files)[len(out)]])) if part_length else None)
            data = b""
            while (p := await r.read()) is not None:
                data += p
            out.append(data)
        assert out == list(files.values()) and r.complete


async def test_multipart_reader_passes_whole_chunks_of_a_counted_part_on() -> None:
    """A part with a Content-Length: input chunks inside its body are passed on as they are, even when they
    end with what looks like the start of a delimiter; a body that starts or ends inside a chunk is a view of
    it — never a copy."""
    chunks = [b"--BOUND\r\nContent-Length: 20\r\n\r\nwx", b"abcd\r\n--BO", b"UNDx", b"1234\r\n--BOUND--"]

    async def gen():  # type: ignore[no-untyped-def]
        for c in chunks:
            yield c
    r = MultipartReader(gen(), "BOUND")
    assert await r.next_part() == {"content-length": "20"}
    pieces = []
    while (p := await r.read()) is not None:
        pieces.append(p)
    assert pieces == [b"wx", b"abcd\r\n--BO", b"UNDx", b"1234"]
    assert pieces[1] is chunks[1] and pieces[2] is chunks[2]
    assert isinstance(pieces[0], memoryview)  # of what was read with the headers
    assert isinstance(pieces[3], memoryview) and pieces[3].obj is chunks[3]
    assert await r.next_part() is None and r.complete


@pytest.mark.parametrize("length", [5, 7, 50])
async def test_multipart_reader_refuses_a_part_longer_or_shorter_than_its_content_length(length: int) -> None:
    body = b"--BOUND\r\nContent-Length: %d\r\n\r\nsixxxx\r\n--BOUND\r\n\r\nnext\r\n--BOUND--" % length

    async def gen():  # type: ignore[no-untyped-def]
        yield body
    r = MultipartReader(gen(), "BOUND")
    assert await r.next_part() is not None
    with pytest.raises(PacsError) as info:
        while await r.read() is not None:
            pass
    assert "part 1 does not end where its Content-Length says" in str(info.value) or "truncated" in str(info.value)
    assert length != 50 or "truncated" in str(info.value)  # past the end of the message


@pytest.mark.parametrize("part_length", [False, True])
async def test_multipart_reader_cr_in_data(part_length: bool) -> None:
    data = [b"\r\r\n\n-BOUNDARY-ish\r", b"x\r\n", b"\r\n--BOUN", b"\n", b"\r", b""]
    body = b"".join(b"--BOUND\r\n" + (b"Content-Length: %d\r\n" % len(d) if part_length else b"") + b"\r\n" + d
                    + b"\r\n" for d in data) + b"--BOUND--"
    for step in (1, 2, 5, 100):
        async def gen():  # type: ignore[no-untyped-def]
            for i in range(0, len(body), step):
                yield body[i:i + step]
        r = MultipartReader(gen(), "BOUND")
        out = []
        while await r.next_part() is not None:
            d = b""
            while (p := await r.read()) is not None:
                d += p
            out.append(d)
        assert out == data, step


# -- the connection itself: reads of any size, bounded buffering, plain and TLS, both loops ----------

def _tls_pair(c: CertSet) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (server_context(c.gateway_cert, c.gateway_key, c.ca_cert),
            client_context(c.partner_cert, c.partner_key, c.ca_cert))


async def _connection_to(payload: bytes, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None
                         ) -> tuple[_Connection, asyncio.Server, asyncio.Event]:
    """A server that writes ``payload`` at once and closes; the client connection; set when the
    server's write was drained (it can only be when the client read enough)."""
    drained = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(payload)
        await w.drain()
        drained.set()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls[0] if tls else None)
    transport, conn = await asyncio.get_running_loop().create_connection(
        _Connection, "127.0.0.1", srv.sockets[0].getsockname()[1], ssl=tls[1] if tls else None,
        server_hostname="localhost" if tls else None)
    conn.transport = transport
    return conn, srv, drained


async def _reads_everything_with_bounded_buffering(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> None:
    body = os.urandom(5 * (1 << 20) + 17)
    conn, srv, drained = await _connection_to(b"HTTP/1.1 200 OK\r\n" + body, tls)
    try:
        assert await conn.readline() == b"HTTP/1.1 200 OK\r\n"
        pieces = [await conn.read_up_to(1)]  # a one-byte read, then whole 1 MiB pieces
        while piece := await conn.read_up_to(1 << 20):
            pieces.append(piece)
            # what arrives between reads lands in the fixed spare buffer, which never grows
            assert len(conn._spare) == _Connection._SPARE
        assert b"".join(pieces) == body
        assert [len(p) for p in pieces[1:]] == [1 << 20] * 5 + [16], "pieces are whole but the last"
        assert conn.at_eof() and await conn.read_up_to(10) == b""
        await drained.wait()
    finally:
        conn.close()
        srv.close()


async def _endless_line_is_refused(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> None:
    conn, srv, _ = await _connection_to(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (8 << 20), tls)
    try:
        assert await conn.readline() == b"HTTP/1.1 200 OK\r\n"
        with pytest.raises(asyncio.LimitOverrunError):
            await conn.readline()
        assert len(conn._spare) == _Connection._SPARE  # at most 256 KiB held, not the 8 MiB line
    finally:
        conn.close()
        srv.close()


async def _reuses_only_buffers_nothing_refers_to(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> None:
    body = os.urandom(12 * (1 << 20) + 5)
    conn, srv, drained = await _connection_to(b"HTTP/1.1 200 OK\r\n" + body, tls)
    try:
        assert await conn.readline() == b"HTTP/1.1 200 OK\r\n"
        kept_view = kept_whole = None
        at = 0
        while piece := await conn.read_up_to(1 << 20):
            assert piece == body[at:at + len(piece)]
            if at == 0:  # held on to, as a view and as the buffer itself: neither may change later
                kept_view, kept_whole = memoryview(piece)[100:200], piece
            elif len(piece) == 1 << 20:  # received directly, and into a pooled buffer
                assert isinstance(piece, bytearray) and any(piece is b for b in conn._pool), at
            at += len(piece)
            del piece  # dropped by its consumer: its buffer may be reused
        assert at == len(body) and conn.at_eof()
        assert kept_view == body[100:200] and kept_whole == body[:1 << 20]
        assert len(conn._pool) <= 4
        await drained.wait()
    finally:
        conn.close()
        srv.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("use_tls", [False, True])
def test_connection_reuses_only_buffers_nothing_refers_to(loop_kind: event_loop.EventLoopKind, use_tls: bool,
                                                          pki: CertSet) -> None:
    """Pieces are handed on without a copy, in buffers the connection reuses — but only once nothing refers to
    them: pieces kept (whole, or as a view) keep their bytes while 11 more MiB are read."""
    event_loop.run(_reuses_only_buffers_nothing_refers_to(_tls_pair(pki) if use_tls else None), loop_kind)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("use_tls", [False, True])
def test_connection_reads_everything_with_bounded_buffering(loop_kind: event_loop.EventLoopKind, use_tls: bool,
                                                            pki: CertSet) -> None:
    event_loop.run(_reads_everything_with_bounded_buffering(_tls_pair(pki) if use_tls else None), loop_kind)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("use_tls", [False, True])
def test_connection_refuses_an_endless_line_without_buffering_it(loop_kind: event_loop.EventLoopKind,
                                                                 use_tls: bool, pki: CertSet) -> None:
    event_loop.run(_endless_line_is_refused(_tls_pair(pki) if use_tls else None), loop_kind)
