"""Load benchmark (issue #6): 200 concurrent ITI-55 with signed assertions, 20 concurrent RAD-75.

Everything on loopback, bounded in time (about a minute; every request has a timeout):

* **The gateway** is a real ``xig serve --workers 2`` (:data:`WORKERS`) process on a real PostgreSQL
  (:class:`tests.postgres.PostgresServer`; SQLite file when the PostgreSQL binaries are missing), in
  front of the embedded filesystem PACS holding :data:`PATIENTS` synthetic patients with one small study
  each, plus one CT study of :data:`RAD75_INSTANCES` 512×512×16 instances (~20 MB) for patient 0, all
  imported with ``xig pacs import``. Mutual TLS, XUA verification, schema validation, matching, the
  ledger — nothing is switched off.
* **ITI-55**: :data:`ITI55_CLIENTS` concurrent partners (each its own TLS connection, kept alive),
  each sending :data:`ITI55_ROUNDS` XCPD requests one after the other, every request with its own freshly
  signed SAML assertion. Signing and envelope encoding happen *before* timing (their cost per request is
  reported separately): the timed part is the exchange — TLS handshake on each client's first request,
  request, gateway work, response, parse — as a partner sees it. Each answer must be a match for the
  patient asked about. Latency p50/p99 (nearest rank), throughput = requests / wall time of the burst.
  Reference: the same clients doing plain mutual-TLS round trips (``GET /health`` on the same gateway
  processes, so the TLS stack, the workers and the connection pattern are the same; no SOAP/XUA/DB).
* **RAD-75**: the study's KOS is retrieved once (ITI-38 + ITI-39: that authorises the instances), then
  :data:`RAD75_CLIENTS` concurrent partners each retrieve the whole study (fresh connections, signed
  requests, MTOM; bytes counted and discarded on arrival, nothing written on the client side). Each
  answer must be Success with every instance and the exact bytes of the stored files. Reference: the
  same clients downloading the same files, concatenated, as one plain mutual-TLS stream from a bare
  uvicorn process with the gateway's own TLS settings (``python -m bench.load serve-reference``).
* The issue's goals — zero errors and ITI-55 p99 < 500 ms — are printed as met / not met, with the
  share of the machine's CPU other processes used meanwhile (2 shared cores: read figures with that).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from rich.console import Console

from bench.common import Result, gateway_toml, machine_busy_seconds, tree_cpu_seconds
from gateway.config import Config, load_config
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import make_study
from gateway.ihe import ebrim, iti38, iti39, iti55, rad75
from gateway.ihe.iti39 import DocumentRequest
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.security.certs import CertSet, init_certs
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom
from gateway.web.client import SoapClient
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD

MB = 1024 * 1024
WORKERS = 2
ITI55_CLIENTS = 200
ITI55_ROUNDS = 3
RAD75_CLIENTS = 20
RAD75_INSTANCES = 40
PATIENTS = 5
GOAL_P99_MS = 500.0
#: one request (the whole RAD-75 of a study included) must finish within this many seconds
CALL_TIMEOUT = 60.0
HCID, AA, REPO, SOURCE = "urn:oid:2.999.1", "2.999.1.1", "2.999.1.2", "2.999.1.3"
EVRLE = "1.2.840.10008.1.2.1"
FAMILIES = ("Adams", "Baker", "Clark", "Davis", "Evans", "Foster", "Green", "Hughes")

log = Console(stderr=True, highlight=False, soft_wrap=True)


def _say(msg: str) -> None:
    log.print(f"[dim]\\[load {time.strftime('%H:%M:%S')}][/] {msg}")


# -------------------------------------------------------------------------------------------------
# Statistics
# -------------------------------------------------------------------------------------------------

@dataclass
class Stats:
    """Outcome of one concurrent burst: per-request latencies (ms), errors, bytes, wall time (s)."""

    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bytes: int = 0
    wall: float = 0.0
    #: CPU seconds used during the burst, per process group (see :class:`CpuMeter`)
    cpu: dict[str, float] = field(default_factory=dict)
    #: (latency, result, check) of answered requests, checked once the burst is over
    answered: list[tuple[float, Any, Callable[[Any], str | None]]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.errors)

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies (ms)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    @property
    def rps(self) -> float:
        return self.requests / self.wall if self.wall else float("nan")

    @property
    def mbps(self) -> float:
        return self.bytes / MB / self.wall if self.wall else float("nan")

    def settle(self) -> None:
        """Check every answer (after the burst, so parsing answers does not slow the other clients down)."""
        for elapsed, result, check in self.answered:
            problem = check(result)
            if problem is None:
                self.latencies.append(elapsed)
            else:
                self.errors.append(problem)
        self.answered = []

    def cpu_ms_per_request(self, group_prefix: str) -> float:
        seconds = sum(v for k, v in self.cpu.items() if k.startswith(group_prefix))
        return seconds * 1000 / self.requests if self.requests else float("nan")

    def cpu_text(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" + (f" ({seconds * 1000 / self.requests:.1f} ms/request)"
                                                     if name.startswith(("gateway", "reference")) and self.requests
                                                     else "")
                         for name, seconds in self.cpu.items())

    def line(self) -> str:
        text = (f"{self.name}: {self.requests} requests in {self.wall:.2f} s = {self.rps:,.0f} req/s"
                + (f", {self.mbps:,.0f} MB/s" if self.bytes else "")
                + f"; p50 {self.percentile(50):,.0f} ms, p99 {self.percentile(99):,.0f} ms; {len(self.errors)} errors"
                + (f"; CPU {self.cpu_text()}" if self.cpu else ""))
        if self.errors:
            text += f" (first: {self.errors[0][:300]})"
        return text


#: name → (pids, with their descendants?)
Meter = dict[str, tuple[list[int], bool]]


class CpuMeter:
    """CPU seconds used during a block by named process trees, and by every other process of the machine."""

    def __init__(self, roots: Meter) -> None:
        self.roots = roots
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {name: tree_cpu_seconds(pids, recursive=rec) for name, (pids, rec) in self.roots.items()}
        self._busy0 = machine_busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = machine_busy_seconds() - self._busy0
        for name, (pids, rec) in self.roots.items():
            end, start = tree_cpu_seconds(pids, recursive=rec), self._start[name]
            self.used[name] = sum(v - start.get(pid, 0.0) for pid, v in end.items())
        self.used["other processes"] = max(0.0, busy - sum(self.used.values()))



async def burst(name: str, clients: int, run_client: Callable[[int, Stats], Awaitable[None]],
                meter: Meter) -> Stats:
    """Run ``clients`` coroutines at once; wall time from the first start to the last end."""
    stats = Stats(name)
    with CpuMeter(meter) as cpu:
        t0 = time.perf_counter()
        await asyncio.gather(*(run_client(i, stats) for i in range(clients)))
        stats.wall = time.perf_counter() - t0
    stats.cpu = cpu.used
    stats.settle()
    return stats


async def timed(stats: Stats, call: Awaitable[Any], check: Callable[[Any], str | None]) -> Any:
    """Await ``call``; keep its latency and result for :meth:`Stats.settle` (an exception is an error)."""
    t0 = time.perf_counter()
    try:
        result = await call
    except Exception as exc:  # noqa: BLE001 - every failure is counted as an error
        stats.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    stats.answered.append(((time.perf_counter() - t0) * 1000, result, check))
    return result


# -------------------------------------------------------------------------------------------------
# The gateway under test and the reference server, each its own process
# -------------------------------------------------------------------------------------------------

LOAD_SECTIONS = """
[database]
url = "{database}"

