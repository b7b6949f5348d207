"""Responding-gateway benchmarks: RAD-75 (XCA-I retrieve) from a real Orthanc, through XIG, over mTLS.

One Orthanc (``tests.orthanc.OrthancServer``, DICOMweb plugin, loopback) holds synthetic CT studies
(``gateway.dicom.synth.make_study``, 512×512×16-bit, series of 400 instances). Each XIG gateway runs as
its own process (``python -m gateway.cli serve``), so the partner (this process) and the gateway do not
share a GIL — as in a deployment, where they do not share a machine. On this 2-core machine Orthanc,
the gateway and the partner do share the CPUs, so every client here does as little as receiving can
cost in Python (:func:`receive`: one blocking socket, 1 MiB reads, the whole HTTP answer written to one
file) and everything else — HTTP framing, MTOM decoding with XIG's own codec, the RAD-75 status, the
Part 10 preamble of every part — is checked after the clock stops (:func:`read_answer`). The figures
measure the servers, not the client (an httpx + MTOM-decoding client used 0.5 CPU-s per 200 MB, twice
the gateway's, and was what limited the RAD-75 figure).

* Reference: Orthanc's own WADO-RS of the whole 400-instance study (~200 MB), ``Accept: multipart/related;
  type="application/dicom"; transfer-syntax=*``, plain HTTP — MB/s, best of 3 after one warm-up read.
* Ceiling: the same client receiving the same byte count over mutual TLS from a bare asyncio TLS server
  in its own process (the gateway's TLS context, event loop and write buffer, nothing else): what one
  Python TLS stream to this client can carry here, i.e. what a gateway with no work of its own would reach.
* Bound: the ceiling and the reference run on the same CPUs as the gateway, so both are upper limits only
  where CPUs are spare. :func:`machine_bound` adds up the CPU seconds (measured during each transfer) of
  Orthanc serving the study to a reader that drops it, of that reader, of the bare TLS sender and of its
  client, and divides by this machine's CPUs: what a gateway doing nothing but read and encrypt could
  reach here. The goal is reachable on this machine only when the bound is above it.
* RAD-75 of the same study through XIG (ITI-38 + ITI-39 once first, so the instances are authorised),
  DICOMweb and DIMSE (C-GET) backends × ``rad75_root_part`` "first" and "last" — MB/s, best of 3,
  as a ratio against the reference (the issue's goal: ≥ 0.6 with the DICOMweb backend); the log line
  also gives the gateway process's CPU seconds per retrieve (least disturbed run), a figure that depends
  far less on what else the machine is doing. One more row: DICOMweb / root last against the ceiling.
* Peak RSS of the gateway process (``VmHWM`` after a ``clear_refs`` reset, and psutil sampling) while it
  serves a RAD-75 of a 4000-instance (10 series, ~2 GB) study (DICOMweb backend, both root layouts),
  against the same process idle after start-up (goal: < 300 MB). Skipped with ``XIG_BENCH_LARGE=0``.

Studies are generated once and kept, already stored in Orthanc, under a cache directory
(``XIG_BENCH_CACHE``, default ``$TMPDIR/xig-bench-cache``; outside the repository, which has no ignore
rule for a 2+ GB cache). Every Orthanc and gateway process started here is stopped on the way out,
also on errors (and by :mod:`atexit` as a last resort). MB = 2**20 bytes. ``python -m bench.rad75``
runs these benchmarks alone.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import urlsplit

import h11
import psutil
from rich.console import Console

from bench.common import Result, gateway_toml, machine_busy_seconds, tree_cpu_seconds
from gateway.config import Config, load_config
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import derive_uid, make_study
from gateway.ihe import ebrim, iti38, iti39, rad75
from gateway.ihe.iti39 import DocumentRequest
from gateway.security.certs import CertSet, init_certs
from gateway.security.outbound import security_header
from gateway.security.tls import client_context, server_context
from gateway.soap import mtom
from gateway.web import loop as event_loop
from gateway.web.client import SoapClient, SoapReply, parse_reply
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE
from tests.orthanc import OrthancServer, free_port, orthanc_available, stop_process

MB = 1024 * 1024
RUNS = 3
EVRLE = "1.2.840.10008.1.2.1"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: a retrieve (or the gateway's spooling, root "first") must finish within this many seconds
CALL_TIMEOUT = 900.0
HCID, AA, REPO, SOURCE = "urn:oid:2.999.1", "2.999.1.1", "2.999.1.2", "2.999.1.3"
CACHE = Path(os.environ.get("XIG_BENCH_CACHE") or Path(tempfile.gettempdir()) / "xig-bench-cache")
#: bump when the way studies are made or stored changes (invalidates the cached Orthanc storage)
CACHE_VERSION = 2

log = Console(stderr=True, highlight=False, soft_wrap=True)


def _say(msg: str) -> None:
    log.print(f"[dim]\\[rad75 {time.strftime('%H:%M:%S')}][/] {msg}")


# -------------------------------------------------------------------------------------------------
# Studies, stored once in a cached Orthanc
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudySpec:
    series: int
    per_series: int
    rows: int = 512
    cols: int = 512
    bits: int = 16

    @property
    def instances(self) -> int:
        return self.series * self.per_series

    @property
    def mb(self) -> float:
        """Pixel data size in MB (the Part 10 files are ~0.3 % larger)."""
        return self.instances * self.rows * self.cols * self.bits / 8 / MB

    @property
    def key(self) -> str:
        return f"ct{self.series}x{self.per_series}-{self.rows}x{self.cols}x{self.bits}-v{CACHE_VERSION}"

    @property
    def patient_id(self) -> str:
        return f"XIGBENCH-{self.key}"

    @property
    def study_uid(self) -> str:
        return derive_uid("xig-bench", self.key)


SMALL = StudySpec(1, 400)     # one CT series of 400 instances ≈ 200 MB
LARGE = StudySpec(10, 400)    # ten such series, 4000 instances ≈ 2 GB


def _study_instances(orthanc: OrthancServer, study_uid: str) -> int:
    hits = orthanc.client.post("/tools/lookup", content=study_uid)
    hits.raise_for_status()
    for hit in hits.json():
        if hit.get("Type") == "Study":
            return int(orthanc.get_json(f"/studies/{hit['ID']}/statistics")["CountInstances"])
    return 0


def ensure_study(orthanc: OrthancServer, spec: StudySpec) -> None:
    """Generate and upload ``spec`` unless Orthanc already holds all of it (an earlier run's cache)."""
    have = _study_instances(orthanc, spec.study_uid)
    if have == spec.instances:
        _say(f"study {spec.key}: {have} instances already in the cached Orthanc")
        return
    _say(f"study {spec.key}: generating and uploading {spec.instances} instances (once; cached afterwards)…")
    t0 = time.perf_counter()
    src = Path(tempfile.mkdtemp(prefix=f"gen-{spec.key}-", dir=orthanc.workdir.parent))
    try:
        # one series at a time (own seed, so own UIDs): generate, upload, delete — never 2 GB of source on disk
        for n in range(spec.series):
            study = make_study(src / str(n), patient_id=spec.patient_id, patient_name="Bench^Ben",
                               birth_date="19600101", sex="M", accession="XIGBENCH",
                               study_uid=spec.study_uid, study_description="XIG benchmark CT",
                               series=(("CT", spec.per_series, "CHEST"),), rows=spec.rows, cols=spec.cols,
                               bits=spec.bits, seed=f"{spec.key}-{n}")
            orthanc.upload(study.paths)
            shutil.rmtree(src / str(n))
    finally:
        shutil.rmtree(src, ignore_errors=True)
    have = _study_instances(orthanc, spec.study_uid)
    if have != spec.instances:
        raise RuntimeError(f"Orthanc holds {have} of the {spec.instances} instances of {spec.key}")
    _say(f"study {spec.key}: stored in {time.perf_counter() - t0:.0f} s")


@contextlib.contextmanager
def _cache_dir() -> Iterator[Path]:
    """The shared cache, locked for this run; a private one when another run holds the lock."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            private = Path(tempfile.mkdtemp(prefix="xig-bench-private-"))
            _say(f"[yellow]another benchmark holds {CACHE}; using a private, uncached {private} "
                 "(and figures share the machine with it)[/]")
            try:
                yield private
            finally:
                shutil.rmtree(private, ignore_errors=True)
            return
        yield CACHE


@contextlib.contextmanager
def orthanc_with(specs: list[StudySpec], cache: Path) -> Iterator[OrthancServer]:
    if not orthanc_available():
        raise RuntimeError("Orthanc is not installed; run `make install` as root")
    workdir = cache / f"orthanc-v{CACHE_VERSION}"
    server = OrthancServer(workdir)
    for attempt in range(3):  # 2nd: other free ports; 3rd: a fresh storage (e.g. another Orthanc's database)
        try:
            server.start()
            break
        except Exception as exc:
            server.stop()
            if attempt == 2:
                raise
            _say(f"[yellow]Orthanc did not start ({str(exc).splitlines()[0]})"
                 + ("; recreating its cached storage" if attempt == 1 else "; retrying") + "[/]")
            if attempt == 1:
                shutil.rmtree(workdir, ignore_errors=True)
            server = OrthancServer(workdir)
    try:
        for spec in specs:
            ensure_study(server, spec)
        yield server
    finally:
        server.stop()


# -------------------------------------------------------------------------------------------------
# A gateway in its own process
# -------------------------------------------------------------------------------------------------

RESPONDER = """
[responder]
rad75_root_part = "{root}"
spool_dir = "spool"
"""


def pacs_section(kind: str, orthanc: OrthancServer) -> str:
    if kind == "dicomweb":
        return f'[pacs]\nkind = "dicomweb"\nurl = "{orthanc.dicomweb_url}"\n'
    return (f'[pacs]\nkind = "dimse"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
            f'called_ae = "{orthanc.aet}"\ncalling_ae = "XIG"\n')


class GatewayProcess:
    """``python -m gateway.cli serve --config …`` in ``workdir``; stopped by :meth:`stop` (and atexit)."""

    def __init__(self, workdir: Path, certs: CertSet, pacs: str, root: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "spool").mkdir(exist_ok=True)
        self.port = free_port()
        self.config_path = workdir / "xig.toml"
        self.config_path.write_text(gateway_toml(certs, hcid=HCID, port=self.port, pacs=pacs,
                                                 extra=RESPONDER.format(root=root)))
        self.config: Config = load_config(self.config_path)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "gateway.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def start(self, attempts: int = 600) -> GatewayProcess:
        self._log = (self.workdir / "gateway.log").open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config",
                                         str(self.config_path)], cwd=self.workdir, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "COLUMNS": "200"})
        atexit.register(self.stop)
        try:
            for _ in range(attempts):  # ≤ 60 s
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self.process.wait(timeout=0.1)
                    raise RuntimeError(f"gateway exited with status {code} during start-up:\n{self.log_tail()}")
            raise RuntimeError(f"gateway did not listen on {self.url}:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc)  # uvicorn: graceful shutdown first
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RssMonitor:
    """Peak RSS of a process while a block runs: kernel high-water mark (reset at entry) and sampling."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.sampled = 0
        self.hwm: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _vm_hwm(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(psutil.Error):
                self.sampled = max(self.sampled, self.proc.memory_info().rss)

    def __enter__(self) -> RssMonitor:
        # "5" resets the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0, own processes)
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        self.sampled = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.hwm = self._vm_hwm()

    @property
    def peak(self) -> int:
        return max(self.sampled, self.hwm or 0)


class Contention:
    """Share of the machine's CPU used by *other* processes (not this one or its children) while a block runs.

    Other work on a small machine skews the figures; this says how much there was.
    """

    @staticmethod
    def _own() -> dict[int, float]:
        return tree_cpu_seconds([os.getpid()])

    def __enter__(self) -> Contention:
        self.t0, self.busy0, self.own0 = time.monotonic(), machine_busy_seconds(), self._own()
        self.percent = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        wall = (time.monotonic() - self.t0) * (psutil.cpu_count() or 1)
        own = sum(v - self.own0.get(pid, 0.0) for pid, v in self._own().items())
        self.percent = max(0.0, (machine_busy_seconds() - self.busy0 - own) / wall * 100) if wall > 0 else 0.0

    def __str__(self) -> str:
        return f"other processes used {self.percent:.0f}% of the machine meanwhile"


# -------------------------------------------------------------------------------------------------
# The partner: ITI-38 → ITI-39 (authorises the instances) → RAD-75
# -------------------------------------------------------------------------------------------------

Item = tuple[str, str, str, str]  # study, series, SOP instance, repository (retrieve location) UIDs


class Partner:
    def __init__(self, gateway: GatewayProcess, certs: CertSet) -> None:
        self.cfg = gateway.config
        self.base = gateway.url
        self.ctx = client_context(certs.partner_cert, certs.partner_key, certs.ca_cert)

    async def _call(self, client: SoapClient, path: str, body: Any, action: str, **kw: Any) -> SoapReply:
        url = self.base + path
        reply = await client.call(url, body, action, security=security_header(self.cfg, url), timeout=CALL_TIMEOUT,
                                  **kw)
        if reply.fault is not None:
            raise RuntimeError(f"{path}: SOAP fault {reply.fault}")
        return reply

    async def authorise(self, spec: StudySpec) -> list[Item]:
        """ITI-38 FindDocuments (the on-demand KOS entry) and ITI-39 of that KOS: what RAD-75 may ask for."""
        async with SoapClient(self.ctx, timeout=CALL_TIMEOUT) as c:
            q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX(spec.patient_id, AA)))
            found = iti38.parse_response((await self._call(c, XCA_QUERY.path, q, XCA_QUERY.request_action)).body)
            if len(found.entries) != 1:
                raise RuntimeError(f"ITI-38 found {len(found.entries)} KOS entries for {spec.patient_id}, not 1")
            req = iti39.build_request([DocumentRequest(HCID, REPO, found.entries[0].unique_id)])
            reply = await self._call(c, XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action, use_mtom=True)
        doc = iti39.parse_response(reply.body, reply.attachments).documents[0]
        kos = parse_kos(doc.data if doc.data is not None else doc.attachment)
        items = [(r.study_uid, r.series_uid, r.sop_instance_uid, r.retrieve_location_uid) for r in kos.references]
        if len(items) != spec.instances:
            raise RuntimeError(f"the KOS lists {len(items)} instances, the study has {spec.instances}")
        return items

    def retrieve(self, items: list[Item], out: Path) -> tuple[int, float]:
        """RAD-75 of ``items``: (Part 10 bytes, seconds).

        Timed: what the reference's client does (:func:`receive`: one blocking socket, the whole HTTP answer
        written to one file), plus the TLS it must decrypt. After the clock stops the saved answer is
        checked in full: HTTP 200, an MTOM package decoded by XIG's own codec
        (:class:`gateway.soap.mtom.MtomDecoder`), a RAD-75 response with status Success and one document per
        requested instance, every part starting as a Part 10 file does.
        """
        url = self.base + XCAI_RETRIEVE.path
        body = rad75.build_request(rad75.imaging_request(
            [(st, se, DocumentRequest(HCID, repo, sop)) for st, se, sop, repo in items], [EVRLE]))
        data, content_type, mid = SoapClient.encode_request(url, body, XCAI_RETRIEVE.request_action,
                                                            security=security_header(self.cfg, url), use_mtom=True)
        out.mkdir(parents=True, exist_ok=True)
        answer = out / "answer"
        seconds = receive(url, http_request("POST", url, {
            "Content-Type": content_type, "Accept": "application/soap+xml, multipart/related"}, data), answer,
            self.ctx).seconds
        status, headers, chunks = read_answer(answer)
        reply_type = headers.get("content-type", "")
        if status != 200:
            raise RuntimeError(f"RAD-75: HTTP {status}")
        decoder = mtom.MtomDecoder(reply_type, lambda _info: _Part10Sink())
        for chunk in chunks:
            decoder.feed(chunk)
        msg = decoder.close()
        reply = parse_reply(status, reply_type, msg.root, dict(msg.attachments), mid)
        res = rad75.parse_response(reply.body, reply.attachments)
        if not res.status.endswith(":Success") or res.errors or len(res.documents) != len(items):
            raise RuntimeError(f"RAD-75: {res.status}, {len(res.documents)} of {len(items)} instances, "
                               f"errors {[(e.code, e.context) for e in res.errors[:3]]}")
        return sum(int(d.attachment) for d in res.documents), seconds


