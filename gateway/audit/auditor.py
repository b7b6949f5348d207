"""The one place that decides *what* is audited, for both gateway roles (no I/O of its own).

:class:`Auditor` turns facts the gateway already has — an inbound exchange, an outbound exchange, a
refused TLS client, a refused UID guess, a local PACS call, start and stop — into DICOM audit messages
(:mod:`gateway.audit.events`, :mod:`gateway.audit.wire`) and hands them to an
:class:`~gateway.audit.model.AuditSink` (the durable :class:`~gateway.audit.trail.AuditTrail`).

Nothing here raises into the transaction: a failure to build a message is logged with the event's
facts and the transaction goes on (ITI TF-2 3.20.4.1.2: auditing must not stop the application).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Literal
from urllib.parse import urlsplit

from lxml import etree

from gateway.audit import events, wire
from gateway.audit.model import (
    SERIOUS_FAILURE,
    SUCCESS,
    AuditMessage,
    AuditSink,
    AuditSource,
    Code,
    Outcome,
    ParticipantObject,
)
from gateway.config import Config
from gateway.security.saml import UserIdentity, VerifiedIdentity, audit_user_name

log = logging.getLogger("xig.audit")

#: The auditor of outgoing requests for code that passes none (see :func:`gateway.audit.assembly.audit_session`).
outbound_auditor: ContextVar[Auditor | None] = ContextVar("xig_outbound_auditor", default=None)

#: The SAML user of the request being served, for audits of the PACS legs made on its behalf.
current_requestor: ContextVar[events.Requestor | None] = ContextVar("xig_audit_requestor", default=None)

WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _host(url: str) -> str | None:
    return urlsplit(url).hostname


class Auditor:
    """Builds the audit messages of this gateway and records them; every method is safe to call anywhere."""

    def __init__(self, sink: AuditSink, config: Config, *, clock: Callable[[], dt.datetime] = _utcnow,
                 background: bool = False) -> None:
        """``background``: build and store the messages on one background thread, in order, so a caller on
        an event loop never waits for XML serialisation or the audit store (:meth:`close` drains it)."""
        self.sink = sink
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xig-audit") if background else None
        self.config = config
        self.clock = clock
        a = config.audit
        self.source = AuditSource(source_id=a.source_id or config.gateway.name,
                                  enterprise_site_id=a.enterprise_site_id or config.gateway.home_community_id)
        self.process = events.Peer(user_id=config.gateway.name, host=socket.gethostname(),
                                   alternative_user_id=str(os.getpid()))
        self._base = (config.server.public_url or f"https://{config.server.host}:{config.server.port}").rstrip("/")

    # -- plumbing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait until every message handed to a background auditor is recorded (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _record(self, build: Callable[[], Sequence[AuditMessage]], what: str) -> None:
        if self._pool is not None:
            try:
                self._pool.submit(self._build_and_record, build, what)
                return
            except RuntimeError:  # closed: record in the caller's thread rather than lose the event
                pass
        self._build_and_record(build, what)

    def _build_and_record(self, build: Callable[[], Sequence[AuditMessage]], what: str) -> None:
        try:
            messages = build()
        except Exception:  # noqa: BLE001 - auditing never breaks the transaction
            log.exception("could not build the audit message of %s", what)
            return
        for message in messages:
            self.sink.record(message)

    def _context(self, side: Literal["initiating", "responding"], initiator: events.Peer, responder: events.Peer,
                 user: events.Requestor | None, purposes: tuple[Code, ...], outcome: Outcome = SUCCESS,
                 when: dt.datetime | None = None) -> events.Context:
        return events.Context(side=side, outcome=outcome, when=when or self.clock(), source=self.source,
                              initiator=initiator, responder=responder, user=user, purposes=purposes)

    def outbound_requestor(self, identity: UserIdentity) -> events.Requestor:
        """The user we assert in outgoing requests (NameID = our signing certificate's subject)."""
        from gateway.security.outbound import signer_name_id

        return events.Requestor(
            user_name=audit_user_name(None, signer_name_id(self.config), self.config.saml_issuer),
            user_id=identity.subject_id, organization=identity.organization,
            organization_id=identity.organization_id, home_community_id=identity.home_community_id,
            role=Code(identity.role.code, identity.role.code_system_name or identity.role.code_system,
                             identity.role.display_name or identity.role.code))

    # -- responding side ----------------------------------------------------------------------------

    def inbound(self, *, transaction: str, path: str, when: dt.datetime, peer_host: str | None,
                reply_to: str | None, identity: VerifiedIdentity | None, request: etree._Element | None,
                response: etree._Element | None, fault_code: str | None, fault_reason: str | None,
                fault_namespace: str | None = None) -> None:
        """One SOAP request answered by us. A refused assertion (``wsse:`` fault) is a user
        authentication failure (DICOM PS3.15 A.5.3.1 / ITI TF-2 3.40.4.2), not a transaction."""
        if fault_namespace == WSSE_NS:
            self.authentication_failure(peer_host=peer_host, reason=f"{fault_code}: {fault_reason}", when=when,
                                        kind="user")
            return
        initiator = events.Peer(user_id=reply_to or "http://www.w3.org/2005/08/addressing/anonymous",
                                host=peer_host)
        responder = events.Peer(user_id=self._base + path, host=self.process.host,
                                alternative_user_id=self.process.alternative_user_id)
        user = events.Requestor.from_identity(identity) if identity is not None else None
        purposes = events.purposes_of_use(identity) if identity is not None else ()
        community = identity.home_community_id if identity is not None else ""
        ctx = self._context("responding", initiator, responder, user, purposes, when=when)
        fault = f"{fault_code}: {fault_reason}" if fault_code or fault_reason else None
        self._record(lambda: wire.transaction_messages(transaction, ctx, request, response, community=community,
                                                       fault=fault), f"{transaction} from {peer_host}")

    def authentication_failure(self, *, peer_host: str | None, reason: str, when: dt.datetime | None = None,
                               user_name: str | None = None, kind: Literal["node", "user"] = "node") -> None:
        """A client we refused: ``node`` = bad or untrusted TLS certificate (Security Alert), ``user`` = bad or
        missing assertion (User Authentication / Login failure)."""
        now = when or self.clock()
        self._record(lambda: [events.authentication_failure(
            when=now, source=self.source, peer=events.Peer(user_id=peer_host or "unknown",
                                                                            host=peer_host),
            reason=reason, user_name=user_name, node=self.process, kind=kind)],
            f"authentication failure of {peer_host}")

    def uid_guess(self, identity: VerifiedIdentity, refused: Sequence[tuple[str, str]], *,
                  peer_host: str | None = None, reason: str) -> None:
        """RAD-75 asked for instances never delivered to that community in a manifest (a UID guess).

        ``refused`` holds (Study Instance UID, SOP Instance UID) pairs: one Study object each study,
        its refused instances as ``SOPInstanceUID`` details."""
        by_study: dict[str, list[str]] = {}
        for study, instance in refused:
            by_study.setdefault(study, []).append(instance)
        objects = tuple(ParticipantObject(
            object_id=study, id_type=Code("110180", "DCM", "Study Instance UID"), type_code="2", role="3",
            details=tuple(("SOPInstanceUID", uid.encode()) for uid in uids)) for study, uids in by_study.items())
        now = self.clock()
        self._record(lambda: [events.security_alert(
            when=now, source=self.source,
            peer=events.Peer(user_id=identity.home_community_id, host=peer_host),
            user=events.Requestor.from_identity(identity), reason=reason, objects=objects)],
            f"RAD-75 UID guess by {identity.audit_user_name}")

    # -- initiating side ----------------------------------------------------------------------------

    def outbound(self, *, transaction: str, url: str, community: str, identity: UserIdentity,
                 request: etree._Element, response: etree._Element | None, error: str | None,
                 when: dt.datetime) -> None:
        """One request we sent to a partner (ITI-55 / ITI-38 / ITI-39 / RAD-75), whatever came back."""
        initiator = events.Peer(user_id="http://www.w3.org/2005/08/addressing/anonymous", host=self.process.host,
                                alternative_user_id=self.process.alternative_user_id)
        responder = events.Peer(user_id=url, host=_host(url))
        user = self.outbound_requestor(identity)
        purposes = (Code(identity.purpose_of_use.code,
                                identity.purpose_of_use.code_system_name or identity.purpose_of_use.code_system,
                                identity.purpose_of_use.display_name or identity.purpose_of_use.code),)
        ctx = self._context("initiating", initiator, responder, user, purposes, when=when)
        self._record(lambda: wire.transaction_messages(transaction, ctx, request, response, community=community,
                                                       fault=error), f"{transaction} to {url}")

    # -- local PACS legs ----------------------------------------------------------------------------

    def pacs(self, operation: str, *, pacs: str, query: bytes = b"", patient: str | None = None,
             studies: Sequence[events.StudyRef] = (), error: str | None = None) -> None:
        """A call to the local PACS (``query``, ``retrieve`` or ``store``) on behalf of the current user."""
        ctx = self._context("initiating", self.process, events.Peer(user_id=pacs, host=_host(pacs) or None),
                            current_requestor.get(), (), outcome=SERIOUS_FAILURE if error else SUCCESS)
        if error:
            ctx = dataclasses.replace(ctx, outcome_description=error)

        def build() -> list[AuditMessage]:
            if operation == "query":
                return events.pacs_query(ctx, query=query, patient=patient)
            if operation == "retrieve":
                return events.pacs_retrieve(ctx, studies=studies, patient=patient)
            return events.pacs_store(ctx, studies=studies, patient=patient)
        self._record(build, f"PACS {operation} at {pacs}")

    # -- application ------------------------------------------------------------------------------

    def application(self, started: bool) -> None:
        now = self.clock()
        self._record(lambda: [events.application_activity(when=now, source=self.source, started=started,
                                                          process=self.process)],
                     "application start" if started else "application stop")
