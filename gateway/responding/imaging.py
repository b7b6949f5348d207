"""RAD-75 responding service: the images themselves, PACS → MTOM, without holding a study in memory.

Per requested instance (RAD TF-3 4.75 via RAD-69 semantics, ITI TF-2 3.43):

* HomeCommunityId must be ours, RepositoryUniqueId one of our PACS (``imaging_source_id``) —
  else ``XDSUnknownCommunity`` / ``XDSUnknownRepositoryId``;
* the instance must be referenced by a KOS delivered (ITI-39) to the requesting community within
  ``[responder] rad75_authorization_hours`` (Carequality Imaging-002) — else
  ``XDSDocumentUniqueIdError``, logged as a refused access (never says whether the UID exists);
* the stored transfer syntax is returned when listed in TransferSyntaxUIDList, else the instance
  is transcoded when possible, else ``XDSRepositoryError`` explaining the encoding problem;
* the PACS failing for some instances gives errors for those only (PartialSuccess).

MTOM layout (``[responder] rad75_root_part``): "first" spools instances to disk until every outcome
is known, then sends root + parts; "last" streams parts as they leave the PACS and sends the root
(with the status) at the end. Either way memory is bounded by one instance.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import anyio.to_thread
from lxml import etree

from gateway.config import Config
from gateway.dicom import transcode
from gateway.ihe import iti39, rad75
from gateway.ihe.iti39 import DocumentRequest, DocumentResult, Outcome
from gateway.pacs.base import InstanceRef, PacsBackend, PacsError, RetrievedInstance, RetrieveFailure
from gateway.responding.community import Community
from gateway.responding.ports import Ledger, SecurityAlerts
from gateway.security.saml import VerifiedIdentity
from gateway.soap import mtom

log = logging.getLogger("xig.rad75")
#: bytes per worker-thread call when writing and reading the "root first" spool
SPOOL_BATCH = 4 * 1024 * 1024


@dataclass
class _Plan:
    """Outcomes in request order, filled as instances are retrieved."""

    requests: list[tuple[str, str, DocumentRequest]]
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    #: instances to fetch, per backend: (index in requests, ref)
    fetch: dict[str, list[tuple[int, InstanceRef]]] = field(default_factory=dict)
    #: a DocumentRequest repeated in the request → index of its first occurrence (fetched once)
    duplicates: dict[int, int] = field(default_factory=dict)

    def ordered(self) -> list[Outcome]:
        out: list[Outcome] = []
        for i in range(len(self.requests)):
            first = self.outcomes[self.duplicates.get(i, i)]
            doc = self.requests[i][2]
            # a repeated request gets the same answer; two DocumentResponses may share one attachment
            out.append(first if first.request == doc else replace(first, request=doc))
        return out


class ImagingService:
    def __init__(self, config: Config, community: Community, ledger: Ledger,
                 alerts: SecurityAlerts | None = None) -> None:
        self.config = config
        self.community = community
        self.ledger = ledger
        self.alerts = alerts

    # -- planning -------------------------------------------------------------------------------------
    async def plan(self, request: rad75.ImagingRetrieveRequest, identity: VerifiedIdentity) -> _Plan:
        plan = _Plan(list(rad75.iter_document_requests(request)))
        hcid = self.config.gateway.home_community_id
        candidates: list[tuple[int, str, str, DocumentRequest]] = []
        first: dict[tuple[str, str], int] = {}
        for index, (study, series, doc) in enumerate(plan.requests):
            key = (doc.repository_unique_id, doc.document_unique_id)
            if key in first:
                plan.duplicates[index] = first[key]
                continue
            first[key] = index
            ok, failed = iti39.screen_requests([doc], hcid)
            if failed:
                plan.outcomes[index] = failed[0]
            elif self.community.backend_for(doc.repository_unique_id) is None:
                plan.outcomes[index] = iti39.unknown_repository(doc)
            else:
                candidates.append((index, study, series, doc))
        window = dt.timedelta(hours=self.config.responder.rad75_authorization_hours)
        uids = [c[3].document_unique_id for c in candidates]
        allowed = await anyio.to_thread.run_sync(
            lambda: self.ledger.authorized(uids, identity.home_community_id, window))
        refused: list[tuple[str, str]] = []
        hours = self.config.responder.rad75_authorization_hours
        for index, study, series, doc in candidates:
            if doc.document_unique_id not in allowed:
                refused.append((study, doc.document_unique_id))
                plan.outcomes[index] = iti39.unknown_document(
                    doc, f"instance {doc.document_unique_id} is not referenced by any manifest delivered to community "
                         f"{identity.home_community_id} in the last {hours:g} h "
                         "(retrieve the study's KOS with ITI-39 to be allowed its instances)")
                continue
            plan.fetch.setdefault(doc.repository_unique_id, []).append(
                (index, InstanceRef(study, series, doc.document_unique_id)))
        if refused:
            reason = (f"RAD-75 asked for {len(refused)} instance(s) not in a manifest delivered to "
                      f"{identity.home_community_id} in the last {hours:g} h")
            log.warning("RAD-75 refused: %s (%s): %s: %s", identity.audit_user_name, identity.home_community_id,
                        reason, ", ".join(uid for _, uid in refused[:10]))
            if self.alerts is not None:
                self.alerts.uid_guess(identity, refused, reason=reason)
        return plan

    # -- retrieval -------------------------------------------------------------------------------------
    async def _instances(self, plan: _Plan, accepted: tuple[str, ...],
                         ) -> AsyncIterator[tuple[int, bytes | AsyncIterator[bytes | memoryview]]]:
        """Successful instances as (request index, data); failures are written into ``plan.outcomes``."""
        for source_id, items in plan.fetch.items():
            backend = self.community.backend_for(source_id)
            assert backend is not None
            by_uid = {ref.SOPInstanceUID: (index, ref) for index, ref in items}
            async for index, data in self._from_backend(backend, plan, by_uid, accepted):
                yield index, data

    async def _from_backend(self, backend: PacsBackend, plan: _Plan, by_uid: dict[str, tuple[int, InstanceRef]],
                            accepted: tuple[str, ...],
                            ) -> AsyncIterator[tuple[int, bytes | AsyncIterator[bytes | memoryview]]]:
        pending = dict(by_uid)
        try:
            async for item in backend.retrieve([ref for _, ref in by_uid.values()]):
                entry = pending.pop(item.ref.SOPInstanceUID, None)
                if entry is None:
                    continue
                index = entry[0]
                doc = plan.requests[index][2]
                if isinstance(item, RetrieveFailure):
                    plan.outcomes[index] = (iti39.unknown_document(doc, item.reason) if item.missing
                                            else iti39.repository_error(doc, item.reason))
                    continue
                data = await self._encode(item, accepted, doc, plan, index)
                if data is not None:
                    yield index, data
        except PacsError as exc:
            log.warning("RAD-75: PACS %s failed mid-retrieve: %s", backend.source_id, exc)
            reason = f"the imaging archive failed during the retrieve: {exc}"
        else:
            reason = "the imaging archive did not deliver this instance"
        for index, _ in pending.values():
            plan.outcomes[index] = iti39.repository_error(plan.requests[index][2], reason)

    async def _encode(self, item: RetrievedInstance, accepted: tuple[str, ...], doc: DocumentRequest,
                      plan: _Plan, index: int) -> bytes | AsyncIterator[bytes | memoryview] | None:
        decision = transcode.choose_syntax(item.TransferSyntaxUID, accepted)
        if decision.return_as_is:
            return _guarded(item.chunks, plan, index, doc)
        if decision.target is None:
            await _drain(item.chunks)
            failure = rad75.transfer_syntax_failure(doc, accepted, [item.TransferSyntaxUID])
            plan.outcomes[index] = iti39.repository_error(doc, f"{failure.context}. Why: {decision.reason}")
            return None
        raw = b"".join([c async for c in item.chunks])  # one instance: transcoding needs it whole
        try:  # convert_for falls back to the other accepted syntaxes when an encoder refuses this image
            _, data = await anyio.to_thread.run_sync(transcode.convert_for, raw, item.TransferSyntaxUID, accepted)
            return data
        except transcode.TranscodeError as exc:
            plan.outcomes[index] = iti39.repository_error(doc, str(exc))
            return None

    # -- response --------------------------------------------------------------------------------------
    async def respond(self, body: etree._Element, identity: VerifiedIdentity,
                      ) -> tuple[etree._Element | None, AsyncIterator[mtom.Part], Callable[[], etree._Element] | None]:
        """``(root or None, parts, build-root-later or None)`` for :class:`gateway.web.app.SoapResponse`."""
        request = rad75.parse_request(body)
        plan = await self.plan(request, identity)
        accepted = request.transfer_syntaxes
        hcid = self.config.gateway.home_community_id
        cids: dict[int, str] = {}
        content_id = mtom.content_id_family("i")

        def root() -> etree._Element:
            for index, cid in cids.items():
                if index not in plan.outcomes:
                    plan.outcomes[index] = DocumentResult(plan.requests[index][2], rad75.MIME_DICOM, cid)
            element, _ = rad75.build_response_skeleton(plan.ordered(), home_community_id=hcid)
            return element

        if self.config.responder.rad75_root_part == "last":
            async def streamed() -> AsyncIterator[mtom.Part]:
                async for index, data in self._instances(plan, accepted):
                    cids[index] = content_id(index)
                    yield mtom.Part(cids[index], "application/dicom", data)
            return None, streamed(), root

        spool = _Spool(self.config.responder.spool_dir)
        try:
            spans: dict[int, tuple[int, int]] = {}
            async for index, data in self._instances(plan, accepted):
                start = spool.size
                await spool.append(data)
                if index in plan.outcomes:  # broke off while spooling: its bytes stay in the spool, unused
                    continue
                spans[index] = (start, spool.size - start)
                cids[index] = content_id(index)
            await spool.flush()
        except BaseException:
            spool.close()
            raise
        element = root()

        async def from_spool() -> AsyncIterator[mtom.Part]:
            try:
                for index in sorted(spans):
                    yield mtom.Part(cids[index], "application/dicom", spool.read(*spans[index]))
            finally:
                spool.close()
        return element, from_spool(), None


async def _guarded(chunks: AsyncIterator[bytes | memoryview], plan: _Plan, index: int, doc: DocumentRequest,
                   ) -> AsyncIterator[bytes | memoryview]:
    """Pass chunks through; a PACS failure mid-instance ends the part and marks the instance failed.

    The partial bytes cannot be recalled, but the root (sent after them, or built after the spool)
    reports the instance as an error, so a consumer discards them.
    """
    try:
        async for chunk in chunks:
            yield chunk
    except (PacsError, OSError) as exc:
        log.warning("RAD-75: instance %s broke off: %s", doc.document_unique_id, exc)
        plan.outcomes[index] = iti39.repository_error(doc, f"the imaging archive failed while sending it: {exc}")


async def _drain(chunks: AsyncIterator[bytes | memoryview]) -> None:
    async for _ in chunks:
        pass


class _Spool:
    """The instances of one "root first" response, one after the other in one anonymous file in ``directory``.

    Nothing to clean up after a crash (the file has no name). Writes are batched to :data:`SPOOL_BATCH`
    bytes per worker-thread call, and reading ahead in blocks of that size when parts are read in
    the order they were spooled: a thread hop per chunk (and a file per instance) cost more than the
    disk I/O itself. Memory: one batch.
    """

    def __init__(self, directory: Path | None) -> None:
        self._file = tempfile.TemporaryFile(prefix="xig-rad75-", dir=directory, buffering=0)
        self.size = 0
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._block = b""
        self._block_start = 0
        self._next = -1  # where the previous read ended

    async def append(self, data: bytes | AsyncIterator[bytes | memoryview]) -> None:
        if isinstance(data, bytes):
            await self._add(data)
            return
        async for chunk in data:
            await self._add(chunk)

    async def _add(self, chunk: bytes | memoryview) -> None:
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        self.size += len(chunk)
        if self._pending_size >= SPOOL_BATCH:
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending, self._pending_size = self._pending, [], 0
        if batch:
            await anyio.to_thread.run_sync(self._write_all, batch)

    def _write_all(self, batch: list[bytes | memoryview]) -> None:
        for chunk in batch:
            view = memoryview(chunk)
            while view:
                written = self._file.write(view)
                if not written:
                    raise OSError("the RAD-75 spool file accepts no more bytes")
                view = view[written:]

    async def read(self, start: int, length: int) -> AsyncIterator[bytes]:
        """The ``length`` bytes spooled at ``start`` (flushed), in pieces of at most :data:`SPOOL_BATCH`."""
        end = start + length
        pos = start
        while pos < end:
            offset = pos - self._block_start
            if not 0 <= offset < len(self._block):
                # read ahead when reading in spool order, else just what this part needs
                size = SPOOL_BATCH if pos == self._next else min(end - pos, SPOOL_BATCH)
                self._block = await anyio.to_thread.run_sync(os.pread, self._file.fileno(), size, pos)
                self._block_start, offset = pos, 0
                if not self._block:
                    raise OSError(f"the RAD-75 spool file ends at {pos}, before {end}")
            piece = self._block[offset:offset + end - pos]
            pos += len(piece)
            yield piece
        self._next = end

    def close(self) -> None:
        self._block = b""
        self._file.close()
