"""Composition for command-line tools: the durable audit trail and its :class:`Auditor` for one session.

The gateway server assembles its trail in :class:`~gateway.responding.assembly.RespondingServices`; the
initiating commands (``xig pull-priors``, ``xig discover`` …) open one here. Within the block every
:class:`~gateway.initiating.client.PartnerClient` made without an explicit auditor audits through it
(:data:`~gateway.audit.auditor.outbound_auditor`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine

from gateway.audit.auditor import Auditor, outbound_auditor
from gateway.audit.trail import AuditTrail
from gateway.config import Config


@contextlib.contextmanager
def audit_session(config: Config, engine: Engine | None = None) -> Iterator[Auditor]:
    """The trail on ``engine`` (or on the configured database, opened and disposed here)."""
    own = engine is None
    if engine is None:
        from gateway.store.db import open_database

        engine = open_database(config.database.url, config.base_dir)
    trail = AuditTrail.open(config, engine)
    auditor = Auditor(trail, config)
    token = outbound_auditor.set(auditor)
    try:
        yield auditor
    finally:
        outbound_auditor.reset(token)
        trail.close()
        if own:
            engine.dispose()