[responder]
spool_dir = "spool"

# every client here presents the same partner certificate: admit the whole load (it stands for many
# partners); with the defaults the per-partner limits answer "busy" beyond 64 requests / 8 retrievals
[limits]
max_concurrent_requests = 1024
max_concurrent_per_partner = 1024
max_concurrent_retrievals = 64
max_concurrent_retrievals_per_partner = 64
"""


class Process:
    """A child process whose first stdout line announces readiness; stopped (SIGTERM, then kill) on exit."""

    def __init__(self, cmd: list[str], cwd: Path, log_path: Path, ready: str) -> None:
        self.cmd, self.cwd, self.log_path, self.ready = cmd, cwd, log_path, re.compile(ready)
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self.match: re.Match[str] | None = None

    def __enter__(self) -> Process:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env={**os.environ, "COLUMNS": "400"})
        atexit.register(self.stop)
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # blocks until the process is ready (or exits)
            self.match = self.ready.search(line)
            if self.match is None:
                raise RuntimeError(f"{' '.join(self.cmd[2:4])} did not start ({line.strip() or 'exited'}):\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_reference(workdir: Path) -> None:
    """``python -m bench.load serve-reference DIR``: GET /health (a TLS round trip) and GET /blob (the
    RAD-75 study's files concatenated, streamed in 1 MiB chunks) with the gateway's TLS settings."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from gateway.web.server import bind, uvicorn_config

    config = load_config(workdir / "xig.toml")
    files = sorted((workdir / "rad75-files").read_text().split("\n"))

    async def health(_request: Request) -> Response:
        return PlainTextResponse("ok")

    def chunks() -> Iterator[bytes]:
        for name in files:
            with open(name, "rb") as f:
                while chunk := f.read(MB):
                    yield chunk

    async def blob(_request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="application/octet-stream")

    class Announcing(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            print(f"listening on https://127.0.0.1:{sock.getsockname()[1]}", flush=True)

    sock = bind("127.0.0.1", 0)
    app = Starlette(routes=[Route("/health", health), Route("/blob", blob)])
    Announcing(uvicorn_config(config, app)).run(sockets=[sock])


@contextlib.contextmanager
def database(work: Path) -> Iterator[tuple[str, str, list[int]]]:
    """A PostgreSQL database for the gateway (SQLite file when PostgreSQL is not installed):
    (url, kind, pids of the database server)."""
    from tests.postgres import PostgresServer, postgres_available

    if not postgres_available():
        _say("[yellow]PostgreSQL is not installed: the gateway uses a SQLite file[/]")
        yield "sqlite:///xig.db", "SQLite", []
        return
    with PostgresServer() as server:
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        yield server.create_database("xig_load"), "PostgreSQL", [postmaster]


@dataclass
class Setup:
    work: Path
    certs: CertSet
    config: Config
    demographics: list[PatientDemographics]
    rad75_files: list[Path]


def birth_date(patient: int) -> str:
    return f"19{60 + patient % 40}0{1 + patient % 9}1{patient % 10}"


def prepare(work: Path, database_url: str, *, patients: int = PATIENTS, instances: int = RAD75_INSTANCES) -> Setup:
    certs = init_certs(work / "pki")
    gw = work / "gw"
    gw.mkdir()
    (gw / "spool").mkdir()
    (gw / "xig.toml").write_text(gateway_toml(certs, hcid=HCID, extra=LOAD_SECTIONS.format(database=database_url)))
    demographics = []
    for i in range(patients):
        family, birth = FAMILIES[i % len(FAMILIES)], birth_date(i)
        make_study(work / "in" / f"p{i}", patient_id=f"LOAD-{i}", patient_name=f"{family}^Ann", birth_date=birth,
                   sex="F", accession=f"LOAD{i}", study_description="XR chest", series=(("DX", 2, "CHEST"),),
                   seed=f"load-{i}")
        demographics.append(PatientDemographics(names=(PersonName(family=(family,), given=("Ann",)),), gender="F",
                                                birth_time=birth))
    big = make_study(work / "in" / "rad75", patient_id="LOAD-0", patient_name=f"{FAMILIES[0]}^Ann",
                     birth_date=birth_date(0), sex="F", accession="LOADCT", study_description="CT chest",
                     series=(("CT", instances, "CHEST"),), rows=512, cols=512, seed="load-rad75")
    imported = subprocess.run([sys.executable, "-m", "gateway.cli", "pacs", "import", "--config", str(gw / "xig.toml"),
                               str(work / "in")], cwd=gw, capture_output=True, text=True, timeout=300)
    if imported.returncode != 0:
        raise RuntimeError(f"xig pacs import failed: {imported.stderr[-2000:]}{imported.stdout[-2000:]}")
    rad75_files = [i.path for i in big.instances]
    (gw / "rad75-files").write_text("\n".join(str(p) for p in rad75_files))
    return Setup(work, certs, load_config(gw / "xig.toml"), demographics, rad75_files)


def gateway_process(setup: Setup, workers: int) -> Process:
    gw = setup.work / "gw"
    return Process([sys.executable, "-m", "gateway.cli", "serve", "--config", str(gw / "xig.toml"), "--workers",
                    str(workers)], gw, gw / "gateway.log", r"on (https://\S+) with \d+ worker processes")


def reference_process(setup: Setup) -> Process:
    gw = setup.work / "gw"
    return Process([sys.executable, "-m", "bench.load", "serve-reference", str(gw)], Path.cwd(),
                   gw / "reference.log", r"listening on (https://\S+)")


# -------------------------------------------------------------------------------------------------
# The partners
# -------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """One request, signed and encoded before timing."""

    data: bytes
    content_type: str
    message_id: str


@dataclass
class Target:
    """Where a burst goes, and whose CPU time it meters."""

    base: str
    meter: Meter


def sign_iti55(setup: Setup, base: str, count: int) -> tuple[list[tuple[Prepared, int]], float]:
    """``count`` ITI-55 requests (patient ``i % PATIENTS``), each with its own fresh assertion; and ms each."""
    url = base + XCPD.path
    out = []
    t0 = time.perf_counter()
    for i in range(count):
        patient = i % len(setup.demographics)
        body, _ = iti55.build_request(setup.demographics[patient], sender_device_id="2.999.2",
                                      home_community_id="urn:oid:2.999.2", receiver_device_id=HCID[8:],
                                      assigning_authority="2.999.2.1", local_patient_id=f"REMOTE-{i}")
        data, ctype, mid = SoapClient.encode_request(url, body, XCPD.request_action,
                                                     security=security_header(setup.config, url))
        out.append((Prepared(data, ctype, mid), patient))
    return out, (time.perf_counter() - t0) * 1000 / max(count, 1)


async def iti55_load(setup: Setup, target: Target, clients: int, rounds: int) -> tuple[Stats, float]:
    requests, sign_ms = sign_iti55(setup, target.base, clients * rounds)
    url = target.base + XCPD.path
    ctx = client_context(setup.certs.partner_cert, setup.certs.partner_key, setup.certs.ca_cert)

    def check(patient: int) -> Callable[[Any], str | None]:
        def _check(reply: Any) -> str | None:
            if reply.fault is not None:
                return f"fault {reply.fault}"
            result = iti55.parse_response(reply.body)
            ids = [p.patient_id.extension for p in result.patients]
            if result.status == "match" and ids == [f"LOAD-{patient}"]:
                return None
            return f"patient {patient}: {result.status} {result.query_response_code} {ids}"
        return _check

    async def client(i: int, stats: Stats) -> None:
        async with SoapClient(ctx, timeout=CALL_TIMEOUT) as soap:
            for r in range(rounds):
                req, patient = requests[i * rounds + r]
                await timed(stats, soap.post(url, req.data, req.content_type, req.message_id), check(patient))

    return await burst(f"ITI-55 ({clients} concurrent × {rounds})", clients, client, target.meter), sign_ms


async def round_trips(setup: Setup, target: Target, clients: int, rounds: int) -> Stats:
    """The reference for ITI-55: plain mutual-TLS GET /health, same clients and connection pattern."""
    ctx = client_context(setup.certs.partner_cert, setup.certs.partner_key, setup.certs.ca_cert)

    async def client(i: int, stats: Stats) -> None:
        async with httpx.AsyncClient(verify=ctx, timeout=CALL_TIMEOUT) as http:
            for _ in range(rounds):
                await timed(stats, http.get(target.base + "/health"),
                            lambda r: None if r.status_code == 200 else f"HTTP {r.status_code}")

    return await burst(f"TLS round trip ({clients} concurrent × {rounds})", clients, client, target.meter)


Item = tuple[str, str, str, str]


async def authorise(setup: Setup, base: str) -> list[Item]:
    """ITI-38 + ITI-39 of the big study's KOS (once, untimed): what RAD-75 may then ask for."""
    ctx = client_context(setup.certs.partner_cert, setup.certs.partner_key, setup.certs.ca_cert)
    async with SoapClient(ctx, timeout=CALL_TIMEOUT) as soap:
        url = base + XCA_QUERY.path
        q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("LOAD-0", AA)))
        reply = await soap.call(url, q, XCA_QUERY.request_action, security=security_header(setup.config, url))
        entries = iti38.parse_response(reply.body).entries
        for entry in entries:
            url = base + XCA_RETRIEVE.path
            reply = await soap.call(url, iti39.build_request([DocumentRequest(HCID, REPO, entry.unique_id)]),
                                    XCA_RETRIEVE.request_action, use_mtom=True,
                                    security=security_header(setup.config, url))
            doc = iti39.parse_response(reply.body, reply.attachments).documents[0]
            kos = parse_kos(doc.data if doc.data is not None else doc.attachment)
            if len(kos.references) == len(setup.rad75_files):
                return [(r.study_uid, r.series_uid, r.sop_instance_uid, r.retrieve_location_uid)
                        for r in kos.references]
    raise RuntimeError(f"no KOS with the {len(setup.rad75_files)} instances of the RAD-75 study among "
                       f"{len(entries)} ITI-38 entries")


