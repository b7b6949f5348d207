"""A :class:`~gateway.pacs.base.PacsBackend` decorator that audits the local PACS legs.

Gateways audit their local legs too (ITI TF-2 3.38.4.1.4, 3.39.6): every query, retrieve and store
between XIG and its PACS becomes an audit message on behalf of the user of the request being served
(:data:`gateway.audit.auditor.current_requestor`). The wrapped backend is unchanged; a failing call is
audited as a failure and re-raised.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio.to_thread

from gateway.audit.auditor import Auditor
from gateway.audit.events import StudyRef
from gateway.ihe import ebrim
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


class AuditedPacs:
    """Audits every call of ``inner``; ``label`` names the PACS in the audit (its URL or AE title)."""

    def __init__(self, inner: PacsBackend, auditor: Auditor, label: str) -> None:
        self.inner = inner
        self.auditor = auditor
        self.label = label
        self.source_id = inner.source_id

    def __getattr__(self, name: str) -> object:  # backend-specific extras (e.g. open associations)
        return getattr(self.inner, name)

    async def ping(self) -> None:
        await self.inner.ping()

    def _query(self, what: dict[str, object], patient: str | None, error: str | None = None) -> None:
        self.auditor.pacs("query", pacs=self.label, query=json.dumps(what, sort_keys=True).encode(),
                          patient=patient, error=error)

    async def find_patients(self, query: PatientQuery) -> list[PatientRecord]:
        what: dict[str, object] = {"find_patients": {k: v for k, v in query.__dict__.items() if v}}
        try:
            found = await self.inner.find_patients(query)
        except PacsError as exc:
            self._query(what, None, str(exc))
            raise
        self._query(what, None)
        return found

    async def find_studies(self, patient_id: str, issuer: str | None = None) -> list[StudyInfo]:
        patient = ebrim.format_cx(patient_id, issuer or "")
        what: dict[str, object] = {"find_studies": patient}
        try:
            studies = await self.inner.find_studies(patient_id, issuer)
        except PacsError as exc:
            self._query(what, patient, str(exc))
            raise
        self._query(what, patient)
        return studies

    async def get_study(self, study_instance_uid: str) -> StudyInfo | None:
        what: dict[str, object] = {"get_study": study_instance_uid}
        try:
            study = await self.inner.get_study(study_instance_uid)
        except PacsError as exc:
            self._query(what, None, str(exc))
            raise
        self._query(what, None)
        return study

    async def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        classes: dict[str, dict[str, int]] = {}
        failures: list[str] = []
        error: str | None = None
        try:
            async for item in self.inner.retrieve(refs):
                if isinstance(item, RetrievedInstance):
                    per_study = classes.setdefault(item.ref.StudyInstanceUID, {})
                    per_study[item.SOPClassUID] = per_study.get(item.SOPClassUID, 0) + 1
                else:
                    failures.append(f"{item.ref.SOPInstanceUID}: {item.reason}")
                yield item
        except PacsError as exc:
            error = str(exc)
            raise
        finally:
            studies = [StudyRef(uid, self.source_id, sop_classes=tuple(sorted(c.items())))
                       for uid, c in classes.items()]
            if failures and error is None:
                error = f"{len(failures)} instance(s) not delivered: " + "; ".join(failures[:5])
            self.auditor.pacs("retrieve", pacs=self.label, studies=studies, error=error)

    async def store(self, files: Sequence[Path]) -> StoreResult:
        try:
            result = await self.inner.store(files)
        except PacsError as exc:
            self.auditor.pacs("store", pacs=self.label, error=str(exc))
            raise
        error = (f"{len(result.failed)} instance(s) not stored: "
                 + "; ".join(f"{k}: {v}" for k, v in list(result.failed.items())[:5])) if result.failed else None
        studies = await anyio.to_thread.run_sync(_studies, files)  # header reads: not on the event loop
        self.auditor.pacs("store", pacs=self.label, studies=[StudyRef(s) for s in studies], error=error)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


def _studies(files: Sequence[Path]) -> list[str]:
    """Study Instance UIDs of stored files (header only, stops before pixel data)."""
    from pydicom import dcmread

    seen: dict[str, None] = {}
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            seen[str(ds.StudyInstanceUID)] = None
        except Exception:  # noqa: BLE001, S112 - an unreadable file is the store's failure, reported there
            continue
    return list(seen)
