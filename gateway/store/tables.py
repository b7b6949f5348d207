"""Every table XIG keeps, in one place (SQLAlchemy Core).

Nothing another worker or a restart needs lives only in memory: the filesystem PACS index, which
initiating community learned which local patient, and the ledger of issued KOS manifests (which
SOP instances each community may retrieve with RAD-75).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

UID = 64  # DICOM UI VR maximum length

#: The embedded filesystem PACS: one row per Part 10 file under the store's folder.
pacs_instances = Table(
    "pacs_instances", metadata,
    Column("sop_instance_uid", String(UID), primary_key=True),
    Column("source_id", String(UID), nullable=False),
    Column("study_instance_uid", String(UID), nullable=False, index=True),
    Column("series_instance_uid", String(UID), nullable=False),
    Column("sop_class_uid", String(UID), nullable=False),
    Column("transfer_syntax_uid", String(UID), nullable=False),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("issuer_of_patient_id", String(64)),
    Column("patient_name", String(324), nullable=False, default=""),
    Column("patient_birth_date", String(8), nullable=False, default=""),
    Column("patient_sex", String(16), nullable=False, default=""),
    Column("study_date", String(8), nullable=False, default=""),
    Column("study_time", String(16), nullable=False, default=""),
    Column("accession_number", String(16), nullable=False, default=""),
    Column("accession_issuer", String(UID)),
    Column("study_id", String(16), nullable=False, default=""),
    Column("study_description", String(64), nullable=False, default=""),
    Column("referring_physician_name", String(324), nullable=False, default=""),
    Column("series_number", Integer),
    Column("series_description", String(64), nullable=False, default=""),
    Column("modality", String(16), nullable=False, default=""),
    Column("body_part_examined", String(16), nullable=False, default=""),
    Column("instance_number", Integer),
    #: path relative to the store folder
    Column("path", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("indexed_at", DateTime(timezone=True), nullable=False),
)
Index("ix_pacs_instances_birth_date", pacs_instances.c.patient_birth_date)

#: XCPD: which initiating community learned which local patient (ITI TF-2 3.55.4.2.2.4).
patient_links = Table(
    "patient_links", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("local_patient_id", String(64), nullable=False),
    Column("local_assigning_authority", String(UID), nullable=False),
    Column("remote_home_community_id", String(UID + 8), nullable=False),
    #: the initiator's own id for the patient (LivingSubjectId in its authority), when sent
    Column("remote_patient_id", String(64)),
    Column("remote_assigning_authority", String(UID)),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    UniqueConstraint("local_patient_id", "local_assigning_authority", "remote_home_community_id",
                     name="uq_patient_link"),
)

#: One row per distinct on-demand KOS manifest (uniqueId = KOS SOP Instance UID).
kos_manifests = Table(
    "kos_manifests", metadata,
    Column("kos_uid", String(UID), primary_key=True),
    Column("study_instance_uid", String(UID), nullable=False, index=True),
    Column("source_id", String(UID), nullable=False),
    Column("content_digest", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The SOP instances each manifest references (what RAD-75 may then serve).
kos_instances = Table(
    "kos_instances", metadata,
    Column("kos_uid", String(UID), ForeignKey("kos_manifests.kos_uid", ondelete="CASCADE"), primary_key=True),
    Column("sop_instance_uid", String(UID), primary_key=True),
    Column("series_instance_uid", String(UID), nullable=False),
    Column("study_instance_uid", String(UID), nullable=False),
)
Index("ix_kos_instances_sop", kos_instances.c.sop_instance_uid)

#: Every delivery of a manifest (ITI-39) to a requesting community / organisation / user.
kos_deliveries = Table(
    "kos_deliveries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kos_uid", String(UID), ForeignKey("kos_manifests.kos_uid", ondelete="CASCADE"), nullable=False),
    Column("home_community_id", String(UID + 8), nullable=False),
    Column("organization_id", String(128), nullable=False, default=""),
    Column("user", String(256), nullable=False, default=""),
    Column("delivered_at", DateTime(timezone=True), nullable=False),
)
Index("ix_kos_deliveries_community", kos_deliveries.c.home_community_id, kos_deliveries.c.kos_uid)

#: On-demand DocumentEntries handed out by ITI-38: their stable uniqueId ↔ the study they stand for.
document_entries = Table(
    "document_entries", metadata,
    Column("unique_id", String(UID), primary_key=True),
    Column("entry_uuid", String(45), nullable=False, unique=True),
    Column("study_instance_uid", String(UID), nullable=False, index=True),
    Column("source_id", String(UID), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: Durable import jobs (``xig pull-priors``; resumed with ``xig jobs resume``).
jobs = Table(
    "jobs", metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(32), nullable=False),
    #: created | running | completed | failed | interrupted
    Column("state", String(16), nullable=False),
    Column("params", Text, nullable=False),  # JSON
    Column("summary", Text, nullable=False, default="{}"),  # JSON
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: The studies a job found, per community, and whether they were selected for import.
job_studies = Table(
    "job_studies", metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("home_community_id", String(UID + 8), primary_key=True),
    Column("study_instance_uid", String(UID), primary_key=True),
    Column("partner", String(200), nullable=False),
    Column("remote_patient_id", String(200), nullable=False),
    Column("kos_uid", String(UID), nullable=False, default=""),
    Column("description", String(200), nullable=False, default=""),
    Column("study_date", String(8), nullable=False, default=""),
    Column("modalities", String(64), nullable=False, default=""),
    Column("instances", Integer, nullable=False, default=0),
    Column("selected", Integer, nullable=False, default=1),
    #: pending | importing | imported | failed
    Column("state", String(16), nullable=False, default="pending"),
    Column("error", Text, nullable=False, default=""),
)

#: Every instance of every selected study: the unit of resumption (stored ones are never fetched again).
job_instances = Table(
    "job_instances", metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("sop_instance_uid", String(UID), primary_key=True),
    Column("home_community_id", String(UID + 8), nullable=False),
    Column("study_instance_uid", String(UID), nullable=False),
    Column("series_instance_uid", String(UID), nullable=False),
    Column("repository_unique_id", String(UID), nullable=False),
    #: pending | stored | failed
    Column("state", String(16), nullable=False, default="pending"),
    Column("error", Text, nullable=False, default=""),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_job_instances_state", job_instances.c.job_id, job_instances.c.state)

#: Partners imported from a Carequality-style FHIR directory bundle (``xig partners import``).
directory_partners = Table(
    "directory_partners", metadata,
    Column("home_community_id", String(UID + 8), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("entry", Text, nullable=False),  # JSON of the Partner
    Column("source_file", Text, nullable=False, default=""),
    Column("imported_at", DateTime(timezone=True), nullable=False),
)

#: ATNA audit trail (:mod:`gateway.store.audit`): every audit message recorded, as the UTF-8 XML sent to the
#: repositories, with the facts ``xig audit ls`` filters on and the syslog header fields of the recording
#: process (so a re-sent frame is byte-identical to the first one).
AUDIT_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrement needs INTEGER PRIMARY KEY
audit_messages = Table(
    "audit_messages", metadata,
    Column("id", AUDIT_ID, primary_key=True, autoincrement=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False, index=True),
    #: IHE transaction (ITI-55, RAD-75, ...) or the EventID code
    Column("event", String(64), nullable=False, index=True),
    Column("outcome", Integer, nullable=False),
    Column("user", String(512), nullable=False, default="", index=True),
    Column("community", String(UID + 8), nullable=False, default="", index=True),
    Column("hostname", String(255), nullable=False),
    Column("app_name", String(48), nullable=False),
    Column("procid", String(128), nullable=False),
    Column("xml", LargeBinary, nullable=False),
)

#: The patients of an audit message: the CX identifier and its ID (CX.1) for ``--patient``.
audit_patients = Table(
    "audit_patients", metadata,
    Column("message_id", AUDIT_ID, ForeignKey("audit_messages.id", ondelete="CASCADE"), primary_key=True),
    Column("patient_id", String(256), primary_key=True),
    Column("id_value", String(256), nullable=False, index=True),
)

#: The studies (Study Instance UIDs) of an audit message.
audit_studies = Table(
    "audit_studies", metadata,
    Column("message_id", AUDIT_ID, ForeignKey("audit_messages.id", ondelete="CASCADE"), primary_key=True),
    Column("study_instance_uid", String(UID), primary_key=True, index=True),
)

#: Delivery of each audit message to each repository: pending | delivered | failed (never deliverable).
audit_deliveries = Table(
    "audit_deliveries", metadata,
    Column("message_id", AUDIT_ID, ForeignKey("audit_messages.id", ondelete="CASCADE"), primary_key=True),
    Column("repository", String(200), primary_key=True),
    Column("state", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=False, default=""),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
)
Index("ix_audit_deliveries_spool", audit_deliveries.c.repository, audit_deliveries.c.state,
      audit_deliveries.c.message_id)

#: Each audit repository: which process delivers to it (several workers share one spool: a lease renewed
#: while held) and the last delivery error, for ``xig audit ls`` / ``export`` in another process.
audit_repositories = Table(
    "audit_repositories", metadata,
    Column("repository", String(200), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),  # seconds since the epoch
    Column("last_error", Text, nullable=False, default=""),
    Column("last_error_at", DateTime(timezone=True)),
    Column("last_delivered_at", DateTime(timezone=True)),
)

#: How long each partner community took to answer each transaction (:mod:`gateway.store.response_times`):
#: a moving average the fan-outs use to start the slowest partners first.
partner_response_times = Table(
    "partner_response_times", metadata,
    Column("transaction", String(16), primary_key=True),
    Column("home_community_id", String(UID + 8), primary_key=True),
    Column("average_seconds", Float, nullable=False),  # exponentially weighted moving average
    Column("last_seconds", Float, nullable=False),
    Column("samples", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: Applied schema migrations (see :mod:`gateway.store.db`).
schema_migrations = Table(
    "schema_migrations", metadata,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)