def _counting_sink(_info: mtom.PartInfo) -> mtom.PartSink:
    """Counts a part's bytes and drops them (``close()`` returns the count)."""
    size = [0]

    def on_chunk(chunk: bytes) -> None:
        size[0] += len(chunk)
    return mtom.CallbackSink(on_chunk, lambda: size[0])


async def rad75_load(setup: Setup, target: Target, clients: int) -> Stats:
    items = await authorise(setup, target.base)
    url = target.base + XCAI_RETRIEVE.path
    body = rad75.build_request(rad75.imaging_request(
        [(st, se, DocumentRequest(HCID, repo, sop)) for st, se, sop, repo in items], [EVRLE]))
    requests = [Prepared(*SoapClient.encode_request(url, body, XCAI_RETRIEVE.request_action, use_mtom=True,
                                                    security=security_header(setup.config, url)))
                for _ in range(clients)]
    expected = sum(p.stat().st_size for p in setup.rad75_files)
    ctx = client_context(setup.certs.partner_cert, setup.certs.partner_key, setup.certs.ca_cert)

    async def client(i: int, stats: Stats) -> None:
        def check(reply: Any) -> str | None:
            if reply.fault is not None:
                return f"fault {reply.fault}"
            res = rad75.parse_response(reply.body, reply.attachments)
            if not res.status.endswith(":Success") or len(res.documents) != len(items) or res.errors:
                return f"{res.status}: {len(res.documents)} of {len(items)} instances, {res.errors[:2]}"
            received = sum(reply.attachments.values())
            if received != expected:
                return f"{received} bytes received, {expected} stored"
            stats.bytes += received
            return None

        req = requests[i]
        async with SoapClient(ctx, timeout=CALL_TIMEOUT) as soap:
            await timed(stats, soap.post(url, req.data, req.content_type, req.message_id,
                                         sink_factory=_counting_sink), check)

    return await burst(f"RAD-75 of {len(items)} instances ({clients} concurrent)", clients, client, target.meter)


