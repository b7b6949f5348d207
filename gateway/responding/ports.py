"""The small interfaces the responding services need (implemented by :mod:`gateway.store.ledger`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Protocol

from gateway.security.saml import VerifiedIdentity
from gateway.store.ledger import EntryRecord


class Ledger(Protocol):
    def entry_for_study(self, unique_id: str, entry_uuid: str, study_uid: str, source_id: str,
                        patient_id: str) -> EntryRecord: ...

    def find_entry(self, unique_id: str | None = None, entry_uuid: str | None = None) -> EntryRecord | None: ...

    def record_delivery(self, *, kos_uid: str, study_uid: str, source_id: str, content_digest: str,
                        instances: Sequence[tuple[str, str]], home_community_id: str, organization_id: str = "",
                        user: str = "") -> None: ...

    def authorized(self, sop_instance_uids: Iterable[str], home_community_id: str,
                   window: dt.timedelta) -> set[str]: ...


class PatientLinks(Protocol):
    def remember(self, *, local_patient_id: str, local_assigning_authority: str, remote_home_community_id: str,
                 remote_patient_id: str | None = None, remote_assigning_authority: str | None = None) -> None: ...


class SecurityAlerts(Protocol):
    """Where the responding services report security-relevant refusals (an ATNA Security Alert)."""

    def uid_guess(self, identity: VerifiedIdentity, refused: Sequence[tuple[str, str]], *,
                  peer_host: str | None = None, reason: str) -> None: ...