# -------------------------------------------------------------------------------------------------
# The one client every measurement here uses
# -------------------------------------------------------------------------------------------------

def http_request(method: str, url: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """One HTTP/1.1 request (``Connection: close``: the server ends the answer by closing)."""
    u = urlsplit(url)
    lines = [f"{method} {u.path or '/'}{'?' + u.query if u.query else ''} HTTP/1.1", f"Host: {u.netloc}",
             *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def receive(url: str, request: bytes, out: Path | None, ctx: ssl.SSLContext | None = None,
            bufsize: int = MB) -> Received:
    """Send ``request`` to ``url``'s host and write every byte of the answer to ``out``: the seconds it took
    and the bytes it got.

    The timed part of every client here (the reference, the ceiling, RAD-75): one blocking socket
    (TLS when ``ctx`` is given), reads into one 1 MiB buffer written to the file as it fills — as little
    work as receiving can be in Python, so the figures measure the servers, not the client. Parsing
    happens afterwards (:func:`read_answer`). ``out=None`` receives and drops the answer (what the bound of
    :func:`machine_bound` charges a gateway for reading from the PACS).
    """
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    t0 = time.perf_counter()
    sock = socket.create_connection((u.hostname, u.port), timeout=CALL_TIMEOUT)
    total = 0
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=u.hostname)
        sock.sendall(request)
        buf = bytearray(bufsize)
        view = memoryview(buf)
        fill = 0
        with out.open("wb", buffering=0) if out is not None else contextlib.nullcontext() as f:
            while True:
                try:
                    n = sock.recv_into(view[fill:], bufsize - fill)
                except ssl.SSLEOFError:  # closed without close_notify: the HTTP framing says if it was complete
                    n = 0
                if n == 0:
                    break
                fill += n
                total += n
                if fill > bufsize - 64 * 1024:
                    if f is not None:
                        f.write(view[:fill])
                    fill = 0
            if f is not None:
                f.write(view[:fill])
    finally:
        sock.close()
    return Received(time.perf_counter() - t0, total)


class Received(NamedTuple):
    seconds: float
    size: int  #: bytes of the whole answer, HTTP head included


def read_answer(path: Path) -> tuple[int, dict[str, str], Iterator[bytes]]:
    """A saved HTTP answer: (status, headers with lower-case names, the body's chunks — de-chunked by h11,
    which also fails on a truncated answer)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    f = path.open("rb")

    def event() -> Any:
        while True:
            try:
                e = conn.next_event()
            except h11.RemoteProtocolError as exc:  # e.g. the file ends before the body does
                raise RuntimeError(f"the HTTP answer ended early or is malformed: {exc}") from None
            if e is not h11.NEED_DATA:
                return e
            conn.receive_data(f.read(MB))

    head = event()
    if not isinstance(head, h11.Response):
        f.close()
        raise RuntimeError(f"not an HTTP answer: {head!r}")

    def body() -> Iterator[bytes]:
        with f:
            while True:
                e = event()
                if isinstance(e, h11.Data):
                    yield bytes(e.data)
                elif isinstance(e, h11.EndOfMessage):
                    return
                else:
                    raise RuntimeError(f"the HTTP answer ended early: {e!r}")

    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
    return head.status_code, headers, body()


class _Part10Sink:
    """An MTOM part that is only counted; ``close()`` returns its size. Checks the Part 10 preamble."""

    def __init__(self) -> None:
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        if len(self.head) < 132:
            self.head += data[:132 - len(self.head)]
        self.size += len(data)

    def close(self) -> int:
        if self.head[128:132] != b"DICM":
            raise RuntimeError("a RAD-75 part is not a DICOM Part 10 file")
        return self.size

    def abort(self) -> None:
        pass


def _fresh(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="out-", dir=parent))


# -------------------------------------------------------------------------------------------------
# Benchmarks
# -------------------------------------------------------------------------------------------------

@dataclass
class Transfer:
    """One timed transfer: MB/s, and the CPU seconds the client and the server process used meanwhile."""

    rate: float
    client_cpu: float
    server_cpu: float


def _timed_receive(server_pid: int, *args: Any, **kwargs: Any) -> tuple[Received, float, float]:
    """:func:`receive` with the CPU seconds of this process and of ``server_pid`` during it: (what it
    received, client CPU, server CPU). Server CPU comes from /proc in clock ticks (10 ms)."""
    server = psutil.Process(server_pid)
    s0, c0 = sum(server.cpu_times()[:2]), time.process_time()
    got = receive(*args, **kwargs)
    return got, time.process_time() - c0, sum(server.cpu_times()[:2]) - s0


def wado_reference(orthanc: OrthancServer, spec: StudySpec, work: Path) -> tuple[list[Transfer], list[Transfer]]:
    """Orthanc's WADO-RS of the whole study streamed to one file, :data:`RUNS` times (after a warm-up); then
    as many runs of a reader that drops what it receives (for :func:`machine_bound`)."""
    url = f"{orthanc.dicomweb_url}/studies/{spec.study_uid}"
    assert orthanc.process is not None
    _wado_once(url, spec, work, orthanc.process.pid)  # warm-up: the first read after start-up is from a cold cache
    with Contention() as other:
        runs = [_wado_once(url, spec, work, orthanc.process.pid) for _ in range(RUNS)]
        dropping = [_wado_dropped(url, spec, orthanc.process.pid) for _ in range(RUNS)]
    _say(f"reference: Orthanc WADO-RS of {spec.instances} instances {max(r.rate for r in runs):.0f} MB/s; CPU-s "
         f"per study (median): Orthanc {statistics.median(r.server_cpu for r in runs):.2f}, the client "
         f"{statistics.median(r.client_cpu for r in runs):.2f} (a reader dropping the bytes: "
         f"{statistics.median(r.client_cpu for r in dropping):.2f}) ({other})")
    return runs, dropping


def _wado_dropped(url: str, spec: StudySpec, orthanc_pid: int) -> Transfer:
    got, client, server = _timed_receive(orthanc_pid, url, http_request("GET", url, {"Accept": WADO_ACCEPT}), None)
    if got.size < 0.99 * spec.instances * spec.rows * spec.cols * spec.bits // 8:
        raise RuntimeError(f"WADO-RS answered only {got.size} bytes")
    return Transfer(got.size / MB / got.seconds, client, server)


def _wado_once(url: str, spec: StudySpec, work: Path, orthanc_pid: int) -> Transfer:
    out = _fresh(work)
    try:
        got, client, server = _timed_receive(orthanc_pid, url, http_request("GET", url, {"Accept": WADO_ACCEPT}),
                                             out / "answer")
        seconds = got.seconds
        status, _, chunks = read_answer(out / "answer")
        size = sum(len(c) for c in chunks)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if status != 200 or size < 0.99 * spec.instances * spec.rows * spec.cols * spec.bits // 8:
        raise RuntimeError(f"WADO-RS answered HTTP {status} with only {size} bytes")
    return Transfer(size / MB / seconds, client, server)


def rad75_throughput(orthanc: OrthancServer, certs: CertSet, work: Path, kind: str, root: str,
                     spec: StudySpec, reference: float) -> Result:
    """RAD-75 of the whole study through a gateway process: MB/s, best of :data:`RUNS`."""
    with GatewayProcess(work / f"gw-{kind}-{root}", certs, pacs_section(kind, orthanc), root) as gw:
        assert gw.process is not None
        partner = Partner(gw, certs)
        items = asyncio.run(partner.authorise(spec))
        with Contention() as other:
            runs = [_cpu_of(gw.process.pid, lambda: _rad75_once(partner, items, work)) for _ in range(RUNS)]
    best = max(rate for rate, _ in runs)
    cpu = min(seconds for _, seconds in runs)  # the least disturbed run
    _say(f"RAD-75 {kind}/root {root}: {best:.0f} MB/s → ratio {best / reference:.2f}; the gateway process used "
         f"{cpu:.2f} CPU-s per retrieve = {spec.mb / cpu:.0f} MB per CPU-second ({other})")
    backend = "DICOMweb" if kind == "dicomweb" else "DIMSE C-GET"
    return Result(f"RAD-75 {spec.instances} CT ({spec.mb:.0f} MB), {backend}, root {root} / Orthanc WADO-RS",
                  best, reference, "MB/s")


def _rad75_once(partner: Partner, items: list[Item], work: Path) -> float:
    out = _fresh(work)
    try:
        size, seconds = partner.retrieve(items, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return size / MB / seconds


def _cpu_of(pid: int, fn: Any) -> tuple[float, float]:
    """``(fn(), CPU seconds process ``pid`` used meanwhile)``."""
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    value = fn()
    after = proc.cpu_times()
    return value, (after.user + after.system) - (before.user + before.system)


# -------------------------------------------------------------------------------------------------
# The ceiling: one bare Python TLS stream of the same size, to the same partner
# -------------------------------------------------------------------------------------------------

#: a bare server's TLS write-buffer limit (the gateway's): it stops producing while this much waits to be sent
SEND_HIGH_WATER = 4 * MB


def _serve_over_tls(certs_dir: str, respond: Callable[[asyncio.StreamWriter], Awaitable[bool]]) -> None:
    """A bare asyncio HTTP/1.1 server over mutual TLS (its own process, like the gateway): every request
    (head, and a ``Content-Length`` body read and dropped) is answered by ``respond``, which returns
    ``False`` when the connection cannot go on. The gateway's TLS context, event loop and write-buffer
    limit; nothing else. Prints its port on stdout, then serves until it is stopped."""
    certs = CertSet(Path(certs_dir))
    ctx = server_context(certs.gateway_cert, certs.gateway_key, certs.ca_cert)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=SEND_HIGH_WATER)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length, close = 0, False
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                    elif name.strip().lower() == "connection":
                        close = value.strip().lower() == "close"
                await reader.readexactly(length)
                if not await respond(writer) or close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    event_loop.run(main(), "uvloop")  # the gateway's default event loop


def _tls_sender(certs_dir: str, total: int) -> None:
    """A bare asyncio TLS server (:func:`_serve_over_tls`): every HTTP request gets ``total`` bytes, in 1 MiB
    writes; nothing else (no HTTP stack, no reading from a PACS, no MTOM): the most any asyncio gateway can
    send through one TLS stream here."""
    block = os.urandom(MB)

    async def respond(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % total)
        left = total
        while left:
            writer.write(block if left >= len(block) else block[:left])
            left -= min(left, len(block))
            await writer.drain()
        return True

    _serve_over_tls(certs_dir, respond)


def tls_ceiling(certs: CertSet, work: Path, spec: StudySpec, reference: float) -> tuple[Result, list[Transfer]]:
    """The same partner receiving the same byte count from :func:`_tls_sender`: (MB/s best of :data:`RUNS`,
    every run with the client's and the sender's CPU seconds)."""
    total = int(spec.mb * MB * 1.003)  # the Part 10 files are ~0.3 % larger than their pixel data
    code = "import sys; from bench.rad75 import _tls_sender; _tls_sender(sys.argv[1], int(sys.argv[2]))"
    sender = subprocess.Popen([sys.executable, "-c", code, str(certs.directory), str(total)],
                              cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert sender.stdout is not None
        port = sender.stdout.readline().strip()  # the sender's first line, or "" when it died
        if not port.isdigit():
            raise RuntimeError("the bare TLS sender did not start")
        url = f"https://127.0.0.1:{int(port)}/blob"
        ctx = client_context(certs.partner_cert, certs.partner_key, certs.ca_cert)

        def once() -> Transfer:
            out = _fresh(work)
            try:
                got, client, server = _timed_receive(sender.pid, url, http_request("POST", url, {}, b"x"),
                                                     out / "answer", ctx)
                seconds = got.seconds
                status, _, chunks = read_answer(out / "answer")
                size = sum(len(c) for c in chunks)
                if status != 200 or size != total:
                    raise RuntimeError(f"the bare TLS sender answered HTTP {status} with {size} of {total} bytes")
            finally:
                shutil.rmtree(out, ignore_errors=True)
            return Transfer(total / MB / seconds, client, server)

        with Contention() as other:
            runs = [once() for _ in range(RUNS)]
    finally:
        stop_process(sender)
    best = max(r.rate for r in runs)
    cpu = min(r.server_cpu for r in runs)
    _say(f"ceiling: a bare asyncio TLS sender → the same partner {best:.0f} MB/s → ratio {best / reference:.2f}; "
         f"the sender used {cpu:.2f} CPU-s per stream = {spec.mb / max(cpu, 0.01):.0f} MB per CPU-second, the "
         f"client {statistics.median(r.client_cpu for r in runs):.2f} ({other})")
    return Result(f"Ceiling: one bare Python (asyncio) TLS stream of {spec.mb:.0f} MB to the same partner "
                  "/ Orthanc WADO-RS", best, reference, "MB/s"), runs


# -------------------------------------------------------------------------------------------------
# The bare forwarder: what any asyncio gateway in front of this Orthanc could reach, measured
# -------------------------------------------------------------------------------------------------

def _forwarder(certs_dir: str, upstream: str, accept: str) -> None:
    """A bare asyncio forwarder (:func:`_serve_over_tls`): every HTTP request over mutual TLS is answered with
    the body of one plain-HTTP GET of ``upstream`` (``Accept: accept``), passed on as it arrives.

    What a gateway in front of a DICOMweb PACS cannot do without: read the PACS's answer (into a buffer handed
    on without a copy, reused once nothing refers to it) and send it through one TLS stream (the gateway's TLS
    context, event loop and write-buffer limit), with flow control. Nothing else — no SOAP, no security
    header, no multipart parsing, no DICOM, no MTOM, no HTTP stack — so XIG's RAD-75 divided by this is the
    share of the possible that XIG reaches. An upstream answer that is not ``close``-framed (what Orthanc
    sends for WADO-RS) is not forwarded: the client gets a truncated answer and fails.
    """
    up = urlsplit(upstream)
    assert up.hostname is not None and up.port is not None
    probe = [bytearray()]
    unshared = sys.getrefcount(probe[0])  # a buffer only its list refers to
    get = (f"GET {up.path} HTTP/1.1\r\nHost: {up.netloc}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
           ).encode("latin-1")

    class Upstream(asyncio.BufferedProtocol):
        def __init__(self, down: asyncio.WriteTransport) -> None:
            self.down = down
            self.pool = [bytearray(MB)]
            self.buf = memoryview(b"")
            self.head: bytes | None = b""  # the upstream answer's head, until it is complete
            self.transport: asyncio.Transport | None = None
            self.paused = False
            self.finished = False
            self.failed = False
            self.signal: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def _notify(self) -> None:
            if not self.signal.done():
                self.signal.set_result(None)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.transport.write(get)  # type: ignore[union-attr]

        def get_buffer(self, sizehint: int) -> memoryview:
            # what was read is passed on, not copied: into the same buffer again once nothing refers to it
            # (the TLS transport encrypts what it is given at once), else into a new one
            if sys.getrefcount(self.pool[0]) != unshared:
                self.pool[0] = bytearray(MB)
            self.buf = memoryview(self.pool[0])
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            data, self.buf = self.buf[:nbytes], memoryview(b"")
            if self.head is not None:
                self.head += bytes(data)
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, rest = self.head[:end].lower(), self.head[end + 4:]
                self.head = None
                if not head.startswith(b"http/1.1 200") or b"content-length" in head or b"chunked" in head:
                    self.failed = True
                    assert self.transport is not None
                    self.transport.close()
                    return
                data = memoryview(rest)
            if len(data):
                self.down.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
                if self.down.get_write_buffer_size() > SEND_HIGH_WATER and not self.paused:
                    self.paused = True
                    assert self.transport is not None
                    self.transport.pause_reading()
                    self._notify()

        def eof_received(self) -> bool:
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self.finished, self.failed = True, self.failed or exc is not None
            self._notify()

    async def respond(writer: asyncio.StreamWriter) -> bool:
        loop = asyncio.get_running_loop()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        transport, upstream_ = await loop.create_connection(
            lambda: Upstream(writer.transport), up.hostname, up.port)  # type: ignore[arg-type]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:  # paused by the upstream side when the TLS stream has enough to send; resumed here
            await upstream_.signal
            upstream_.signal = loop.create_future()
            if upstream_.finished:
                break
            await writer.drain()
            upstream_.paused = False
            transport.resume_reading()
        if upstream_.failed:
            return False  # no last chunk: the client sees a truncated answer
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    _serve_over_tls(certs_dir, respond)


class Forwarder:
    """:func:`_forwarder` as a process; ``with Forwarder(...) as f: f.url``."""

    def __init__(self, certs: CertSet, upstream: str, accept: str = WADO_ACCEPT) -> None:
        self.args = [str(certs.directory), upstream, accept]
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Forwarder:
        code = "import sys; from bench.rad75 import _forwarder; _forwarder(*sys.argv[1:4])"
        self.process = subprocess.Popen([sys.executable, "-c", code, *self.args],
                                        cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE)
        atexit.register(self.stop)
        assert self.process.stdout is not None
        port = self.process.stdout.readline().strip()  # its first line, or "" when it died
        if not port.isdigit():
            self.stop()
            raise RuntimeError("the bare forwarder did not start")
        self.url = f"https://127.0.0.1:{int(port)}/forward"
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def forward_once(forwarder: Forwarder, ctx: ssl.SSLContext, work: Path, expected: int) -> float:
    """One request through the forwarder, received like RAD-75's answer: MB/s (the body checked after the clock)."""
    out = _fresh(work)
    try:
        url = forwarder.url
        got = receive(url, http_request("POST", url, {}, b"x"), out / "answer", ctx)
        status, _, chunks = read_answer(out / "answer")
        size = sum(len(c) for c in chunks)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if status != 200 or size < expected:
        raise RuntimeError(f"the bare forwarder answered HTTP {status} with {size} bytes, expected {expected}+")
    return size / MB / got.seconds