async def downloads(setup: Setup, target: Target, clients: int) -> Stats:
    """The reference for RAD-75: the same files as one plain mutual-TLS stream, same concurrency."""
    expected = sum(p.stat().st_size for p in setup.rad75_files)
    ctx = client_context(setup.certs.partner_cert, setup.certs.partner_key, setup.certs.ca_cert)

    async def fetch(http: httpx.AsyncClient) -> int:
        size = 0
        async with http.stream("GET", target.base + "/blob") as rsp:
            async for chunk in rsp.aiter_raw():
                size += len(chunk)
        return size

    async def client(i: int, stats: Stats) -> None:
        def check(size: int) -> str | None:
            if size != expected:
                return f"{size} of {expected} bytes"
            stats.bytes += size
            return None

        async with httpx.AsyncClient(verify=ctx, timeout=CALL_TIMEOUT) as http:
            await timed(stats, fetch(http), check)

    return await burst(f"TLS download of the same bytes ({clients} concurrent)", clients, client, target.meter)


# -------------------------------------------------------------------------------------------------
# The benchmark
# -------------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    iti55: Stats
    health: Stats
    rad75: Stats
    download: Stats
    sign_ms: float
    database: str
    workers: int

    @property
    def errors(self) -> int:
        return len(self.iti55.errors) + len(self.rad75.errors)

    @property
    def zero_errors(self) -> bool:
        return self.errors == 0 and self.iti55.requests > 0 and self.rad75.requests > 0

    @property
    def p99_met(self) -> bool:
        return self.iti55.percentile(99) < GOAL_P99_MS


