"""Transaction handlers: from an authenticated :class:`RequestContext` to the responding services."""

from __future__ import annotations

from gateway.responding.assembly import RespondingServices
from gateway.web.app import Handler, RequestContext, SoapResponse
from gateway.web.endpoints import XCA_QUERY, XCA_RETRIEVE, XCAI_RETRIEVE, XCPD


def responding_handlers(services: RespondingServices) -> dict[str, Handler]:
    async def iti55(ctx: RequestContext) -> SoapResponse:
        return SoapResponse(await services.discovery.respond(ctx.body, ctx.identity))

    async def iti38(ctx: RequestContext) -> SoapResponse:
        return SoapResponse(await services.query.respond(ctx.body))

    async def iti39(ctx: RequestContext) -> SoapResponse:
        body, parts = await services.retrieve.respond(ctx.body, ctx.identity)
        return SoapResponse(body, parts)

    async def rad75(ctx: RequestContext) -> SoapResponse:
        body, parts, body_after = await services.imaging.respond(ctx.body, ctx.identity)
        return SoapResponse(body, parts, body_after)

    return {XCPD.transaction: iti55, XCA_QUERY.transaction: iti38, XCA_RETRIEVE.transaction: iti39,
            XCAI_RETRIEVE.transaction: rad75}