#: rounds of :func:`in_turns` (each: the reference, the forwarder and XIG once)
ROUNDS = 11


def in_turns(orthanc: OrthancServer, certs: CertSet, work: Path, spec: StudySpec) -> list[Result]:
    """Orthanc's WADO-RS, the bare forwarder (:func:`_forwarder`) and XIG's RAD-75 (DICOMweb backend, root last)
    of the same study, taken in turns (the first of a round rotating), :data:`ROUNDS` rounds: medians of each,
    so all three are measured at the same moments of this machine (a VM whose speed changes within seconds;
    the best-of-3 rows above are taken a minute apart)."""
    url = f"{orthanc.dicomweb_url}/studies/{spec.study_uid}"
    assert orthanc.process is not None
    orthanc_pid = orthanc.process.pid
    expected = int(0.99 * spec.instances * spec.rows * spec.cols * spec.bits // 8)
    ctx = client_context(certs.partner_cert, certs.partner_key, certs.ca_cert)
    with GatewayProcess(work / "gw-turns", certs, pacs_section("dicomweb", orthanc), "last") as gw, \
            Forwarder(certs, url) as fwd:
        partner = Partner(gw, certs)
        items = asyncio.run(partner.authorise(spec))
        _rad75_once(partner, items, work)  # warm-up of each
        forward_once(fwd, ctx, work, expected)
        runs: list[Callable[[], float]] = [lambda: _wado_once(url, spec, work, orthanc_pid).rate,
                                           lambda: forward_once(fwd, ctx, work, expected),
                                           lambda: _rad75_once(partner, items, work)]
        rows: list[tuple[float, float, float]] = []
        with Contention() as other:
            for i in range(ROUNDS):
                rates = [0.0] * 3
                for k in range(3):  # each round starts with the next of the three: no one always goes first
                    rates[(i + k) % 3] = runs[(i + k) % 3]()
                rows.append((rates[0], rates[1], rates[2]))
    ref, bare, xig = (statistics.median(r[i] for r in rows) for i in range(3))
    per_round = statistics.median(x / b for _, b, x in rows)
    _say(f"in turns ({ROUNDS} rounds, medians): Orthanc {ref:.0f} MB/s, the bare forwarder {bare:.0f} "
         f"(ratio {bare / ref:.2f}; per round {' '.join(f'{b / r:.2f}' for r, b, _ in rows)}), XIG RAD-75 {xig:.0f} "
         f"(ratio {xig / ref:.2f}; per round {' '.join(f'{x / r:.2f}' for r, _, x in rows)}); XIG / forwarder "
         f"per round median {per_round:.2f} ({other})")
    name = f"RAD-75 {spec.instances} CT ({spec.mb:.0f} MB), DICOMweb, root last"
    return [Result(f"{name} / Orthanc WADO-RS, taken in turns (medians of {ROUNDS})", xig, ref, "MB/s"),
            Result("Bare forwarder (Orthanc → one TLS stream, nothing parsed) / Orthanc WADO-RS, in turns",
                   bare, ref, "MB/s"),
            Result(f"{name} / the bare forwarder, in turns", xig, bare, "MB/s")]


def machine_bound(spec: StudySpec, reader: list[Transfer], ceiling: list[Transfer], reference: float) -> Result:
    """The most RAD-75 throughput *any* gateway could reach on this machine — a CPU budget, not XIG's figure.

    In front of a DICOMweb PACS a gateway needs at least: Orthanc serving the study, a read of its bytes
    (:func:`_wado_dropped`: a reader that drops them), one TLS encryption and send (the bare sender of
    :func:`tls_ceiling`), and the partner receiving and decrypting into its file (the ceiling's client, the
    same work as RAD-75's client). Medians of CPU seconds measured during each transfer. All four share
    this machine's CPUs, so a study cannot move faster than those CPUs run their sum, nor faster than one
    bare TLS stream. A gateway whose own work (HTTP, multipart parsing, MTOM, Python) cost nothing would reach
    this; the goal ratio is only reachable where the bound leaves room above it.
    """
    cpus = psutil.cpu_count() or 1
    parts = {"Orthanc": statistics.median(r.server_cpu for r in reader),
             "reading": statistics.median(r.client_cpu for r in reader),
             "TLS sending": statistics.median(r.server_cpu for r in ceiling),
             "the partner": statistics.median(r.client_cpu for r in ceiling)}
    floor = sum(parts.values())
    ceiling_rate = max(r.rate for r in ceiling)
    bound = min(spec.mb * cpus / floor, ceiling_rate) if floor > 0 else ceiling_rate
    _say(f"bound for any gateway here ({cpus} CPUs): {' + '.join(f'{k} {v:.2f}' for k, v in parts.items())} = "
         f"{floor:.2f} CPU-s per study → at most {bound:.0f} MB/s = ratio {bound / reference:.2f} "
         f"(the goal 0.6 needs {0.6 * reference:.0f} MB/s)")
    return Result(f"Bound for any gateway on these {cpus} CPUs (PACS read + one TLS send + the partner, no "
                  "gateway work) / Orthanc WADO-RS", bound, reference, "MB/s")


def peak_rss(orthanc: OrthancServer, certs: CertSet, work: Path, kind: str, root: str,
             spec: StudySpec) -> Result:
    with GatewayProcess(work / f"gw-large-{kind}-{root}", certs, pacs_section(kind, orthanc), root) as gw:
        assert gw.process is not None
        time.sleep(1.0)  # let start-up allocations settle
        idle = psutil.Process(gw.process.pid).memory_info().rss
        partner = Partner(gw, certs)
        items = asyncio.run(partner.authorise(spec))
        out = _fresh(work)
        try:
            with Contention() as other, RssMonitor(gw.process.pid) as mon:
                size, seconds = partner.retrieve(items, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    _say(f"peak RSS {kind}/root {root}: {mon.peak / MB:.0f} MB (VmHWM {(mon.hwm or 0) / MB:.0f} MB, sampled "
         f"{mon.sampled / MB:.0f} MB), idle {idle / MB:.0f} MB; {size / MB:,.0f} MB in {seconds:.1f} s "
         f"= {size / MB / seconds:.0f} MB/s ({other})")
    backend = "DICOMweb" if kind == "dicomweb" else "DIMSE C-GET"
    return Result(f"Gateway peak RSS (goal < 300 MB), RAD-75 {spec.instances} CT ({spec.mb / 1024:.1f} GB), "
                  f"{backend}, root {root} / idle", mon.peak / MB, idle / MB, "MB")


def run() -> list[Result]:
    t_start = time.perf_counter()
    large = os.environ.get("XIG_BENCH_LARGE", "1").strip().lower() not in ("0", "no", "false", "off")
    _say(f"{psutil.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start"
         + ("" if large else "; XIG_BENCH_LARGE=0: the 2 GB peak-RSS case is skipped"))
    results: list[Result] = []
    with _cache_dir() as cache:
        work = Path(tempfile.mkdtemp(prefix="xig-bench-rad75-"))
        try:
            certs = init_certs(work / "pki")
            specs = [SMALL, LARGE] if large else [SMALL]
            with orthanc_with(specs, cache) as orthanc:
                reference, dropping = wado_reference(orthanc, SMALL, work)
                ref = max(r.rate for r in reference)
                ceiling, ceiling_runs = tls_ceiling(certs, work, SMALL, ref)
                results.append(ceiling)
                results.append(machine_bound(SMALL, dropping, ceiling_runs, ref))
                streamed: Result | None = None
                for kind, root in (("dicomweb", "first"), ("dicomweb", "last"), ("dimse", "first"),
                                   ("dimse", "last")):
                    results.append(rad75_throughput(orthanc, certs, work, kind, root, SMALL, ref))
                    if (kind, root) == ("dicomweb", "last"):
                        streamed = results[-1]
                assert streamed is not None
                results.append(Result(f"{streamed.name.split(' / ')[0]} / the ceiling above", streamed.value,
                                      ceiling.value, "MB/s"))
                results.extend(in_turns(orthanc, certs, work, SMALL))
                if large:
                    for kind, root in (("dicomweb", "first"), ("dicomweb", "last")):
                        results.append(peak_rss(orthanc, certs, work, kind, root, LARGE))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _say(f"done in {time.perf_counter() - t_start:.0f} s; load average "
         f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    return results


if __name__ == "__main__":
    for r in run():
        print(f"{r.name}: {r.value:.1f} {r.unit} vs {r.reference:.1f} {r.unit} → ratio {r.ratio:.2f}")