def measure(work: Path, *, workers: int = WORKERS, iti55_clients: int = ITI55_CLIENTS, iti55_rounds: int = ITI55_ROUNDS,
            rad75_clients: int = RAD75_CLIENTS, patients: int = PATIENTS, instances: int = RAD75_INSTANCES,
            reference: bool = True) -> LoadReport:
    """Set up, run every burst once (after a small warm-up), tear down; the figures."""
    client: Meter = {"bench client": ([os.getpid()], False)}
    with database(work) as (url, kind, db_pids):
        setup = prepare(work, url, patients=patients, instances=instances)
        with gateway_process(setup, workers) as gw, contextlib.ExitStack() as stack:
            assert gw.match is not None and gw.proc is not None
            target = Target(gw.match.group(1), {**client, f"gateway ({workers} workers)": ([gw.proc.pid], True),
                                                 kind: (db_pids, True)})
            # warm-up: each worker's first requests (schema caches, connection pools), untimed
            asyncio.run(iti55_load(setup, target, 2 * workers, 1))
            iti55_stats, sign_ms = asyncio.run(iti55_load(setup, target, iti55_clients, iti55_rounds))
            health = asyncio.run(round_trips(setup, target, iti55_clients, iti55_rounds))
            rad75_stats = asyncio.run(rad75_load(setup, target, rad75_clients))
            download = Stats("TLS download of the same bytes (not run)")
            if reference:
                ref = stack.enter_context(reference_process(setup))
                assert ref.match is not None and ref.proc is not None
                download = asyncio.run(downloads(setup, Target(ref.match.group(1), {
                    **client, "reference server": ([ref.proc.pid], True)}), rad75_clients))
    return LoadReport(iti55_stats, health, rad75_stats, download, sign_ms, kind, workers)


