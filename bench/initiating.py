"""Initiating-gateway benchmarks: XCPD fan-out to 50 partners, and the import station's memory on a 2 GB pull.

* **Fan-out.** 50 simulated partners, each on its own port with mutual TLS, all in *one separate process*
  (so the partners' CPU work does not share the measuring process's GIL), partner ``i`` answering
  ``100 + 400·i/49`` ms after the request arrived with a valid PRPA_IN201306UV02 NF built by
  :func:`gateway.ihe.iti55.build_response`. Two farms, one row set each: "light" partners
  (:func:`serve_light_partners`: thin asyncio + h11 servers; the first request each gets is checked by
  XIG's complete inbound pipeline) give the goal's figure — real partners answer from their own
  machines, not from the two cores the initiating side is measured on; "xig" partners
  (:func:`serve_partners`: 50 full XIG servers on one event loop, every request checked) show what
  such a farm costs here. The initiating config has one ``[[partners]]`` entry (own HCID, own URL) per
  partner, the slowest last. Measured: the wall time of :func:`gateway.initiating.fanout.discover_all`
  over the 50, run as ``xig discover`` runs it (on the configured event loop, uvloop by default; a fresh
  SOAP client each run, so fresh TLS connections and full handshakes; every exchange audited into the
  station's database; the partners' response times read from and recorded into that database), one
  warm-up run then :data:`RUNS` pairs of runs: a *first fan-out* (the recorded response times deleted
  before it, so the partners start in the config's order) and one *with history* (the times the runs
  before recorded: the slowest partners start first, see :mod:`gateway.initiating.fanout`) — interleaved,
  so both see the same VM speed; best and median. Reference = the slowest partner's latency (500 ms).
  Goal: wall ≤ slowest + 150 ms.
* **Import station peak RSS.** A responding XIG process (``python -m gateway.cli serve``, DICOMweb
  backend, RAD-75 root part "last") on the cached Orthanc of :mod:`bench.rad75` holding its 2 GB study;
  an import station runs ``python -m gateway.cli pull-priors --config … --yes --json`` as its own
  process with a filesystem local PACS. Its RSS and its kernel peak (``VmHWM``) are sampled every 10 ms
  (not ``ru_maxrss``: after vfork it counts the parent's RSS); reference = the same peak of ``xig --help``
  (the same interpreter and CLI, idle). Goal: < 300 MB. Throughput = bytes stored in the local PACS /
  wall time of the whole command (start-up and discovery included), against one Orthanc WADO-RS of the
  2 GB study streamed to a file. The synthetic patient of the 2 GB study also owns the 200 MB study of
  :mod:`bench.rad75` (same demographics), so the pull imports both (~2.2 GB). Skipped with
  ``XIG_BENCH_LARGE=0``. Every process and temporary folder (the ~2.2 GB local PACS included) is removed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
import psutil
from rich.console import Console

from bench import rad75
from bench.common import Result, host_speed
from bench.common import gateway_toml as common_gateway_toml
from gateway.config import load_config
from gateway.ihe import iti55
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.initiating.fanout import discover_all
from gateway.initiating.partners import PartnerDirectory
from gateway.security.certs import CertSet, init_certs
from gateway.web import loop as event_loop
from gateway.web.endpoints import XCPD

if TYPE_CHECKING:
    from tests.orthanc import OrthancServer

MB = 1024 * 1024
PARTNERS = 50
RUNS = 9  # pairs of runs; this VM changes speed within seconds: a median one slow phase does not decide
ARC = "2.999.77"
STATION_HCID, STATION_AA = f"urn:oid:{ARC}.1", f"{ARC}.1.1"
DEMOGRAPHICS = PatientDemographics(names=(PersonName(family=("Doe",), given=("Jane",)),), gender="F",
                                   birth_time="19800214")

log = Console(stderr=True, highlight=False, soft_wrap=True)


def _say(msg: str) -> None:
    log.print(f"[dim]\\[initiating {time.strftime('%H:%M:%S')}][/] {msg}")


def latency_ms(i: int) -> float:
    """Partner ``i``'s simulated latency: 100 ms … 500 ms, evenly spread."""
    return 100 + 400 * i / (PARTNERS - 1)


