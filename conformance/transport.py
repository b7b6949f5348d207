"""Recording of raw HTTP exchanges: what went on the wire, so a failure can be shown to the partner.

:class:`RecordingTransport` wraps the real TLS transport of a :class:`~gateway.web.client.SoapClient`
(its ``wrap_transport`` hook). Every request is kept whole (requests are small); every response is
teed while the client consumes it as a stream, keeping at most ``limit`` bytes (a RAD-75 answer can be
gigabytes — the rest still streams to the client's sinks, and the capture is marked truncated).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

#: default number of response bytes kept per exchange
DEFAULT_LIMIT = 1024 * 1024


@dataclass
class Capture:
    """One HTTP exchange as seen on the wire (filled in while it happens)."""

    method: str
    url: str
    request_headers: tuple[tuple[str, str], ...]
    request_body: bytes
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    response_headers: tuple[tuple[str, str], ...] = ()
    response_body: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    finished: float | None = None
    error: str | None = None

    @property
    def elapsed_ms(self) -> float:
        end = self.finished if self.finished is not None else time.perf_counter()
        return (end - self.started) * 1000.0


class _TeeStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, capture: Capture, limit: int) -> None:
        self._inner = inner
        self._capture = capture
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        cap = self._capture
        try:
            async for chunk in self._inner:
                room = self._limit - len(cap.response_body)
                if room > 0:
                    cap.response_body += chunk[:room]
                if len(chunk) > max(room, 0):
                    cap.truncated = True
                yield chunk
        except Exception as exc:
            cap.error = cap.error or f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise

    async def aclose(self) -> None:
        self._capture.finished = time.perf_counter()
        await self._inner.aclose()


class RecordingTransport(httpx.AsyncBaseTransport):
    """Delegates to ``inner`` and appends a :class:`Capture` of every exchange to :attr:`captures`."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, limit: int = DEFAULT_LIMIT) -> None:
        self.inner = inner
        self.limit = limit
        self.captures: list[Capture] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        cap = Capture(request.method, str(request.url), tuple(request.headers.multi_items()), bytes(body))
        self.captures.append(cap)
        try:
            response = await self.inner.handle_async_request(request)
        except Exception as exc:
            cap.finished = time.perf_counter()
            cap.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise
        cap.status = response.status_code
        cap.response_headers = tuple(response.headers.multi_items())
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return httpx.Response(status_code=response.status_code, headers=response.headers,
                              stream=_TeeStream(stream, cap, self.limit), extensions=response.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()
