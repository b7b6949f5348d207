"""All the PACS of one community seen as one (a community may have several, ``[[pacs]]``).

Queries merge across backends (a study found in two PACS is reported once, from the first one
configured); RAD-75 routes by RepositoryUniqueId (= ``imaging_source_id``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from gateway.pacs.base import (
    InstanceRef,
    PacsBackend,
    PacsError,
    PatientQuery,
    PatientRecord,
    RetrievedInstance,
    RetrieveFailure,
    StoreResult,
    StudyInfo,
)


class Community:
    """A :class:`PacsBackend` over several backends (itself usable wherever one backend is)."""

    def __init__(self, backends: Sequence[PacsBackend]) -> None:
        if not backends:
            raise ValueError("a community needs at least one PACS")
        self.backends = list(backends)
        self.source_id = self.backends[0].source_id

    def backend_for(self, source_id: str) -> PacsBackend | None:
        """The PACS serving RepositoryUniqueId ``source_id`` (``urn:oid:`` and spaces tolerated)."""
        wanted = source_id.strip().removeprefix("urn:oid:")
        return next((b for b in self.backends if b.source_id == wanted), None)

    @property
    def source_ids(self) -> list[str]:
        return [b.source_id for b in self.backends]

    async def ping(self) -> None:
        for b in self.backends:
            await b.ping()

    async def find_patients(self, query: PatientQuery) -> list[PatientRecord]:
        seen: dict[tuple[str, str | None], PatientRecord] = {}
        for b in self.backends:
            for p in await b.find_patients(query):
                seen.setdefault((p.PatientID, p.IssuerOfPatientID), p)
        return list(seen.values())

    async def find_studies(self, patient_id: str, issuer: str | None = None) -> list[StudyInfo]:
        seen: dict[str, StudyInfo] = {}
        errors: list[str] = []
        for b in self.backends:
            try:
                studies = await b.find_studies(patient_id, issuer)
            except PacsError as exc:
                if len(self.backends) == 1:
                    raise
                errors.append(str(exc))
                continue
            for s in studies:
                seen.setdefault(s.StudyInstanceUID, s)
        if errors and not seen and len(errors) == len(self.backends):
            raise PacsError("; ".join(errors))
        return list(seen.values())

    async def get_study(self, study_instance_uid: str, source_id: str | None = None) -> StudyInfo | None:
        backends = [b for b in self.backends if source_id is None or b.source_id == source_id]
        for b in backends:
            study = await b.get_study(study_instance_uid)
            if study is not None:
                return study
        return None

    def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        return self.backends[0].retrieve(refs)

    async def store(self, files: Sequence[Path]) -> StoreResult:
        return await self.backends[0].store(files)

    async def aclose(self) -> None:
        for b in self.backends:
            await b.aclose()
