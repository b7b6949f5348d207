"""Graceful shutdown over real TLS with the real RAD-75 pipeline (embedded PACS, spool, ledger).

The PACS is made slow by a gate in front of the real filesystem backend: a retrieval stops before
the instance the test chooses until the test opens the gate (explicit signals, no sleeps). The
helpers here are shared with ``test_limits.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from lxml import etree

from gateway.config import Config, load_config
from gateway.dicom.kos import parse_kos
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.ihe import ebrim, iti38, iti39, rad75
from gateway.ihe.iti39 import DocumentRequest
from gateway.pacs.base import InstanceRef, PacsBackend, RetrievedInstance, RetrieveFailure
from gateway.security.certs import CertSet
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import mtom
from gateway.web.client import SoapClient, SoapReply, TransportError
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE
from gateway.web.exchange import Exchange
from gateway.web.server import BackgroundServer
from tests.conftest import IHE_TEST_IDS, write_config

HCID = IHE_TEST_IDS["home_community_id"]
AA = IHE_TEST_IDS["assigning_authority"]
REPO = IHE_TEST_IDS["repository_unique_id"]
SOURCE = IHE_TEST_IDS["imaging_source_id"]
EVRLE = "1.2.840.10008.1.2.1"
BUSY = "XDSRepositoryBusy"


# -- shared helpers ---------------------------------------------------------------------------------
class Gate:
    """Holds PACS retrievals (in the server's event loop) until the test opens it; counts arrivals."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.arrived = 0
        self._open = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def pass_(self) -> None:
        event = asyncio.Event()
        with self._cond:
            self.arrived += 1
            self._cond.notify_all()
            if self._open:
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        await event.wait()

    def open(self) -> None:
        with self._cond:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def wait_arrivals(self, n: int, timeout: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.arrived >= n, timeout)

    async def arrivals(self, n: int) -> None:
        assert await anyio.to_thread.run_sync(self.wait_arrivals, n), f"only {self.arrived} of {n} retrievals arrived"


class GatedPacs:
    """A real PACS backend behind a gate: ``retrieve`` waits at the gate before instance ``hold_before``."""

    def __init__(self, inner: PacsBackend, gate: Gate, hold_before: int = 0) -> None:
        self.inner, self.gate, self.hold_before = inner, gate, hold_before
        self.source_id = inner.source_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        n = 0
        async for item in self.inner.retrieve(refs):
            if n == self.hold_before:
                await self.gate.pass_()
            n += 1
            yield item


class Recorder:
    """An exchange observer the test can wait on (observers run in the server thread)."""

    def __init__(self) -> None:
        self.items: list[Exchange] = []
        self._cond = threading.Condition()

    def __call__(self, exchange: Exchange) -> None:
        with self._cond:
            self.items.append(exchange)
            self._cond.notify_all()

    async def wait(self, n: int, timeout: float = 60.0) -> list[Exchange]:
        def until() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.items) >= n, timeout)

        assert await anyio.to_thread.run_sync(until), f"only {len(self.items)} of {n} exchanges observed"
        return list(self.items)


def imaging_gateway(tmp_path: Path, pki: CertSet, *, root: str = "first", hold_before: int = 0,
                    limits: str = "", server_extra: str = "", instances: int = 3,
                    **server_kw: Any) -> tuple[Config, BackgroundServer, Gate, SyntheticStudy]:
    """A started responding gateway whose embedded PACS holds a study of ``instances`` CT images behind a gate."""
    (tmp_path / "gw" / "spool").mkdir(parents=True)
    extra = (f'[database]\nurl = "sqlite:///xig.db"\n[responder]\nrad75_root_part = "{root}"\nspool_dir = "spool"\n'
             f'[limits]\n{limits}\n')
    cfg = load_config(write_config(tmp_path / "gw", pki, ids=IHE_TEST_IDS, extra=extra, server_extra=server_extra))
    server = BackgroundServer(cfg, **server_kw)
    store = server.services.community.backends[0]
    study = make_study(tmp_path / "in", patient_id="SHUT-1", patient_name="Stop^Sam", birth_date="19600101",
                       sex="M", series=(("CT", instances, "CHEST"),), seed="shutdown")
    assert store.index_directory(tmp_path / "in").ok
    gate = Gate()
    server.services.community.backends[0] = GatedPacs(store, gate, hold_before)
    return cfg, server.start(), gate, study


