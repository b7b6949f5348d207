"""A :class:`~gateway.pacs.base.PacsBackend` decorator that times every call into the metrics.

``MeteredPacs(backend, metrics)`` behaves exactly like ``backend`` (every other attribute is passed
through) and records ``xig_pacs_request_duration_seconds{backend, operation, outcome}``. A retrieve
is timed from the request to the last instance handed on (or to the consumer closing it early).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from gateway.pacs.base import (
    InstanceRef,
    PacsBackend,
    PatientQuery,
    PatientRecord,
    RetrievedInstance,
    RetrieveFailure,
    StoreResult,
    StudyInfo,
)
from gateway.web.metrics import Metrics

__all__ = ["MeteredPacs"]


class MeteredPacs:
    def __init__(self, inner: PacsBackend, metrics: Metrics, label: str | None = None) -> None:
        self.inner = inner
        self.metrics = metrics
        self.label = label or str(getattr(inner, "name", None) or inner.source_id)
        self.source_id = inner.source_id

    def __getattr__(self, name: str) -> Any:  # name, retrieve_ae_title, open_associations, ...
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"MeteredPacs({self.inner!r})"

    async def ping(self) -> None:
        with self.metrics.pacs_call(self.label, "ping"):
            await self.inner.ping()

    async def find_patients(self, query: PatientQuery) -> list[PatientRecord]:
        with self.metrics.pacs_call(self.label, "find_patients"):
            return await self.inner.find_patients(query)

    async def find_studies(self, patient_id: str, issuer: str | None = None) -> list[StudyInfo]:
        with self.metrics.pacs_call(self.label, "find_studies"):
            return await self.inner.find_studies(patient_id, issuer)

    async def get_study(self, study_instance_uid: str) -> StudyInfo | None:
        with self.metrics.pacs_call(self.label, "get_study"):
            return await self.inner.get_study(study_instance_uid)

    async def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        with self.metrics.pacs_call(self.label, "retrieve"):
            source = self.inner.retrieve(refs)
            try:
                async for item in source:
                    yield item
            finally:
                close = getattr(source, "aclose", None)
                if close is not None:
                    await close()

    async def store(self, files: Sequence[Path]) -> StoreResult:
        with self.metrics.pacs_call(self.label, "store"):
            return await self.inner.store(files)

    async def aclose(self) -> None:
        await self.inner.aclose()
