"""Transaction handlers: from an authenticated :class:`RequestContext` to the responding services,
and the observers that audit each exchange once it is over."""

from __future__ import annotations

from gateway.audit.auditor import Auditor, current_requestor
from gateway.audit.events import Requestor
from gateway.errors import SoapFault
from gateway.responding.assembly import RespondingServices
from gateway.web.app import Handler, RequestContext, SoapResponse
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD
from gateway.web.exchange import Exchange, LifecycleEvent, TlsFailure


def responding_handlers(services: RespondingServices) -> dict[str, Handler]:
    def acting_for(ctx: RequestContext) -> None:
        # the request's own task: PACS legs made while serving it (streaming included) are audited for this user
        current_requestor.set(Requestor.from_identity(ctx.identity))

    async def iti55(ctx: RequestContext) -> SoapResponse:
        acting_for(ctx)
        return SoapResponse(await services.discovery.respond(ctx.body, ctx.identity))

    async def iti38(ctx: RequestContext) -> SoapResponse:
        acting_for(ctx)
        return SoapResponse(await services.query.respond(ctx.body))

    async def iti39(ctx: RequestContext) -> SoapResponse:
        acting_for(ctx)
        body, parts = await services.retrieve.respond(ctx.body, ctx.identity)
        return SoapResponse(body, parts)

    async def rad75(ctx: RequestContext) -> SoapResponse:
        acting_for(ctx)
        body, parts, body_after = await services.imaging.respond(ctx.body, ctx.identity)
        return SoapResponse(body, parts, body_after)

    return {XCPD.transaction: iti55, XCA_QUERY.transaction: iti38, XCA_RETRIEVE.transaction: iti39,
            XCAI_RETRIEVE.transaction: rad75}


def _fault_parts(fault: SoapFault | None) -> tuple[str | None, str | None, str | None]:
    if fault is None:
        return None, None, None
    code = str(fault.subcode) if fault.subcode else fault.code
    return code, fault.reason, fault.subcode.namespace if fault.subcode else None


class ExchangeAuditor:
    """Audits every exchange of a serving gateway: SOAP requests, refused TLS clients, start and stop.

    Observers are called in the serving loop; the :class:`Auditor` is a background one (``background=True``),
    so building and storing the messages never makes the loop wait."""

    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor

    def __call__(self, exchange: Exchange) -> None:
        envelope = exchange.envelope
        code, reason, namespace = _fault_parts(exchange.fault)
        if exchange.rejected is not None and exchange.fault is None:
            code, reason = "busy", f"refused by the {exchange.rejected} concurrency limit"
        if not exchange.completed and exchange.fault is None:
            code, reason = code or "aborted", reason or "the response was not completely sent"
        self.auditor.inbound(transaction=exchange.transaction, path=exchange.endpoint.path,
                             when=exchange.started_at, peer_host=exchange.peer_host,
                             reply_to=envelope.addressing.reply_to if envelope else None,
                             identity=exchange.identity, request=envelope.body if envelope else None,
                             response=exchange.response_body, fault_code=code, fault_reason=reason,
                             fault_namespace=namespace)

    def tls_failure(self, failure: TlsFailure) -> None:
        self.auditor.authentication_failure(peer_host=failure.peer_host, when=failure.when, kind="node",
                                            reason=f"TLS handshake refused: {failure.reason}")

    def lifecycle(self, event: LifecycleEvent) -> None:
        if event in ("started", "stopped"):
            self.auditor.application(event == "started")