def partner_client(pki: CertSet, cert: Path | None = None, key: Path | None = None) -> SoapClient:
    return SoapClient(client_context(cert or pki.partner_cert, key or pki.partner_key, pki.ca_cert))


async def soap(client: SoapClient, cfg: Config, url: str, body: etree._Element, action: str, **kw: Any) -> SoapReply:
    return await client.call(url, body, action, security=security_header(cfg, url), **kw)


async def authorize(client: SoapClient, cfg: Config, base: str) -> list[tuple[str, str, str]]:
    """ITI-38 + ITI-39 (the KOS delivery authorises RAD-75); the (study, series, sop) of every instance."""
    q = iti38.build_query(iti38.find_documents_for_kos(ebrim.CX("SHUT-1", AA)))
    reply = await soap(client, cfg, base + XCA_QUERY.path, q, XCA_QUERY.request_action)
    entries = iti38.parse_response(reply.body).entries
    assert len(entries) == 1
    req = iti39.build_request([DocumentRequest(HCID, REPO, entries[0].unique_id)])
    reply = await soap(client, cfg, base + XCA_RETRIEVE.path, req, XCA_RETRIEVE.request_action, use_mtom=True)
    doc = iti39.parse_response(reply.body, reply.attachments).documents[0]
    kos = parse_kos(doc.data if doc.data is not None else doc.attachment)
    return [(r.study_uid, r.series_uid, r.sop_instance_uid) for r in kos.references]


def rad75_body(items: list[tuple[str, str, str]]) -> etree._Element:
    return rad75.build_request(rad75.imaging_request(
        [(st, se, DocumentRequest(HCID, SOURCE, sop)) for st, se, sop in items], [EVRLE]))


async def rad75_call(client: SoapClient, cfg: Config, base: str, items: list[tuple[str, str, str]],
                     out: Path | None = None) -> SoapReply:
    sink = (lambda _: mtom.FileSink(out)) if out is not None else None
    return await soap(client, cfg, base + XCAI_RETRIEVE.path, rad75_body(items), XCAI_RETRIEVE.request_action,
                      use_mtom=True, sink_factory=sink)


def spooled(cfg: Config) -> list[Path]:
    assert cfg.responder.spool_dir is not None
    return sorted(cfg.responder.spool_dir.rglob("*"))


def open_spool_files(cfg: Config) -> list[str]:
    """Files in the spool folder this process holds open — also unnamed ones (O_TMPFILE, "(deleted)")."""
    assert cfg.responder.spool_dir is not None
    folder = str(cfg.responder.spool_dir.resolve())
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(folder + "/"):
            out.append(target)
    return out


class Lifecycle:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.stopping = threading.Event()

    def __call__(self, event: str) -> None:
        self.events.append(event)
        if event == "stopping":
            self.stopping.set()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


# -- tests ------------------------------------------------------------------------------------------
async def test_inflight_retrieval_finishes_during_graceful_stop(tmp_path: Path, pki: CertSet) -> None:
    recorder, lifecycle = Recorder(), Lifecycle()
    cfg, server, gate, study = imaging_gateway(tmp_path, pki, observers=[recorder],
                                               lifecycle_observers=[lifecycle])
    assert lifecycle.events == ["started"]
    try:
        async with partner_client(pki) as client:
            items = await authorize(client, cfg, server.url)
            out = tmp_path / "images"
            out.mkdir()
            call = asyncio.create_task(rad75_call(client, cfg, server.url, items, out))
            await gate.arrivals(1)  # the retrieval is in the PACS
            stopper = asyncio.create_task(anyio.to_thread.run_sync(server.stop))
            assert await anyio.to_thread.run_sync(lifecycle.stopping.wait, 30)
            assert refused(server.port)  # no new connections once stopping
            assert not stopper.done()  # ... but the stop waits for the request in flight
            gate.open()
            reply = await call
            await stopper
    finally:
        gate.open()
        server.stop()
    assert reply.fault is None
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":Success") and len(res.documents) == len(study.instances)
    assert all(Path(d.attachment).stat().st_size > 0 for d in res.documents)
    assert lifecycle.events == ["started", "stopping", "stopped"]
    last = recorder.items[-1]
    assert last.transaction == "RAD-75" and last.completed and last.outcome == "ok"
    assert spooled(cfg) == []


