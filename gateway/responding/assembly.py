"""The composition root of a responding gateway: database, PACS backends, ledger, services."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from gateway.audit.auditor import Auditor
from gateway.audit.trail import AuditTrail
from gateway.config import Config, FilesystemPacs
from gateway.pacs.factory import open_backends
from gateway.responding.community import Community
from gateway.responding.discovery import DiscoveryService
from gateway.responding.imaging import ImagingService
from gateway.responding.query import QueryService
from gateway.responding.retrieve import RetrieveService
from gateway.store.db import open_database
from gateway.store.ledger import SqlLedger, SqlPatientLinks


@dataclass
class RespondingServices:
    config: Config
    engine: Engine
    community: Community
    ledger: SqlLedger
    links: SqlPatientLinks
    discovery: DiscoveryService
    query: QueryService
    retrieve: RetrieveService
    imaging: ImagingService
    trail: AuditTrail
    auditor: Auditor

    @classmethod
    def open(cls, config: Config) -> RespondingServices:
        engine = open_database(config.database.url, config.base_dir)
        if not config.pacs:  # the embedded default when no PACS is configured
            config = config.model_copy(update={"pacs": [FilesystemPacs(kind="filesystem",
                                                                       path=config.base_dir / "var" / "pacs")]})
        trail = AuditTrail.open(config, engine)
        auditor = Auditor(trail, config, background=True)  # the serving loop never waits for the audit
        community = Community(open_backends(config, engine, auditor=auditor))
        ledger, links = SqlLedger(engine), SqlPatientLinks(engine)
        return cls(config, engine, community, ledger, links,
                   DiscoveryService(config, community, links),
                   QueryService(config, community, ledger),
                   RetrieveService(config, community, ledger),
                   ImagingService(config, community, ledger, alerts=auditor),
                   trail, auditor)

    async def aclose(self) -> None:
        await self.community.aclose()
        self.auditor.close()  # every message handed over is recorded, then delivered as far as possible
        self.trail.close()
        self.engine.dispose()
