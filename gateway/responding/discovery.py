"""ITI-55 responding service: match the query against the community's patients (ITI TF-2 3.55.4.2).

Remembers which initiating community learned which local patient (``patient_links``), so later
queries and the audit trail can tell who knows whom.
"""

from __future__ import annotations

import logging

import anyio.to_thread
from lxml import etree

from gateway.config import Config
from gateway.ihe import iti55
from gateway.pacs.base import PacsBackend, PacsError
from gateway.responding import matching
from gateway.responding.ports import PatientLinks
from gateway.security.saml import VerifiedIdentity

log = logging.getLogger("xig.iti55")


class DiscoveryService:
    def __init__(self, config: Config, pacs: PacsBackend, links: PatientLinks) -> None:
        self.config = config
        self.pacs = pacs
        self.links = links
        r = config.responder
        self.policy = matching.MatchPolicy(
            threshold=r.match_threshold,
            ask_more_band=(max(0, r.match_threshold - r.ask_more_below), r.match_threshold),
            multiple=r.multiple_matches)

    def _response(self, query: iti55.PatientDiscoveryQuery, outcome: iti55.Outcome) -> etree._Element:
        g = self.config.gateway
        return iti55.build_response(query, outcome, responder_device_id=iti55_device_id(self.config),
                                    home_community_id=g.home_community_id, assigning_authority=g.assigning_authority)

    async def respond(self, body: etree._Element, identity: VerifiedIdentity) -> etree._Element:
        """``body`` is the HL7-normalised, schema-valid PRPA_IN201305UV02."""
        try:
            query = iti55.parse_request(body)
        except iti55.Iti55RequestError as err:
            if err.is_fault or err.query is None:
                raise err.to_fault() from None
            return self._response(err.query, err.outcome())
        if query.response_priority_code == "D":
            return self._response(query, iti55.CannotAnswer(
                None, "Deferred response (responsePriorityCode D) is not supported; send I", "NS250"))
        try:
            outcome: iti55.Outcome = await matching.match_patients(
                self.pacs, query, self.policy, assigning_authority=self.config.gateway.assigning_authority)
        except PacsError as exc:
            log.warning("ITI-55: PACS failed: %s", exc)
            outcome = iti55.CannotAnswer("AnswerNotAvailable", "the imaging archive is not reachable now")
        if isinstance(outcome, iti55.Matches):
            await anyio.to_thread.run_sync(self._remember, query, outcome, identity)
        return self._response(query, outcome)

    def _remember(self, query: iti55.PatientDiscoveryQuery, outcome: iti55.Matches,
                  identity: VerifiedIdentity) -> None:
        community = query.sender_home_community_id or identity.home_community_id
        remote = query.initiator_patient_id
        for p in outcome.patients:
            self.links.remember(
                local_patient_id=p.patient_id, local_assigning_authority=self.config.gateway.assigning_authority,
                remote_home_community_id=community, remote_patient_id=remote.extension if remote else None,
                remote_assigning_authority=remote.root if remote else None)


def iti55_device_id(config: Config) -> str:
    """Our HL7 device id: the community OID (bare)."""
    return config.gateway.home_community_id.removeprefix("urn:oid:")