async def test_retrieval_past_the_shutdown_timeout_is_aborted_and_spool_removed(tmp_path: Path, pki: CertSet) -> None:
    """Root-first RAD-75 spools instance 1, then the PACS stalls; the stop's 1 s grace runs out: the
    handler is cancelled, its spool directory removed, and the partner gets a busy answer."""
    recorder = Recorder()
    cfg, server, gate, _ = imaging_gateway(tmp_path, pki, hold_before=1, server_extra="shutdown_timeout = 1.0",
                                           observers=[recorder])
    try:
        async with partner_client(pki) as client:
            items = await authorize(client, cfg, server.url)
            call = asyncio.create_task(rad75_call(client, cfg, server.url, items))
            await gate.arrivals(1)
            assert open_spool_files(cfg), "the first instance is in the spool"  # the half-way state
            await anyio.to_thread.run_sync(server.stop)
            reply = await call
    finally:
        gate.open()
        server.stop()
    res = rad75.parse_response(reply.body, reply.attachments)
    assert res.status.endswith(":Failure") and res.documents == []
    assert [e.code for e in res.errors] == [BUSY] and "shutting down" in res.errors[0].context
    assert spooled(cfg) == [] and open_spool_files(cfg) == []  # no half-written file left behind, none open
    last = (await recorder.wait(3))[-1]
    assert last.transaction == "RAD-75" and last.rejected == "shutdown" and last.outcome == "busy"


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_stream_cut_off_at_shutdown_never_looks_complete(tmp_path: Path, pki: CertSet, loop_kind: str) -> None:
    """Root-last RAD-75 streams instance 1 and stalls: at the timeout the connection is closed mid-package."""
    recorder = Recorder()
    cfg, server, gate, _ = imaging_gateway(tmp_path, pki, root="last", hold_before=1,
                                           server_extra=f'shutdown_timeout = 1.0\nevent_loop = "{loop_kind}"',
                                           observers=[recorder])
    out = tmp_path / "images"
    out.mkdir()
    try:
        async with partner_client(pki) as client:
            items = await authorize(client, cfg, server.url)
            call = asyncio.create_task(rad75_call(client, cfg, server.url, items, out))
            await gate.arrivals(1)
            await anyio.to_thread.run_sync(server.stop)
            with pytest.raises(TransportError):
                await call
    finally:
        gate.open()
        server.stop()
    last = (await recorder.wait(3))[-1]
    assert last.transaction == "RAD-75" and not last.completed and last.outcome == "aborted"
    assert last.bytes_out > 0 and last.response_body is None  # the root (with the status) was never sent


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_idle_keepalive_connection_does_not_delay_stop(tmp_path: Path, pki: CertSet, loop_kind: str) -> None:
    cfg, server, gate, _ = imaging_gateway(tmp_path, pki,
                                           server_extra=f'shutdown_timeout = 60.0\nevent_loop = "{loop_kind}"')
    ctx = client_context(pki.partner_cert, pki.partner_key, pki.ca_cert)
    try:
        async with httpx.AsyncClient(verify=ctx) as http:
            assert (await http.get(server.url + "/health")).status_code == 200  # leaves an idle pooled connection
            started = time.monotonic()
            await anyio.to_thread.run_sync(server.stop)
            elapsed = time.monotonic() - started
            with pytest.raises(httpx.TransportError):
                await http.get(server.url + "/health")
    finally:
        gate.open()
        server.stop()
    assert elapsed < 3, f"stop took {elapsed:.1f} s with an idle keep-alive connection (timeout 60 s)"