def cpu_per_mb(stats: Stats, group_prefix: str) -> float:
    seconds = sum(v for k, v in stats.cpu.items() if k.startswith(group_prefix))
    return seconds * 1000 / (stats.bytes / MB) if stats.bytes else float("nan")


def run() -> list[Result]:
    t_start = time.perf_counter()
    _say(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    work = Path(tempfile.mkdtemp(prefix="xig-bench-load-"))
    try:
        report = measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stats in (report.iti55, report.health, report.rad75, report.download):
        _say(stats.line())
    _say(f"gateway: xig serve --workers {report.workers}, {report.database}; signing + encoding one ITI-55 request "
         f"took {report.sign_ms:.1f} ms (done before timing, not counted)")
    for goal, met in (("zero errors", report.zero_errors), (f"ITI-55 p99 < {GOAL_P99_MS:g} ms", report.p99_met)):
        _say(f"goal {goal}: {'[green]met[/]' if met else '[red]not met[/]'}")
    _say(f"done in {time.perf_counter() - t_start:.0f} s; load average "
         f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    i, h, r, d = report.iti55, report.health, report.rad75, report.download
    return [
        Result(f"{i.name}, signed XUA, {WORKERS} workers: p50 latency / TLS round trip p50", i.percentile(50),
               h.percentile(50), "ms"),
        Result(f"{i.name}: p99 latency / goal {GOAL_P99_MS:g} ms ({'met' if report.p99_met else 'not met'})",
               i.percentile(99), GOAL_P99_MS, "ms"),
        Result(f"{i.name}: throughput / TLS round trips", i.rps, h.rps, "req/s"),
        Result(f"{i.name}: gateway CPU per request / per TLS round trip", i.cpu_ms_per_request("gateway"),
               h.cpu_ms_per_request("gateway"), "ms"),
        Result(f"{r.name}: throughput / plain TLS download of the same bytes", r.mbps, d.mbps, "MB/s"),
        Result(f"{r.name}: gateway CPU per MB / reference server's", cpu_per_mb(r, "gateway"),
               cpu_per_mb(d, "reference"), "ms"),
        Result(f"{r.name}: p99 latency / plain TLS download p99", r.percentile(99), d.percentile(99), "ms"),
        Result(f"errors, ITI-55 + RAD-75 (goal 0: {'met' if report.zero_errors else 'not met'}) / requests",
               float(report.errors), float(i.requests + r.requests), "requests"),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-reference"]:
        serve_reference(Path(sys.argv[2]))
    else:
        for res in run():
            print(f"{res.name}: {res.value:.1f} {res.unit} vs {res.reference:.1f} {res.unit} → ratio {res.ratio:.2f}")
