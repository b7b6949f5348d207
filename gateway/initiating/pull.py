"""The pull-priors job: discover → query → retrieve manifests → import images, durably.

1. **discover**: XCPD to every (or the selected) partner concurrently; matches grouped by community;
   each correlation (local id ↔ remote id per community) is stored.
2. **query**: ITI-38 FindDocuments for imaging manifests in every matched community; ITI-39 for the
   KOS of each study; the studies found are recorded in the job (date, modality, description, count).
3. **select**: all (``--yes``) or the ones the user picks.
4. **import**: every instance of the selected studies is registered in the job; pending ones are
   fetched with RAD-75 in batches, each streamed to a spool file, verified (it must be the requested
   SOP instance of the correlated patient and study), reconciled to the local patient
   (:mod:`gateway.dicom.reconcile`), stored in the local PACS and marked ``stored`` — so a killed job
   resumes (:func:`resume`) without downloading stored instances again and without duplicates.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from pydicom import dcmread

from gateway.config import Config
from gateway.dicom.reconcile import Expected, LocalPatient, ReconcileError, ReconcilePolicy, reconcile_file
from gateway.errors import XigError
from gateway.ihe import ebrim
from gateway.ihe.ebrim import DCM_OID, DocumentEntry
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.initiating.client import ImageRequest, ImagesOutcome, PartnerClient, RetrievedManifest, open_soap_client
from gateway.initiating.fanout import CommunityDocuments, ResponseTimes, discover_all, find_all
from gateway.initiating.partners import Partner, PartnerDirectory
from gateway.pacs.base import PacsBackend
from gateway.soap import mtom
from gateway.store.jobs import JobInstance, JobStudy, SqlJobStore
from gateway.store.ledger import SqlPatientLinks
from gateway.web.client import SoapClient

if TYPE_CHECKING:
    from gateway.audit.auditor import Auditor

log = logging.getLogger("xig.pull")

Progress = Callable[[str, dict[str, Any]], None]


def _quiet(event: str, data: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class PullRequest:
    family: str
    given: str
    birth_date: str
    gender: str
    local_id: str
    partners: tuple[str, ...] = ()

    def demographics(self) -> PatientDemographics:
        return PatientDemographics(names=(PersonName(family=(self.family,), given=(self.given,)),),
                                   gender=self.gender, birth_time=self.birth_date)

    def local_patient(self, config: Config) -> LocalPatient:
        return LocalPatient(self.local_id, config.gateway.assigning_authority,
                            f"{self.family}^{self.given}", self.birth_date, self.gender)


@dataclass
class PullResult:
    job_id: str
    studies: list[JobStudy] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        selected = [s for s in self.studies if s.selected]
        return bool(selected) and all(s.state == "imported" for s in selected)


class JobBusyError(XigError):
    """The job is being run by another process (its claim is held)."""


class PullPriors:
    def __init__(self, config: Config, store: SqlJobStore, links: SqlPatientLinks, local_pacs: PacsBackend,
                 directory: PartnerDirectory | None = None, progress: Progress = _quiet,
                 auditor: Auditor | None = None, response_times: ResponseTimes | None = None) -> None:
        """``response_times``: the partners' recorded response times (the fan-outs ask the usually slowest
        first, see :mod:`gateway.initiating.fanout`); None = in the directory's order, nothing recorded."""
        self.config = config
        self.auditor = auditor
        self.response_times = response_times
        self.store = store
        self.links = links
        self.pacs = local_pacs
        if directory is None:
            from gateway.store.directory import SqlDirectory

            directory = PartnerDirectory.from_config(config, extra=SqlDirectory(store.engine).partners())
        self.directory = directory
        self.progress = progress

    def _client(self, config: Config, partner: Partner, soap: SoapClient) -> PartnerClient:
        return PartnerClient(config, partner, soap, auditor=self.auditor)

    # -- discover & query ------------------------------------------------------------------------------
    async def discover(self, request: PullRequest) -> PullResult:
        job = self.store.create("pull-priors", request.__dict__ | {"partners": list(request.partners)})
        result = PullResult(job)
        self.store.set_state(job, "running")
        self.progress("job", {"id": job})
        async with open_soap_client(self.config) as soap:
            fan = await discover_all(self.config, self.directory, request.demographics(),
                                     partners=request.partners or None, local_patient_id=request.local_id,
                                     soap_client=soap, client_factory=self._client,
                                     response_times=self.response_times)
            result.errors += [str(err) for err in fan.errors.values()]
            for name, outcome in fan.outcomes.items():
                self.progress("discovered", {"partner": name, "status": outcome.status})
            for c in fan.communities.values():
                for pid in c.patient_ids:
                    self.links.remember(local_patient_id=request.local_id,
                                        local_assigning_authority=self.config.gateway.assigning_authority,
                                        remote_home_community_id=c.home_community_id, remote_patient_id=pid.id,
                                        remote_assigning_authority=pid.assigning_authority)
            docs = await find_all(self.config, fan, soap_client=soap, client_factory=self._client,
                                  response_times=self.response_times)
            result.errors += [str(e) for e in docs.errors]
            # one ITI-39 exchange per (community, patient id) query: batched by the partner's limit
            batches: dict[int, tuple[CommunityDocuments, list[DocumentEntry]]] = {}
            for found, entry in docs.entries():
                if found.partner is not None:
                    batches.setdefault(id(found), (found, []))[1].append(entry)
            for found, entries in batches.values():
                partner = found.partner
                assert partner is not None
                client = self._client(self.config, partner, soap)
                for m in await client.retrieve_manifests(entries):
                    if m.kos is None:
                        result.errors.append(f"{partner.name}: manifest {m.entry.unique_id}: "
                                             f"{m.error.context if m.error else m.problem}")
                        continue
                    self._record_study(job, found, m)
        result.studies = self.store.studies(job)
        self.store.set_state(job, "discovered", {"studies": len(result.studies), "errors": result.errors})
        return result

    def _record_study(self, job: str, found: CommunityDocuments, m: RetrievedManifest) -> None:
        assert m.kos is not None and found.partner is not None
        refs = m.image_requests()
        study = JobStudy(
            home_community_id=found.home_community_id, study_instance_uid=m.kos.study_instance_uid,
            partner=found.partner.name, remote_patient_id=str(found.patient_id),
            kos_uid=m.new_document_unique_id or m.entry.unique_id,
            description=m.kos.study_description, study_date=m.kos.study_date,
            modalities="/".join(sorted({c.code for c in m.entry.event_codes if c.scheme == DCM_OID})),
            instances=len(refs))
        self.store.add_studies(job, [study])
        self.store.add_instances(job, [JobInstance(r.sop_instance_uid, found.home_community_id, r.study_instance_uid,
                                                   r.series_instance_uid, r.repository_unique_id) for r in refs])
        self.progress("study", {"community": found.home_community_id, "study": study.study_instance_uid,
                                "description": study.description, "instances": study.instances})

    def select(self, job_id: str, chosen: Sequence[tuple[str, str]] | None) -> None:
        """Keep only ``chosen`` (community, study uid) pairs selected (None: all)."""
        if chosen is None:
            return
        wanted = set(chosen)
        for s in self.store.studies(job_id):
            self.store.set_study(job_id, s.home_community_id, s.study_instance_uid,
                                 selected=(s.home_community_id, s.study_instance_uid) in wanted)

    # -- import ---------------------------------------------------------------------------------------
    def _policy(self, source: str) -> ReconcilePolicy:
        imp = self.config.import_
        return ReconcilePolicy(accession=imp.accession, accession_prefix=imp.accession_prefix,
                               outside_marker=imp.outside_marker, outside_marker_text=imp.outside_marker_text,
                               source_of_previous_values=source)

    def _spool(self, job_id: str) -> Path:
        base = self.config.import_.spool_dir or (self.config.base_dir / "var" / "spool")
        path = base / job_id
        shutil.rmtree(path, ignore_errors=True)  # leftovers of a killed run: never stored, fetched again
        path.mkdir(parents=True)
        return path

    async def run(self, job_id: str) -> PullResult:
        """Import every pending instance of the selected studies (also what ``resume`` runs).

        The job is run under its claim (:meth:`SqlJobStore.claim`): a second process resuming the same job
        at the same time gets :class:`JobBusyError` instead of importing the same instances twice."""
        record = self.store.get(job_id)
        if record is None:
            raise KeyError(job_id)
        claim = self.store.claim(job_id)
        if claim is None:
            raise JobBusyError(f"job {job_id} is being run by another process; try again when it has finished")
        with claim:
            return await self._run(job_id, record)

    async def _run(self, job_id: str, record: Any) -> PullResult:
        request = PullRequest(**{k: v for k, v in record.params.items() if k != "partners"},
                              partners=tuple(record.params.get("partners", ())))
        local = request.local_patient(self.config)
        self.store.set_state(job_id, "running")
        spool = self._spool(job_id)
        result = PullResult(job_id)
        studies = {(s.home_community_id, s.study_instance_uid): s for s in self.store.studies(job_id) if s.selected}
        try:
            async with open_soap_client(self.config) as soap:
                for study in studies.values():
                    await self._import_study(job_id, study, local, spool, soap, result)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        result.studies = self.store.studies(job_id)
        result.counts = self.store.counts(job_id)
        state = "completed" if result.complete else "failed"
        self.store.set_state(job_id, state, {"counts": result.counts, "errors": result.errors})
        return result

    async def _import_study(self, job_id: str, study: JobStudy, local: LocalPatient, spool: Path, soap: Any,
                            result: PullResult) -> None:
        partner = self.directory.resolve(study.home_community_id)
        pending = [i for i in self.store.instances(job_id, "pending")
                   if i.study_instance_uid == study.study_instance_uid
                   and i.home_community_id == study.home_community_id]
        if partner is None:
            result.errors.append(f"community {study.home_community_id} is not in the partner directory")
            self.store.set_study(job_id, study.home_community_id, study.study_instance_uid, state="failed",
                                 error="unknown community")
            return
        self.store.set_study(job_id, study.home_community_id, study.study_instance_uid, state="importing")
        cx = ebrim.parse_cx(study.remote_patient_id)
        expected = Expected(cx.id, [study.study_instance_uid], cx.assigning_authority or None)
        policy = self._policy(study.home_community_id)
        client = self._client(self.config, partner, soap)
        size = partner.max_documents_per_request
        batches = [pending[start:start + size] for start in range(0, len(pending), size)]
        # two stages, one batch apart: the next batch is retrieved (network, the partner's work) while this
        # one is checked, reconciled and stored (local CPU and PACS); at most two batches sit in the spool
        send, receive = anyio.create_memory_object_stream[tuple[list[JobInstance], ImagesOutcome]](0)

        async def retrieve() -> None:
            async with send:
                for batch in batches:
                    items = [ImageRequest(i.home_community_id, i.repository_unique_id, i.study_instance_uid,
                                          i.series_instance_uid, i.sop_instance_uid) for i in batch]
                    outcome = await client.retrieve_images(
                        items, sink_factory=lambda _: mtom.FileSink(spool, durable=False),
                        transfer_syntaxes=self.config.import_.transfer_syntaxes)
                    await send.send((batch, outcome))

        async def import_batches() -> None:
            async with receive:
                async for batch, outcome in receive:
                    await self._import_batch(job_id, batch, outcome, local, expected, policy, result)

        async with anyio.create_task_group() as tg:
            tg.start_soon(retrieve)
            tg.start_soon(import_batches)
        states = {i.state for i in self.store.instances(job_id)
                  if i.study_instance_uid == study.study_instance_uid}
        done = states == {"stored"}
        self.store.set_study(job_id, study.home_community_id, study.study_instance_uid,
                             state="imported" if done else "failed")

    async def _import_batch(self, job_id: str, batch: Sequence[JobInstance], outcome: ImagesOutcome,
                            local: LocalPatient, expected: Expected, policy: ReconcilePolicy,
                            result: PullResult) -> None:
        ready: list[tuple[JobInstance, Path]] = []
        for inst in batch:
            r = outcome.results.get(inst.sop_instance_uid)
            if r is None or not r.ok:
                reason = f"{r.error_code}: {r.error_context}" if r else "not answered"
                self._failed(job_id, inst, reason, result)
                continue
            path = Path(r.delivered)
            if await self._reconcile(job_id, inst, path, local, expected, policy, result):
                ready.append((inst, path))
        await self._store(job_id, ready, result)

    def _failed(self, job_id: str, inst: JobInstance, reason: str, result: PullResult) -> None:
        self.store.mark(job_id, inst.sop_instance_uid, "failed", error=reason)
        result.errors.append(f"{inst.sop_instance_uid}: {reason}")
        self.progress("failed", {"sop": inst.sop_instance_uid, "study": inst.study_instance_uid, "reason": reason})

    async def _reconcile(self, job_id: str, inst: JobInstance, path: Path, local: LocalPatient,
                         expected: Expected, policy: ReconcilePolicy, result: PullResult) -> bool:
        """Check the received file is the instance asked for and rewrite it to local identifiers in place."""
        def check_and_rewrite() -> None:  # one worker-thread call per instance
            sop = str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            if sop != inst.sop_instance_uid:
                raise ReconcileError(f"asked for instance {inst.sop_instance_uid}, received {sop}: refused")
            reconcile_file(path, path, local, expected, policy)

        try:
            await anyio.to_thread.run_sync(check_and_rewrite)
        except (ReconcileError, OSError, ValueError) as exc:
            path.unlink(missing_ok=True)
            self._failed(job_id, inst, str(exc), result)
            return False
        return True

    async def _store(self, job_id: str, ready: Sequence[tuple[JobInstance, Path]], result: PullResult) -> None:
        """Store one batch of reconciled files in the local PACS in one call (one STOW-RS request or one
        association), then record each instance's state; the spooled files are removed either way."""
        if not ready:
            return
        sizes = {inst.sop_instance_uid: path.stat().st_size for inst, path in ready}
        try:  # a local PACS that fails (PacsError) stops the job: its instances stay pending for `jobs resume`
            stored = await self.pacs.store([path for _, path in ready])
        finally:
            for _, path in ready:
                path.unlink(missing_ok=True)
        for inst, _ in ready:
            if inst.sop_instance_uid not in stored.stored:
                self._failed(job_id, inst, stored.failed.get(inst.sop_instance_uid, "the local PACS refused it"),
                             result)
                continue
            size = sizes[inst.sop_instance_uid]
            self.store.mark(job_id, inst.sop_instance_uid, "stored", size=size)
            self.progress("stored", {"sop": inst.sop_instance_uid, "study": inst.study_instance_uid, "bytes": size})
