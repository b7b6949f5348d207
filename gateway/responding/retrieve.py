"""ITI-39 responding service: generate the requested KOS manifests on demand (ITI TF-2 3.39.4.1.2).

For an On-Demand entry the KOS of the study's *current* content is returned with
``NewDocumentUniqueId`` = its SOP Instance UID (content-derived: unchanged studies give the same
uid and byte-identical bytes; ITI TF-2 3.43.4.2.3). ``NewRepositoryUniqueId`` is omitted because
the generated manifest is not persisted as a document. Each delivery is recorded in the ledger —
which KOS (and so which SOP instances) went to which community, organisation and user — and that
record is what RAD-75 later checks.
"""

from __future__ import annotations

import logging

import anyio.to_thread
from lxml import etree

from gateway.config import Config
from gateway.ihe import iti39
from gateway.pacs.base import PacsError, StudyInfo
from gateway.responding.community import Community
from gateway.responding.entries import manifest
from gateway.responding.ports import Ledger
from gateway.security.saml import VerifiedIdentity
from gateway.soap import mtom

log = logging.getLogger("xig.iti39")


class RetrieveService:
    def __init__(self, config: Config, community: Community, ledger: Ledger) -> None:
        self.config = config
        self.community = community
        self.ledger = ledger

    async def respond(self, body: etree._Element, identity: VerifiedIdentity,
                      ) -> tuple[etree._Element, list[mtom.Part]]:
        requests = iti39.parse_request(body)
        ours, outcomes = iti39.screen_requests(requests, self.config.gateway.home_community_id)
        results: dict[iti39.DocumentRequest, iti39.Outcome] = {f.request: f for f in outcomes}
        for req in ours:
            results[req] = await self._one(req, identity)
        ordered = [results[r] for r in requests]
        return iti39.build_response(ordered, home_community_id=self.config.gateway.home_community_id)

    async def _one(self, req: iti39.DocumentRequest, identity: VerifiedIdentity) -> iti39.Outcome:
        if req.repository_unique_id != self.config.gateway.repository_unique_id:
            return iti39.unknown_repository(req)
        record = await anyio.to_thread.run_sync(lambda: self.ledger.find_entry(req.document_unique_id, None))
        if record is None:
            return iti39.unknown_document(req, f"document {req.document_unique_id} is not known here; "
                                               "query (ITI-38) first")
        try:
            study = await self.community.get_study(record.study_instance_uid, record.source_id)
        except PacsError as exc:
            log.warning("ITI-39: PACS failed: %s", exc)
            return iti39.repository_error(req, "the imaging archive is not reachable now; retry later")
        if study is None or not study.instance_count:
            return iti39.unknown_document(req, f"the study of document {req.document_unique_id} is no longer "
                                               "available")
        kos_uid, data = await anyio.to_thread.run_sync(manifest, study, self.config)
        stable = self.config.responder.kos_entry_type == "stable"
        if stable and kos_uid != req.document_unique_id:
            return iti39.unknown_document(req, f"the study of document {req.document_unique_id} changed since it "
                                               "was listed; query again for its current manifest")
        await anyio.to_thread.run_sync(self._record, study, kos_uid, identity)
        return iti39.DocumentResult(req, "application/dicom", data,
                                    new_document_unique_id=None if stable else kos_uid)

    def _record(self, study: StudyInfo, kos_uid: str, identity: VerifiedIdentity) -> None:
        self.ledger.record_delivery(
            kos_uid=kos_uid, study_uid=study.StudyInstanceUID, source_id=study.source_id,
            content_digest=study.content_digest,
            instances=[(s.SeriesInstanceUID, i.SOPInstanceUID) for s, i in study.instances()],
            home_community_id=identity.home_community_id, organization_id=identity.organization_id,
            user=identity.audit_user_name)
