"""Faults the simulated community injects, per transaction, to see how an initiating gateway copes.

Kinds (``--fault TRANSACTION:KIND[=VALUE][,times=N]`` on the command line, ``[[faults]]`` in the fixture):

``delay`` (``delay_ms``, every transaction)
    The request is judged, then answered only after ``delay_ms``; if the initiator gives up first (its
    timeout) the simulator notices the disconnect and records it.
``soap-fault`` (``code`` Sender/Receiver, optional ``subcode`` such as ``wsse:FailedAuthentication``,
``reason``; every transaction)
    A SOAP 1.2 Fault instead of the answer.
``registry-error`` (``code``: an XDS errorCode, default ``XDSRegistryError``; ITI-38, ITI-39, RAD-75)
    ITI-38: an AdhocQueryResponse with status Failure and one RegistryError. ITI-39 / RAD-75: a
    RetrieveDocumentSetResponse with status Failure and one RegistryError per requested document.
``partial`` (``every`` = N, ``code`` default ``XDSDocumentUniqueIdError``; RAD-75)
    Every N-th requested instance is withheld with a RegistryError; the others are served by the real
    responder, so the answer is PartialSuccess (Failure when N is 1).
``broken-mtom`` (``mode``; ITI-39, RAD-75)
    ``truncate``: the MTOM body ends inside its second part (512 bytes past its delimiter), without the
    closing delimiter;
    ``bad-boundary``: the Content-Type names a boundary the body does not use; ``missing-part``: the
    root references an attachment that is not in the package.

``times`` limits a fault to the first N matching requests (default: all). The middleware decides the
faults of a request once (:class:`FaultPlan`) and hands the handler-level ones to the transaction
handlers through a context variable.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from lxml import etree

from gateway.errors import XIG_NS, FaultCode, QName, SoapFault
from gateway.ihe import iti38, iti39, rad75
from gateway.ihe.iti39 import DocumentFailure
from gateway.ihe.registry import SEVERITY_ERROR, RegistryError, RegistryErrorCode, registry_error_list, status_for
from gateway.soap import mtom, ns
from gateway.web.app import Handler, RequestContext, SoapResponse

FaultKind = Literal["delay", "soap-fault", "registry-error", "partial", "broken-mtom"]
MtomMode = Literal["truncate", "bad-boundary", "missing-part"]

TRANSACTIONS: Final = ("ITI-55", "ITI-38", "ITI-39", "RAD-75")
#: which transactions each kind applies to
APPLIES_TO: Final[dict[str, tuple[str, ...]]] = {
    "delay": TRANSACTIONS, "soap-fault": TRANSACTIONS, "registry-error": ("ITI-38", "ITI-39", "RAD-75"),
    "partial": ("RAD-75",), "broken-mtom": ("ITI-39", "RAD-75"),
}
_SUBCODE_NAMESPACES: Final = {"wsse": ns.WSSE, "wsa": ns.WSA, "xig": XIG_NS}
INJECTED_REASON: Final = "fault injected by the XIG conformance simulator"


@dataclass(frozen=True)
class FaultSpec:
    transaction: str
    kind: FaultKind
    delay_ms: int = 0
    #: soap-fault: Sender or Receiver; registry-error / partial: the errorCode
    code: str = ""
    #: soap-fault: ``prefix:local`` with prefix wsse, wsa or xig
    subcode: str = ""
    reason: str = ""
    #: partial: withhold every N-th instance
    every: int = 2
    mode: MtomMode = "truncate"
    #: only the first N matching requests (None: all)
    times: int | None = None

    def describe(self) -> str:
        code = f"{self.code} {self.subcode}".strip()
        value = {"delay": f"{self.delay_ms} ms", "soap-fault": code,
                 "registry-error": self.code, "partial": f"1 in {self.every} instances: {self.code}",
                 "broken-mtom": self.mode}[self.kind]
        times = f", first {self.times} request(s)" if self.times is not None else ""
        return f"{self.transaction} {self.kind} ({value}{times})"

    def soap_fault(self) -> SoapFault:
        subcode = None
        if self.subcode:
            prefix, local = self.subcode.split(":", 1)
            subcode = QName(_SUBCODE_NAMESPACES[prefix], local, prefix)
        return SoapFault(cast(FaultCode, self.code), self.reason or INJECTED_REASON, subcode)


def make_fault(transaction: str = "", kind: str = "", *, delay_ms: int | None = None, code: str | None = None,
               subcode: str | None = None, reason: str | None = None, every: int | None = None,
               mode: str | None = None, times: int | None = None) -> FaultSpec:
    """A validated :class:`FaultSpec`; ValueError (or TypeError for unknown fields) says what is wrong."""
    t = transaction.strip().upper()
    if t not in TRANSACTIONS:
        raise ValueError(f"transaction {transaction!r} is not one of {', '.join(TRANSACTIONS)}")
    if kind not in APPLIES_TO:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(APPLIES_TO)}")
    if t not in APPLIES_TO[kind]:
        raise ValueError(f"a {kind} fault applies to {', '.join(APPLIES_TO[kind])}, not {t}")
    if times is not None and (not isinstance(times, int) or times < 1):
        raise ValueError(f"times must be a positive whole number, got {times!r}")
    k = cast(FaultKind, kind)
    if k == "delay":
        if not isinstance(delay_ms, int) or not 0 < delay_ms <= 3_600_000:
            raise ValueError(f"a delay needs delay_ms between 1 and 3600000, got {delay_ms!r}")
        return FaultSpec(t, k, delay_ms=delay_ms, times=times)
    if k == "soap-fault":
        fault_code = code or "Receiver"
        if fault_code not in ("Sender", "Receiver"):
            raise ValueError(f"a soap-fault code is Sender or Receiver, got {fault_code!r}")
        if subcode:
            prefix, _, local = subcode.partition(":")
            if prefix not in _SUBCODE_NAMESPACES or not local.isidentifier():
                raise ValueError(f"subcode {subcode!r} must be prefix:Name with prefix "
                                 f"{', '.join(_SUBCODE_NAMESPACES)}")
        return FaultSpec(t, k, code=fault_code, subcode=subcode or "", reason=reason or "", times=times)
    if k == "registry-error":
        return FaultSpec(t, k, code=_error_code(code or "XDSRegistryError"), reason=reason or "", times=times)
    if k == "partial":
        n = 2 if every is None else every
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"every must be a positive whole number, got {every!r}")
        return FaultSpec(t, k, every=n, code=_error_code(code or "XDSDocumentUniqueIdError"), reason=reason or "",
                         times=times)
    modes = get_args(MtomMode)
    if mode not in modes:
        raise ValueError(f"a broken-mtom mode is one of {', '.join(modes)}, got {mode!r}")
    return FaultSpec(t, k, mode=cast(MtomMode, mode), times=times)


def _error_code(code: str) -> str:
    known = {c.value for c in RegistryErrorCode}
    if code not in known:
        raise ValueError(f"errorCode {code!r} is not an XDS error code ({', '.join(sorted(known))})")
    return code


#: the key the value after ``=`` sets, per kind
_SHORT_VALUE: Final = {"delay": "delay_ms", "soap-fault": "code", "registry-error": "code", "partial": "every",
                       "broken-mtom": "mode"}
_INT_FIELDS: Final = {"delay_ms", "every", "times"}


def parse_fault(text: str) -> FaultSpec:
    """``TRANSACTION:KIND[=VALUE][,key=value...]``, e.g. ``ITI-38:delay=1500``, ``RAD-75:partial=2,times=1``,
    ``ITI-55:soap-fault=Sender,subcode=wsse:FailedAuthentication``. ValueError explains a bad one."""
    head, _, rest = text.strip().partition(",")
    transaction, sep, kind_value = head.partition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected TRANSACTION:KIND[=VALUE], e.g. ITI-38:delay=1500")
    kind, _, value = kind_value.partition("=")
    fields: dict[str, Any] = {}
    if value:
        fields[_SHORT_VALUE.get(kind, "value")] = value
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"{text!r}: {item!r} is not key=value")
        fields[key.strip()] = val.strip()
    allowed = {f.name for f in dataclasses.fields(FaultSpec)} - {"transaction", "kind"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"{text!r}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in _INT_FIELDS & set(fields):
        try:
            fields[key] = int(fields[key])
        except ValueError:
            raise ValueError(f"{text!r}: {key} must be a whole number, got {fields[key]!r}") from None
    try:
        return make_fault(transaction, kind, **fields)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


class FaultPlan:
    """Which faults apply to the next request of a transaction (thread-safe; honours ``times``)."""

    def __init__(self, faults: Sequence[FaultSpec] = ()) -> None:
        self.faults = list(faults)
        self._used = [0] * len(self.faults)
        self._lock = threading.Lock()

    def replace(self, faults: Sequence[FaultSpec]) -> None:
        """Inject ``faults`` from now on instead of the current ones (their ``times`` counted afresh)."""
        with self._lock:
            self.faults = list(faults)
            self._used = [0] * len(self.faults)

    def take(self, transaction: str) -> tuple[FaultSpec, ...]:
        chosen: list[FaultSpec] = []
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.transaction == transaction and (f.times is None or self._used[i] < f.times):
                    self._used[i] += 1
                    chosen.append(f)
        return tuple(chosen)


# --------------------------------------------------------------------------------------------------
# Handler level: soap-fault, registry-error, partial, broken-mtom missing-part
# --------------------------------------------------------------------------------------------------

#: the faults of the request being handled (set by the simulator's middleware)
ACTIVE: ContextVar[tuple[FaultSpec, ...]] = ContextVar("xig_simulator_faults", default=())


def _one(faults: Sequence[FaultSpec], kind: str) -> FaultSpec | None:
    return next((f for f in faults if f.kind == kind), None)


def _document_requests(transaction: str, body: etree._Element) -> list[iti39.DocumentRequest]:
    if transaction == "RAD-75":
        return rad75.parse_request(body).document_requests
    return iti39.parse_request(body)


def registry_error_body(transaction: str, body: etree._Element, fault: FaultSpec, hcid: str) -> etree._Element:
    """The Failure answer of a ``registry-error`` fault."""
    context = fault.reason or f"{fault.code} ({INJECTED_REASON})"
    if transaction == "ITI-38":
        return iti38.build_response([], return_type="LeafClass", home_community_id=hcid,
                                    errors=[RegistryError(fault.code, context, hcid)])
    failures = [DocumentFailure(r, fault.code, context) for r in _document_requests(transaction, body)]
    root, _ = iti39.build_response(failures, home_community_id=hcid)
    return root


def add_registry_errors(root: etree._Element, errors: Sequence[RegistryError], hcid: str) -> etree._Element:
    """Add Error RegistryErrors to a RetrieveDocumentSetResponse and recompute its status."""
    rr = root.find(ns.q(ns.RS, "RegistryResponse"))
    if rr is None or not errors:
        return root
    new = registry_error_list(errors, hcid)
    existing = rr.find(ns.q(ns.RS, "RegistryErrorList"))
    if existing is None:
        rr.append(new)
    else:
        for e in list(new):
            existing.append(e)
        existing.set("highestSeverity", SEVERITY_ERROR)
    n_ok = len(root.findall(ns.q(ns.XDSB, "DocumentResponse")))
    n_err = sum(1 for e in rr.iter(ns.q(ns.RS, "RegistryError")) if e.get("severity", SEVERITY_ERROR) == SEVERITY_ERROR)
    rr.set("status", status_for(n_ok, n_err))
    return root


async def _partial(ctx: RequestContext, handler: Handler, fault: FaultSpec, hcid: str) -> SoapResponse:
    request = rad75.parse_request(ctx.body)
    items = list(rad75.iter_document_requests(request))
    kept = [item for i, item in enumerate(items) if (i + 1) % fault.every != 0]
    context = fault.reason or f"instance withheld ({INJECTED_REASON})"
    failures = [DocumentFailure(d, fault.code, context) for i, (_, _, d) in enumerate(items)
                if (i + 1) % fault.every == 0]
    if not kept:
        root, _ = iti39.build_response(failures, home_community_id=hcid)
        return SoapResponse(root)
    body = rad75.build_request(rad75.imaging_request(kept, request.transfer_syntaxes))
    reduced = dataclasses.replace(ctx, envelope=dataclasses.replace(ctx.envelope, body=body))
    response = await handler(reduced)
    errors = [f.registry_error(hcid) for f in failures]
    if response.body is not None:
        add_registry_errors(response.body, errors, hcid)
    if response.body_after is not None:
        late = response.body_after
        response.body_after = lambda: add_registry_errors(late(), errors, hcid)
    return response


async def _without_first_part(parts: Sequence[mtom.Part] | AsyncIterable[mtom.Part]) -> AsyncIterator[mtom.Part]:
    skipped = False
    if isinstance(parts, AsyncIterable):
        async for p in parts:
            if skipped:
                yield p
                continue
            skipped = True
            if isinstance(p.body, AsyncIterable):  # let the producer finish this instance
                async for _ in p.body:
                    pass
        return
    for p in list(parts)[1:]:
        yield p


def with_faults(transaction: str, handler: Handler, hcid: str) -> Handler:
    """``handler`` with the handler-level faults of :data:`ACTIVE` applied."""
    async def run(ctx: RequestContext) -> SoapResponse:
        faults = ACTIVE.get()
        soap = _one(faults, "soap-fault")
        if soap is not None:
            raise soap.soap_fault()
        registry = _one(faults, "registry-error")
        if registry is not None:
            return SoapResponse(registry_error_body(transaction, ctx.body, registry, hcid))
        partial = _one(faults, "partial")
        response = await (_partial(ctx, handler, partial, hcid) if partial is not None else handler(ctx))
        broken = _one(faults, "broken-mtom")
        if broken is not None and broken.mode == "missing-part":
            response.attachments = _without_first_part(response.attachments)
        return response
    return run


# --------------------------------------------------------------------------------------------------
# ASGI level: broken-mtom truncate / bad-boundary
# --------------------------------------------------------------------------------------------------

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class _Truncator:
    """Cuts a multipart stream inside its second part, ``AFTER`` bytes past its delimiter (or, for a shorter
    message, before its last bytes): a download broken off mid-part, without the closing delimiter."""

    AFTER: Final = 512

    def __init__(self, boundary: bytes) -> None:
        self.token = b"--" + boundary
        self.hold = len(self.token) + 64
        self.held = bytearray()
        self.pos = 0  #: stream offset of held[0]
        self.scan_from = 0
        self.seen = 0
        self.cut: int | None = None

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """``(bytes to send now, finished)``."""
        self.held += data
        if self.cut is None:
            start = self.scan_from - self.pos
            while (i := self.held.find(self.token, start)) >= 0:
                self.seen += 1
                if self.seen == 2:
                    self.cut = self.pos + i + len(self.token) + self.AFTER
                    break
                start = i + len(self.token)
            else:
                self.scan_from = self.pos + max(start, len(self.held) - len(self.token) + 1)
        if self.cut is not None and self.pos + len(self.held) >= self.cut:
            out = bytes(self.held[:self.cut - self.pos])
            self.held.clear()
            return out, True
        n = max(len(self.held) - self.hold, 0)
        out = bytes(self.held[:n])
        del self.held[:n]
        self.pos += n
        return out, False


def break_mtom(send: Send, mode: MtomMode) -> Send:
    """Wrap an ASGI ``send`` so an MTOM (multipart/related) response is broken as ``mode`` says."""
    state: dict[str, Any] = {"truncator": None, "done": False}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", [])]
            ctype = next((v.decode("latin-1") for k, v in headers if k.lower() == b"content-type"), "")
            parsed = mtom.parse_content_type(ctype)
            boundary = parsed.get("boundary")
            if parsed.media_type != mtom.MULTIPART_RELATED or not boundary:
                return await send(message)
            if mode == "bad-boundary":
                broken = ctype.replace(boundary, "broken" + boundary, 1)
                headers = [(k, broken.encode("latin-1") if k.lower() == b"content-type" else v) for k, v in headers]
            elif mode == "truncate":
                state["truncator"] = _Truncator(boundary.encode("ascii"))
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            return await send({**message, "headers": headers})
        truncator: _Truncator | None = state["truncator"]
        if message["type"] != "http.response.body" or truncator is None:
            return await send(message)
        if state["done"]:
            return None  # the broken message has ended; the rest of the producer's output is dropped
        out, finished = truncator.feed(bytes(message.get("body", b"")))
        more = bool(message.get("more_body", False)) and not finished
        state["done"] = not more
        return await send({"type": "http.response.body", "body": out, "more_body": more})

    return wrapped


__all__ = [
    "ACTIVE", "APPLIES_TO", "TRANSACTIONS", "FaultKind", "FaultPlan", "FaultSpec", "MtomMode", "add_registry_errors",
    "break_mtom", "make_fault", "parse_fault", "registry_error_body", "with_faults",
]
