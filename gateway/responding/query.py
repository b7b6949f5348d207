"""ITI-38 responding service: one KOS DocumentEntry per study, generated from live PACS data.

Stored queries (ITI TF-2 3.38.4.1.3): FindDocuments, FindDocumentsByReferenceId and GetDocuments
are answered fully; every other stored query answers Success with zero results (an RG "may return
zero"); errors are RegistryErrors whose location carries our homeCommunityId.

Policy choices: a patient id in another assigning authority → ``XDSUnknownPatientId``; a patient
the PACS does not know → Success with zero results (both allowed by ITI TF-2 3.38.4.1.2.2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio.to_thread
from lxml import etree

from gateway.config import Config
from gateway.ihe import ebrim, iti38
from gateway.ihe.ebrim import DocumentEntry
from gateway.ihe.registry import RegistryError, RegistryErrorCode
from gateway.pacs.base import PacsError, StudyInfo
from gateway.responding.community import Community
from gateway.responding.entries import document_entry, manifest, on_demand_unique_id
from gateway.responding.ports import Ledger

log = logging.getLogger("xig.iti38")


class QueryService:
    def __init__(self, config: Config, community: Community, ledger: Ledger) -> None:
        self.config = config
        self.community = community
        self.ledger = ledger

    @property
    def stable(self) -> bool:
        return self.config.responder.kos_entry_type == "stable"

    def _response(self, entries: Sequence[DocumentEntry], return_type: iti38.ReturnType,
                  errors: Sequence[RegistryError] = ()) -> etree._Element:
        return iti38.build_response(entries, return_type=return_type,
                                    home_community_id=self.config.gateway.home_community_id, errors=errors)

    def _error(self, code: str, context: str, return_type: iti38.ReturnType = "LeafClass") -> etree._Element:
        return self._response([], return_type, [RegistryError(code, context)])

    async def respond(self, body: etree._Element) -> etree._Element:
        try:
            query = iti38.parse_query(body)
        except iti38.QueryError as err:
            return self._response([], "LeafClass", [err.to_registry_error()])
        home = query.home_community_id
        if home is not None and not ebrim.same_hcid(home, self.config.gateway.home_community_id):
            return self._error(RegistryErrorCode.XDSUnknownCommunity,
                               f"homeCommunityId {home} is not this community "
                               f"({self.config.gateway.home_community_id})", query.return_type)
        try:
            if query.find_documents is not None:
                entries = await self._find(query.find_documents)
                entries = iti38.filter_entries(entries, query.find_documents)
            elif query.get_documents is not None:
                entries = await self._get(query.get_documents)
            else:
                return self._response([], query.return_type)  # other stored queries: zero results
        except _UnknownPatient as exc:
            return self._error(RegistryErrorCode.XDSUnknownPatientId,
                               f"patient id {exc.pid} is not in this community's assigning authority "
                               f"({self.config.gateway.assigning_authority}); use the id returned by XCPD",
                               query.return_type)
        except PacsError as exc:
            log.warning("ITI-38: PACS failed: %s", exc)
            return self._error(RegistryErrorCode.XDSRegistryError,
                               "the imaging archive behind this gateway is not reachable now; retry later",
                               query.return_type)
        limit = self.config.responder.max_query_results
        if query.return_type == "LeafClass" and len(entries) > limit:
            return self._error(RegistryErrorCode.XDSTooManyResults,
                               f"{len(entries)} documents match, more than {limit}; narrow the query or use ObjectRef",
                               query.return_type)
        return self._response(entries, query.return_type)

    async def _entry(self, study: StudyInfo, patient_id: str) -> DocumentEntry:
        if self.stable:
            uid, data = await anyio.to_thread.run_sync(manifest, study, self.config)
            entry = document_entry(study, self.config, patient_id=patient_id, unique_id=uid, kos_bytes=data)
        else:
            entry = document_entry(study, self.config, patient_id=patient_id,
                                   unique_id=on_demand_unique_id(study, study.source_id))
        await anyio.to_thread.run_sync(lambda: self.ledger.entry_for_study(
            entry.unique_id, entry.entry_uuid, study.StudyInstanceUID, study.source_id, patient_id))
        return entry

    async def _find(self, f: iti38.FindDocumentsParams) -> list[DocumentEntry]:
        pid = f.patient_id
        if pid.assigning_authority != self.config.gateway.assigning_authority:
            raise _UnknownPatient(pid)
        wanted = ebrim.STABLE if self.stable else ebrim.ON_DEMAND
        if wanted not in f.entry_types:
            return []  # ITI TF-2 3.18.4.1.2.3.6.2: $XDSDocumentEntryType absent means Stable only
        studies = await self.community.find_studies(pid.id)
        studies.sort(key=lambda s: (s.StudyDate, s.StudyTime, s.StudyInstanceUID), reverse=True)
        return [await self._entry(s, pid.id) for s in studies]

    async def _get(self, g: iti38.GetDocumentsParams) -> list[DocumentEntry]:
        entries: list[DocumentEntry] = []
        for uid in g.unique_ids:
            entry = await self._lookup(unique_id=uid)
            if entry is not None:
                entries.append(entry)
        for entry_uuid in g.entry_uuids:
            entry = await self._lookup(entry_uuid=entry_uuid)
            if entry is not None:
                entries.append(entry)
        return entries

    async def _lookup(self, *, unique_id: str | None = None, entry_uuid: str | None = None) -> DocumentEntry | None:
        record = await anyio.to_thread.run_sync(lambda: self.ledger.find_entry(unique_id, entry_uuid))
        if record is not None:
            study = await self.community.get_study(record.study_instance_uid, record.source_id)
            return None if study is None else await self._entry(study, record.patient_id)
        return None


class _UnknownPatient(Exception):
    def __init__(self, pid: ebrim.CX) -> None:
        self.pid = pid
