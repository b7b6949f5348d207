"""Record and judge every SOAP request the simulated community receives (an ASGI middleware).

:class:`SimulatorMiddleware` sits in front of the responding gateway's routes. For each POST to one of
the four IHE endpoints it reads the raw request (headers and body bytes, up to the gateway's request size
limit), has it judged (:class:`~conformance.simulator.judge.Judge`, in a worker thread) and stores the
judgement in the :class:`Recorder` *before* the request is answered — so by the time an initiator has
its answer, the judgement exists. It then applies the request's faults (a delay, which ends early when
the initiator disconnects; a broken MTOM answer) and replays the request to the gateway, capturing what
goes back on the wire for the report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import anyio
import anyio.to_thread

from conformance.model import Check, Exchange, ScenarioResult
from conformance.simulator.faults import ACTIVE, FaultPlan, FaultSpec, break_mtom
from conformance.simulator.judge import Judge
from conformance.simulator.rules import TRANSACTION_CLAUSE
from gateway.errors import XIG_TOO_LARGE, sender_fault
from gateway.web.app import fault_response
from gateway.web.endpoints import ENDPOINTS, Endpoint

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: how much of each response body the report keeps
MAX_RESPONSE_CAPTURE: Final = 64 * 1024
BY_PATH: Final[dict[str, Endpoint]] = {e.path: e for e in ENDPOINTS}


class Recorder:
    """The judged requests, in arrival order (thread-safe); :meth:`wait_for` waits on answered ones.

    ``on_close`` is called (in the serving thread) with each result once its request was answered.
    """

    def __init__(self, on_close: Callable[[ScenarioResult], None] | None = None) -> None:
        self.on_close = on_close
        self._results: list[ScenarioResult] = []
        self._answered = 0
        self._cond = threading.Condition()

    def open(self, transaction: str, title: str, checks: list[Check], error: str | None = None) -> ScenarioResult:
        with self._cond:
            result = ScenarioResult(f"{transaction}#{len(self._results) + 1:04d}", title,
                                    TRANSACTION_CLAUSE[transaction], checks, error=error)
            self._results.append(result)
            self._cond.notify_all()
            return result

    def close(self, result: ScenarioResult, exchange: Exchange) -> None:
        with self._cond:
            result.exchanges.append(exchange)
            result.elapsed_ms = exchange.elapsed_ms
            self._answered += 1
            self._cond.notify_all()
        if self.on_close is not None:
            self.on_close(result)

    @property
    def results(self) -> list[ScenarioResult]:
        with self._cond:
            return list(self._results)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[ScenarioResult]:
        """The results once at least ``count`` requests have been answered (TimeoutError otherwise)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._answered >= count, timeout):
                raise TimeoutError(f"{self._answered} of {count} requests answered within {timeout:g} s")
            return list(self._results)


class _Capture:
    """Passes response messages on and keeps status, headers and the first bytes of the body."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status: int | None = None
        self.headers: tuple[tuple[str, str], ...] = ()
        self.body = bytearray()
        self.truncated = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            room = MAX_RESPONSE_CAPTURE - len(self.body)
            self.body += chunk[:max(room, 0)]
            self.truncated = self.truncated or len(chunk) > room
        await self.send(message)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _disconnected_within(receive: Receive, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as the client disconnects (an injected delay the initiator gave up on)."""
    gone = False
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await anyio.sleep(seconds)
        tg.cancel_scope.cancel()
    return gone


class SimulatorMiddleware:
    """ASGI middleware: judge, record, inject faults, replay to the gateway (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, judge: Judge, recorder: Recorder, plan: FaultPlan, max_body: int) -> None:
        self.app = app
        self.judge = judge
        self.recorder = recorder
        self.plan = plan
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = BY_PATH.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        body = await _read_body(receive, self.max_body)
        if body is None:
            fault = sender_fault(XIG_TOO_LARGE, f"request exceeds the limit of {self.max_body} bytes", status=413)
            return await fault_response(fault)(scope, receive, send)
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", []))
        faults = self.plan.take(endpoint.transaction)
        judgement = await anyio.to_thread.run_sync(self.judge.judge, endpoint, headers, body)
        injected = f" [injected: {'; '.join(f.describe() for f in faults)}]" if faults else ""
        result = self.recorder.open(endpoint.transaction, f"{endpoint.transaction} request from "
                                    f"{judgement.requester}{injected}", judgement.checks, judgement.error)
        host = next((v for k, v in headers if k.lower() == "host"), "")
        capture = _Capture(send)
        error: str | None = None
        try:
            error = await self._answer(scope, receive, capture, body, faults, started)
        finally:
            self.recorder.close(result, Exchange(
                transaction=endpoint.transaction, url=f"https://{host}{endpoint.path}", request_headers=headers,
                request_body=body, status=capture.status, response_headers=capture.headers,
                response_body=bytes(capture.body), truncated=capture.truncated,
                elapsed_ms=(time.perf_counter() - started) * 1000, error=error))

    async def _answer(self, scope: Scope, receive: Receive, send: Send, body: bytes,
                      faults: tuple[FaultSpec, ...], started: float) -> str | None:
        """Delay, then replay the request to the gateway; returns what went wrong on the way, if anything."""
        delay = next((f for f in faults if f.kind == "delay"), None)
        if delay is not None and await _disconnected_within(receive, delay.delay_ms / 1000):
            waited = (time.perf_counter() - started) * 1000
            return (f"the initiator disconnected after {waited:.0f} ms, during the injected {delay.delay_ms} ms "
                    "delay (it timed out)")
        broken = next((f for f in faults if f.kind == "broken-mtom" and f.mode != "missing-part"), None)
        out = break_mtom(send, broken.mode) if broken is not None else send
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        token = ACTIVE.set(faults)
        try:
            await self.app(scope, replay, out)
        finally:
            ACTIVE.reset(token)
        return None


__all__ = ["BY_PATH", "Recorder", "SimulatorMiddleware"]