def partner_hcid(i: int) -> str:
    return f"urn:oid:{ARC}.100.{i}"


def gateway_toml(hcid: str, certs: CertSet, *, port: int = 0, extra: str = "") -> str:
    return common_gateway_toml(certs, hcid=hcid, port=port, extra='[database]\nurl = "sqlite:///xig.db"\n' + extra)


def partner_toml(name: str, hcid: str, base: str, *, timeout: float, rad75_too: bool = False) -> str:
    urls = f'xcpd_url = "{base}{XCPD.path}"\n'
    if rad75_too:
        urls += (f'xca_query_url = "{base}/ihe/xca/query"\nxca_retrieve_url = "{base}/ihe/xca/retrieve"\n'
                 f'xcai_retrieve_url = "{base}/ihe/xcai/retrieve"\n')
    return f'\n[[partners]]\nname = "{name}"\nhome_community_id = "{hcid}"\n{urls}timeout_seconds = {timeout}\n'


# -------------------------------------------------------------------------------------------------
# The 50 simulated partners (their own process: ``python -m bench.initiating serve[-light]-partners DIR PKI``)
# -------------------------------------------------------------------------------------------------

def serve_partners(work: Path, pki: Path) -> None:
    """Start :data:`PARTNERS` XIG servers, print their URLs as one JSON line, serve until stdin closes.

    All of them serve from *one* event loop (one thread): real partners run on their own machines, so
    50 loops in 50 threads fighting over one GIL would simulate partners slower than any real one.
    """
    from gateway.soap.schema import default_schemas
    from gateway.web.app import RequestContext, SoapResponse
    from gateway.web.server import GatewayServer, bind

    certs = CertSet(pki)  # the benchmark's PKI: the initiating side trusts the same CA
    schemas = default_schemas()

    def handler(i: int) -> Callable[[RequestContext], Awaitable[SoapResponse]]:
        hcid, delay = partner_hcid(i), latency_ms(i) / 1000

        async def iti55_nf(ctx: RequestContext) -> SoapResponse:
            query = iti55.parse_request(ctx.body)
            await anyio.sleep(delay)  # the simulated partner's own latency (its MPI lookup)
            oid = hcid.removeprefix("urn:oid:")
            return SoapResponse(iti55.build_response(query, iti55.NoMatch(), responder_device_id=f"{oid}.9",
                                                     home_community_id=hcid, assigning_authority=f"{oid}.1"))
        return iti55_nf

    servers: list[tuple[GatewayServer, socket.socket]] = []
    for i in range(PARTNERS):
        d = work / f"partner-{i}"
        d.mkdir(parents=True)
        (d / "xig.toml").write_text(gateway_toml(partner_hcid(i), certs))
        config = load_config(d / "xig.toml")
        servers.append((GatewayServer(config, {XCPD.transaction: handler(i)}, schemas=schemas),
                        bind(config.server.host, config.server.port)))

    async def serve_all() -> None:
        async with anyio.create_task_group() as tg:
            for server, sock in servers:
                tg.start_soon(server.serve, [sock])

    # a thread that is not the main one: uvicorn then leaves the signal handlers alone
    loop_thread = threading.Thread(target=lambda: anyio.run(serve_all), name="partners", daemon=True)
    loop_thread.start()
    try:
        for server, _ in servers:
            if not server.ready.wait(60):
                raise RuntimeError("a partner server did not start")
        print(json.dumps([f"https://127.0.0.1:{sock.getsockname()[1]}" for _, sock in servers]), flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
    finally:
        for server, _ in servers:
            server.request_stop()
        loop_thread.join(20)
        for _, sock in servers:
            sock.close()


def serve_light_partners(work: Path, pki: Path) -> None:
    """Like :func:`serve_partners`, but each partner is a thin mutual-TLS HTTP/1.1 server (asyncio + h11).

    Real partners answer from their own machines; here all 50 share this machine's two cores with the
    initiating side being measured, so a partner should cost as little CPU as a simulation can. Each
    partner still does the real mutual TLS handshake (client certificate required, issued by the
    benchmark CA), answers a valid PRPA_IN201306UV02 NF built by :func:`gateway.iti55.build_response`
    for the request it got (queryByParameter echoed, RelatesTo = the request's MessageID), its latency
    after the request arrived. The *first* request each partner receives (the warm-up run) goes through
    XIG's complete inbound pipeline (envelope, WS-Addressing Action, XUA assertion signature and
    attributes, schema) and gets a SOAP fault if anything is wrong; the measured runs skip that (it is
    what the "xig" farm of :func:`serve_partners` measures).
    """
    import h11

    from gateway.errors import SoapFault
    from gateway.security.tls import server_context
    from gateway.soap import ns, xml
    from gateway.soap.envelope import build_envelope, parse_envelope
    from gateway.soap.fault import build_fault_envelope
    from gateway.soap.schema import default_schemas
    from gateway.web.app import GatewayApp
    from gateway.web.server import bind

    certs = CertSet(pki)
    schemas = default_schemas()
    ctx = server_context(certs.gateway_cert, certs.gateway_key, certs.ca_cert)
    content_type = f'application/soap+xml; charset=UTF-8; action="{XCPD.response_action}"'.encode()

    def answer(i: int, app: GatewayApp | None, request_type: str, body: bytes) -> tuple[int, bytes]:
        try:
            if app is not None:  # the first request: XIG's full inbound checks
                envelope = app.inbound(XCPD, request_type, body)[0]
            else:
                envelope = parse_envelope(xml.parse(body))
            query = iti55.parse_request(envelope.body)
            hcid = partner_hcid(i)
            oid = hcid.removeprefix("urn:oid:")
            payload = iti55.build_response(query, iti55.NoMatch(), responder_device_id=f"{oid}.9",
                                           home_community_id=hcid, assigning_authority=f"{oid}.1")
            env = build_envelope(payload, action=XCPD.response_action, relates_to=envelope.addressing.message_id,
                                 to=ns.WSA_ANONYMOUS)
        except SoapFault as fault:
            return fault.status, xml.tostring(build_fault_envelope(fault), declaration=True)
        return 200, xml.tostring(env, declaration=True)

    async def partner(i: int, apps: list[GatewayApp | None], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = None, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:  # ConnectionClosed / PAUSED at EOF
                        return
                assert request is not None
                request_type = dict(request.headers).get(b"content-type", b"").decode()
                app, apps[i] = apps[i], None
                # the answer is built when it is due, not when the request came: 50 requests arrive within
                # ~100 ms, and building each answer then would queue the later ones behind the earlier
                # ones on this one loop — a delay no real partner (on its own machine) would add
                await asyncio.sleep(latency_ms(i) / 1000)
                status, data = answer(i, app, request_type, bytes(body))
                writer.write(conn.send(h11.Response(status_code=status, headers=[
                    (b"content-type", content_type), (b"content-length", str(len(data)).encode())])) or b"")
                writer.write(conn.send(h11.Data(data=data)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError, ssl.SSLError):
            pass
        finally:
            writer.close()

    configs = []
    for i in range(PARTNERS):
        d = work / f"partner-{i}"
        d.mkdir(parents=True)
        (d / "xig.toml").write_text(gateway_toml(partner_hcid(i), certs))
        configs.append(load_config(d / "xig.toml"))
    apps: list[GatewayApp | None] = [GatewayApp(c, {}, schemas=schemas) for c in configs]
    sockets = [bind(c.server.host, c.server.port) for c in configs]
    stop = threading.Event()

    async def serve_all() -> None:
        servers = [await asyncio.start_server(functools.partial(partner, i, apps), sock=sock, ssl=ctx,
                                              ssl_handshake_timeout=10)
                   for i, sock in enumerate(sockets)]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for server in servers:
            server.close()

    ready = threading.Event()
    loop_thread = threading.Thread(target=lambda: asyncio.run(serve_all()), name="partners", daemon=True)
    loop_thread.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the partner servers did not start")
        print(json.dumps([f"https://127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]), flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
    finally:
        stop.set()
        loop_thread.join(20)


class PartnerFarm:
    """The partners' process; ``urls[i]`` is partner ``i``'s base URL. ``kind``: "light" (thin mutual-TLS
    partners, :func:`serve_light_partners`) or "xig" (full XIG servers, :func:`serve_partners`)."""

    def __init__(self, work: Path, pki: Path, kind: str = "light") -> None:
        self.work = work
        self.pki = pki
        self.kind = kind
        self.urls: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> PartnerFarm:
        self._log = (self.work / "partners.log").open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "bench.initiating",
                                         "serve-partners" if self.kind == "xig" else "serve-light-partners",
                                         str(self.work), str(self.pki)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        env={**os.environ, "COLUMNS": "200"})
        atexit.register(self.stop)
        try:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()  # blocks until the 50 servers accept connections
            if not line:
                raise RuntimeError("the partners' process exited:\n" + (self.work / "partners.log").read_text()[-3000:])
            self.urls = json.loads(line)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        with contextlib.suppress(Exception):
            self._log.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fanout(work: Path) -> list[Result]:
    """Both partner farms: "light" (the goal's figure) and "xig" (50 full XIG servers in one process)."""
    certs = init_certs(work / "pki")
    _say(f"host speed: {host_speed()} (the fan-out is CPU-bound: its figures move with this)")
    return [*_fanout(work, certs, "light"), *_fanout(work, certs, "xig")]


def _fanout(work: Path, certs: CertSet, kind: str) -> list[Result]:
    from gateway.audit.assembly import audit_session
    from gateway.store.db import open_database
    from gateway.store.response_times import SqlResponseTimes
    from gateway.store.tables import partner_response_times

    (work / kind / "farm").mkdir(parents=True)
    with PartnerFarm(work / kind / "farm", work / "pki", kind) as farm:
        assert farm.process is not None
        partners = "".join(partner_toml(f"partner-{i:02d}", partner_hcid(i), url, timeout=10)
                           for i, url in enumerate(farm.urls))
        (work / kind / "ig").mkdir()
        (work / kind / "ig" / "xig.toml").write_text(gateway_toml(STATION_HCID, certs, extra=partners))
        config = load_config(work / kind / "ig" / "xig.toml")
        directory = PartnerDirectory.from_config(config)
        assert len(directory.partners("ITI-55")) == PARTNERS
        engine = open_database(config.database.url, config.base_dir)
        times = SqlResponseTimes(engine)

        me, them = psutil.Process(), psutil.Process(farm.process.pid)
        cpu: list[tuple[float, float]] = []

        def once(history: bool) -> float:
            if not history:  # a first fan-out: nothing recorded about these partners yet
                with engine.begin() as conn:
                    conn.execute(partner_response_times.delete())
            c0, f0 = sum(me.cpu_times()[:2]), sum(them.cpu_times()[:2])
            t0 = time.perf_counter()
            res = event_loop.run(discover_all(config, directory, DEMOGRAPHICS, local_patient_id="BENCH-1",
                                              response_times=times),
                                 config.server.event_loop)  # as `xig discover` runs it
            wall = time.perf_counter() - t0
            bad = {n: r.summary() for n, r in res.partners.items()
                   if r.outcome is None or r.outcome.status != "no-match"}
            if len(res.partners) != PARTNERS or bad:
                raise RuntimeError(f"fan-out: {len(bad)} of {len(res.partners)} partners did not answer NF: "
                                   f"{dict(list(bad.items())[:3])}")
            cpu.append(((sum(me.cpu_times()[:2]) - c0) * 1000, (sum(them.cpu_times()[:2]) - f0) * 1000))
            return wall * 1000

        try:
            with audit_session(config, engine):  # every request audited, as `xig discover` does
                warm = once(history=False)  # light farm: each partner checks this first request with XIG's pipeline
                cold: list[float] = []
                walls: list[float] = []
                with rad75.Contention() as other:
                    for _ in range(RUNS):  # interleaved, so both see the same VM speed
                        cold.append(once(history=False))
                        walls.append(once(history=True))
        finally:
            engine.dispose()
    slowest = latency_ms(PARTNERS - 1)
    best, median, cold_median = min(walls), statistics.median(walls), statistics.median(cold)
    mine, farms = statistics.median(c for c, _ in cpu[1:]), statistics.median(f for _, f in cpu[1:])
    _say(f"XCPD fan-out to {PARTNERS} {kind} partners ({latency_ms(0):.0f}–{slowest:.0f} ms): warm-up {warm:.0f} ms; "
         f"with response-time history {', '.join(f'{w:.0f}' for w in walls)} ms → best {best:.0f} ms "
         f"(+{best - slowest:.0f} ms over the slowest), median {median:.0f} ms (+{median - slowest:.0f} ms); "
         f"first fan-out (no history) {', '.join(f'{w:.0f}' for w in cold)} ms → median {cold_median:.0f} ms "
         f"(+{cold_median - slowest:.0f} ms); goal ≤ +150 ms; CPU per run: initiating side {mine:.0f} ms, the "
         f"partners' process {farms:.0f} ms ({other})")
    name = f"XCPD fan-out, {PARTNERS} {kind} partners 100–500 ms, mTLS+SAML"
    # ratio = wall / slowest (the table's ratio is value / reference); reference/wall = 1 / ratio
    rows = [Result(f"{name}: wall, median of {RUNS} / slowest partner", median, slowest, "ms"),
            Result(f"{name}: overhead over slowest, median of {RUNS} / goal 150 ms", median - slowest, 150.0, "ms"),
            Result(f"{name}, first fan-out (no response-time history): overhead, median of {RUNS} / goal 150 ms",
                   cold_median - slowest, 150.0, "ms")]
    if kind == "light":
        rows.insert(0, Result(f"{name}: wall, best of {RUNS} / slowest partner", best, slowest, "ms"))
    return rows


# -------------------------------------------------------------------------------------------------
# Import station peak RSS on a 2 GB pull
# -------------------------------------------------------------------------------------------------

def _run_measured(cmd: list[str], cwd: Path, stdout: IO[bytes], stderr: IO[bytes],
                  interval: float = 0.01) -> tuple[int, int, int, float]:
    """Run ``cmd``; (exit code, kernel peak RSS, sampled peak RSS, seconds). Killed on any error."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            env={**os.environ, "COLUMNS": "200"})
    sampled = hwm = 0
    stop = threading.Event()
    status_file = Path(f"/proc/{proc.pid}/status")

    def sample() -> None:
        nonlocal sampled, hwm
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                sampled = max(sampled, p.memory_info().rss)
                # VmHWM: the kernel peak of the process's own (post-exec) memory, until its last sample
                for line in status_file.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
                stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        # not ru_maxrss: with vfork/posix_spawn it includes this (parent) process's RSS at spawn time
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
        raise
    finally:
        stop.set()
        thread.join(5)
    return proc.returncode, hwm, sampled, time.perf_counter() - t0


def _tree_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def pull_rss(orthanc: OrthancServer, work: Path, spec: rad75.StudySpec) -> list[Result]:
    certs = init_certs(work / "pki")
    # one Orthanc WADO-RS of the 2 GB study: the throughput reference
    assert orthanc.process is not None
    wado = rad75._wado_once(f"{orthanc.dicomweb_url}/studies/{spec.study_uid}", spec, work, orthanc.process.pid).rate
    _say(f"reference: Orthanc WADO-RS of {spec.instances} instances {wado:.0f} MB/s")
    with rad75.GatewayProcess(work / "responder", certs, rad75.pacs_section("dicomweb", orthanc), "last") as gw:
        station = work / "station"
        station.mkdir()
        (station / "xig.toml").write_text(gateway_toml(
            STATION_HCID, certs, extra=partner_toml("Bench community", rad75.HCID, gw.url, timeout=900,
                                                    rad75_too=True)))
        cli = [sys.executable, "-m", "gateway.cli"]
        with (station / "help.out").open("wb") as out:
            code, idle, _, _ = _run_measured([*cli, "--help"], station, out, subprocess.STDOUT)  # type: ignore[arg-type]
        if code != 0:
            raise RuntimeError(f"xig --help exited with {code}")
        family, given = "Bench", "Ben"
        cmd = [*cli, "pull-priors", "--config", str(station / "xig.toml"), "--family", family, "--given", given,
               "--birth-date", "19600101", "--gender", "M", "--local-id", "BENCH-LOCAL-1", "--yes", "--json"]
        try:
            with (station / "pull.json").open("wb") as out, (station / "pull.log").open("wb") as err, \
                    rad75.Contention() as other:
                code, kernel, sampled, seconds = _run_measured(cmd, station, out, err)
            summary = (station / "pull.json").read_text()
            if code != 0:
                tail = (station / "pull.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pull-priors exited with {code}: {summary[-2000:]}\n{tail}")
            counts = json.loads(summary)["counts"]
            files, size = _tree_bytes(station / "pacs")
        finally:
            shutil.rmtree(station / "pacs", ignore_errors=True)  # the ~2.2 GB local PACS copy
    peak = max(kernel, sampled)
    mbps = size / MB / seconds
    _say(f"pull-priors: {counts} ({files} files, {size / MB:,.0f} MB) in {seconds:.1f} s = {mbps:.0f} MB/s; "
         f"peak RSS {peak / MB:.0f} MB (kernel {kernel / MB:.0f} MB, sampled {sampled / MB:.0f} MB); "
         f"`xig --help` peak {idle / MB:.0f} MB ({other})")
    what = f"pull-priors of {spec.mb / 1024:.1f} GB study (+{rad75.SMALL.mb:.0f} MB prior), DICOMweb responder"
    return [Result(f"Import station peak RSS (goal < 300 MB), {what} / `xig --help`", peak / MB, idle / MB, "MB"),
            Result(f"Import station throughput, {what} / Orthanc WADO-RS", mbps, wado, "MB/s")]


def run() -> list[Result]:
    t_start = time.perf_counter()
    large = os.environ.get("XIG_BENCH_LARGE", "1").strip().lower() not in ("0", "no", "false", "off")
    results: list[Result] = []
    work = Path(tempfile.mkdtemp(prefix="xig-bench-initiating-"))
    try:
        results += fanout(work / "fanout")
        if large:
            with rad75._cache_dir() as cache, rad75.orthanc_with([rad75.SMALL, rad75.LARGE], cache) as orthanc:
                (work / "pull").mkdir()
                results += pull_rss(orthanc, work / "pull", rad75.LARGE)
        else:
            _say("XIG_BENCH_LARGE=0: the import station's 2 GB pull (peak RSS, throughput) is skipped")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"done in {time.perf_counter() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-partners"]:
        serve_partners(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["serve-light-partners"]:
        serve_light_partners(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        for r in run():
            print(f"{r.name}: {r.value:.1f} {r.unit} vs {r.reference:.1f} {r.unit} → ratio {r.ratio:.2f}")
